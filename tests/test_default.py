"""A tiny version of the default experiment (`python main.py`): world, toy LM, MALMEN, end to end."""
import json

from main import run
from tests.conftest import make_cfg

# Few facts, a 1-layer 64-wide toy LM, a few hundred meta-steps. The hyper-network's initial eta and
# rank are scaled to this model (the paper's 1e-6 and 1920 are sized for GPT-2 and larger).
TINY_WORLD = ["data.world.n_train_subjects=8", "data.world.n_valid_subjects=4", "data.world.n_locality_subjects=8",
              "data.world.n_novel_subjects=40", "model.pretrain.n_layer=1", "model.pretrain.n_embd=64",
              "model.pretrain.n_head=2", "model.pretrain.epochs=60", "model.edit_modules=[transformer.h.0.mlp.c_proj]",
              "data.n_edits=16", "data.batch_size=16", "editor.lr_init=0.1", "editor.meta_lr=1e-4", "editor.rank=64"]


def test_default_config_is_the_synthetic_experiment():
    cfg = make_cfg()
    assert (cfg.model.name, cfg.data.name, cfg.editor.name) == ("toy-gpt2", "synthetic", "malmen")
    assert cfg.data.n_edits >= 256


def test_tiny_default_pipeline_raises_es(tmp_path):
    cache = tmp_path / "cache"
    results = run(make_cfg(*TINY_WORLD, f"cache_dir={cache}", "n_epochs=20"), tmp_path)
    assert len(results["train"]) == 20 * (8 + 40) * 4 // 16  # every meta-training edit, every epoch
    assert results["pre_edit"]["LS"] > 0.5  # the toy LM knows the locality facts
    assert results["final"]["ES"] > results["pre_edit"]["ES"], (results["pre_edit"], results["final"])
    # the world and the toy LM are cached: a second run reuses both
    cached = sorted(p.name for p in cache.iterdir())
    again = run(make_cfg(*TINY_WORLD, f"cache_dir={cache}", "n_epochs=0"), tmp_path)
    assert sorted(p.name for p in cache.iterdir()) == cached
    assert again["pre_edit"] == results["pre_edit"]  # the same pretrained LM
    pretrain = json.loads(next(cache.glob("toy-*/pretrain.json")).read_text())
    assert pretrain["n_facts"] == (8 + 4 + 8) * 4 * 4
