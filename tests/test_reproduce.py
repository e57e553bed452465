"""Reproducibility: the tiny default pipeline is bit-identical across thread environments,
the toy LM's cache is keyed by the thread count, and results carry their environment (the README's tables
made from them: tests/test_readme_tables.py)."""
import json
import os
import subprocess
import sys
import time

import torch
from safetensors.torch import load_file

from pipeline.experiment import run
from tests.helpers import ROOT, TINY_WORLD, make_cfg
from util import run_environment

FAST = [*TINY_WORLD, "n_epochs=2", "model.pretrain.epochs=20"]  # later overrides win


# ----- determinism --------------------------------------------------------------------------------
def test_two_runs_from_empty_caches_are_bit_identical_whatever_the_thread_environment(tmp_path):
    """python main.py twice, same seed, config threads=1, OMP/MKL threads 1 and 2, run side by side."""
    procs = {}
    for n in ("1", "2"):
        env = {**os.environ, "OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}
        procs[n] = subprocess.Popen(
            [sys.executable, "main.py", *FAST, "seed=0", "threads=1", f"cache_dir={tmp_path / n / 'cache'}",
             f"hydra.run.dir={tmp_path / n / 'run'}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
    for p in procs.values():
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    a, b = (json.loads((tmp_path / n / "run" / "results.json").read_text()) for n in ("1", "2"))
    for key in ("pre_edit", "final", "valid", "train"):
        assert a[key] == b[key], key  # exact: every float of every group and meta-step
    assert a["environment"]["threads"] == b["environment"]["threads"] == 1  # the config wins over OMP
    lm_a, lm_b = (sorted((tmp_path / n / "cache").glob("toy-*")) for n in ("1", "2"))
    assert len(lm_a) == 1 and [p.name for p in lm_a] == [p.name for p in lm_b]  # same cache key
    wa, wb = load_file(lm_a[0] / "model.safetensors"), load_file(lm_b[0] / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_toy_lm_cache_is_keyed_by_the_thread_count(tmp_path):
    """threads=1 and threads=2 in the config pretrain two LMs; threads=1 again reuses the first."""
    before, names = torch.get_num_threads(), []
    try:
        for i, threads in enumerate((1, 2, 1)):
            cfg = make_cfg(*TINY_WORLD, "model.pretrain.epochs=1", f"threads={threads}", f"cache_dir={tmp_path}",
                           "n_epochs=0", "max_valid_steps=1")
            results = run(cfg, tmp_path / f"run{i}")
            names.append(results["config"]["model"]["name_or_path"])
            assert results["environment"]["threads"] == threads
    finally:
        torch.set_num_threads(before)
    assert names[0] != names[1] and names[0] == names[2]
    assert len(list(tmp_path.glob("toy-*"))) == 2
    assert json.loads((tmp_path / names[1].rsplit("/", 1)[1] / "pretrain.json").read_text())["threads"] == 2


def test_run_environment_is_fast_and_never_fails(monkeypatch):
    start = time.time()
    env = run_environment()
    assert time.time() - start < 5
    assert env["threads"] == torch.get_num_threads() and env["torch"] == torch.__version__
    assert env["cpu_count"] >= 1 and env["date"][:2] == "20" and env["transformers"]
    if (ROOT / ".git").exists():
        assert len(env["commit"]) >= 7 and isinstance(env["dirty"], bool)
    monkeypatch.setenv("PATH", "")  # no git on the PATH: no commit, no error
    assert (run_environment()["commit"], run_environment()["dirty"]) == (None, None)
