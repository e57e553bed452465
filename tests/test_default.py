"""The default experiment (`python main.py`: SmolLM2, invented people, MALMEN at the model's scale) and the toy
(experiment=toy: world, toy LM, MALMEN), each end to end at a tiny size."""
import json
import os
import subprocess
import sys

from pipeline.experiment import run
from tests.helpers import TINY_WORLD, make_cfg


def test_default_config_is_smollm2_on_invented_people_at_the_models_scale():
    cfg = make_cfg()
    assert (cfg.model.name, cfg.data.name, cfg.editor.name) == ("smollm2", "people", "malmen")
    assert (cfg.editor.eta_param, cfg.editor.eta_search, cfg.editor.lambda_rel, cfg.editor.meta_lr) == ("log", True, 0.1, 1e-5)
    toy = make_cfg("experiment=toy")
    assert (toy.model.name, toy.data.name, toy.data.n_edits) == ("toy-gpt2", "synthetic", 256)


def test_tiny_default_run_edits_smollm2(smollm2, tmp_path):
    """python main.py at a tiny size: SmolLM2 learns new facts about invented people; what it knew stays."""
    people = ["data.people.n_train_subjects=4", "data.people.n_valid_subjects=2", "data.n_edits=12",
              "n_epochs=2", "max_train_steps=4", f"cache_dir={tmp_path / 'cache'}"]
    results = run(make_cfg(*people, f"model.name_or_path={smollm2.model.name_or_path}"), tmp_path)
    assert [r["m"] for r in results["train"]] == [12] * 4 and results["calibrated"]["eta"] > 1e-6
    assert results["pre_edit"]["LS"] == 1.0 and results["pre_edit"]["generated"]["LS"] == 1.0  # facts it knows
    assert results["final"]["ES"] > results["pre_edit"]["ES"] + 0.3, (results["pre_edit"], results["final"])
    assert results["final"]["generated"]["unchanged"] > 0.5


def test_tiny_toy_pipeline_raises_es(tmp_path):
    cache = tmp_path / "cache"
    results = run(make_cfg(*TINY_WORLD, f"cache_dir={cache}", "n_epochs=20"), tmp_path)
    assert len(results["train"]) == 20 * 16 * 4 // 16  # every meta-training edit, every epoch
    assert results["pre_edit"]["LS"] > 0.5  # the toy LM knows the locality facts (about objects)
    assert results["final"]["ES"] > results["pre_edit"]["ES"], (results["pre_edit"], results["final"])
    # the world and the toy LM are cached: a second run reuses both
    cached = sorted(p.name for p in cache.iterdir())
    again = run(make_cfg(*TINY_WORLD, f"cache_dir={cache}", "n_epochs=0"), tmp_path)
    assert sorted(p.name for p in cache.iterdir()) == cached
    assert again["pre_edit"] == results["pre_edit"]  # the same pretrained LM
    pretrain = json.loads(next(cache.glob("toy-*/pretrain.json")).read_text())
    world = json.loads(next(cache.glob("synthetic/world-*/world.json")).read_text())
    n_object_facts = 3 * sum(len(f) for f in world["object_facts"].values())  # 3 templates each
    k = make_cfg("experiment=toy").data.world.n_train_known_templates  # templates for meta-training people; 4 for the rest
    assert pretrain["n_facts"] == (16 * k + 4 * 4) * 4 + n_object_facts


def test_tuned_settings_apply_to_their_model_data_and_editor_only():
    a6 = make_cfg("model=gpt2", "data=zsre")  # no tuned file: the paper's A.6 values
    assert (a6.editor.lr_init, a6.editor.meta_lr, a6.editor.rank) == (1e-6, 1e-5, 1920)
    for editor in ("malmen", "mend"):
        toy = make_cfg("experiment=toy", f"editor={editor}")
        assert toy.editor.lr_init != a6.editor.lr_init and toy.editor.rank != a6.editor.rank
        assert toy.n_epochs > 1
    assert make_cfg("experiment=toy", "editor.rank=7", "n_epochs=3").editor.rank == 7  # the command line still wins
    assert make_cfg("experiment=toy", "editor.rank=7", "n_epochs=3").n_epochs == 3
    assert make_cfg("experiment=toy", "ablation=sum").editor.rank == make_cfg("experiment=toy").editor.rank
    # SmolLM2's model-scale settings are the default experiment's: other data keep the paper's, as does ~tuned
    for other in (make_cfg("data=zsre"), make_cfg("experiment=massive_counterfact"), make_cfg("~tuned")):
        assert (other.editor.eta_param, other.editor.eta_search, other.editor.lambda_rel) == ("plain", False, None)


def test_value_bound_script_reaches_the_edits(tmp_path):
    """scripts/value_bound.py: free value differences through the normal equation raise ES/GS."""
    cache = tmp_path / "cache"
    out = subprocess.run(
        [sys.executable, "scripts/value_bound.py", *TINY_WORLD, f"cache_dir={cache}", "+bound.steps=60",
         f"hydra.run.dir={tmp_path / 'run'}"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split()[0]: [float(x) for x in line.split()[1:]] for line in out.stdout.splitlines()
            if line.startswith(("pre ", "bound "))}
    assert rows["bound"][1] > rows["pre"][1] + 0.3, rows  # GS: its prompts are in the optimised loss
    leverage = [float(line.rsplit(" ", 1)[1]) for line in out.stdout.splitlines() if "mean leverage" in line]
    assert leverage and all(0 < h <= 1 for h in leverage), out.stdout  # one line per edited layer
