"""eta and lambda at the edited model's scale (editor.eta_param, scale_lr, eta_search, lambda_rel) and the learning
curve (eval_every): the paper's values stay the default; each switch does what its config comment says."""
import json
import subprocess
import sys

import pytest
import torch

from model.trace import trace
from pipeline.experiment import build_editor
from tests.helpers import ROOT, build_model, make_cfg, one_group, qa_records, write_records

SCALED = ["editor.eta_param=log", "editor.scale_lr=0.05", "editor.eta_search=true", "editor.lambda_rel=0.1"]


def editor_for(*overrides, editor="malmen"):
    cfg = make_cfg("model=tiny-llama", "data=zsre", f"editor={editor}", "data.n_edits=6", "data.batch_size=4",
                   "editor.rank=16", *overrides)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    return cfg, model, build_editor(cfg, model), one_group(cfg, tok, qa_records(6))


def test_the_paper_values_are_the_default():
    cfg, _, editor, _ = editor_for()
    assert (cfg.editor.eta_param, cfg.editor.scale_lr, cfg.editor.eta_search, cfg.editor.lambda_rel) == \
        ("plain", None, False, None)
    assert len(editor.opt.param_groups) == 1 and all(hasattr(net, "lr") for net in editor.net.values())


@pytest.mark.parametrize("editor_name", ["malmen", "mend"])
def test_shifts_are_linear_in_eta(editor_name):
    """What eta_search relies on: S* at eta is eta times S* at 1 (D is linear in eta; the solve is linear in D)."""
    cfg, model, editor, group = editor_for(editor=editor_name)
    cache = editor.cache(group.edit)
    net = next(iter(editor.net.values()))
    with torch.no_grad():
        net.lr.fill_(1.0)
        unit = editor.shifts(cache)
        net.lr.fill_(0.037)
        scaled = editor.shifts(cache)
    for n in unit:
        torch.testing.assert_close(scaled[n], 0.037 * unit[n], rtol=1e-5, atol=1e-6 * unit[n].abs().max())


def test_calibration_sets_lambda_from_the_keys_and_eta_at_the_grid_minimum():
    cfg, model, editor, group = editor_for(*SCALED)
    out = editor.calibrate(group)
    keys = trace(model, editor.modules, group.edit, "causal", "ans", "cpu", "cpu")  # the keys, traced again
    for n in editor.modules:
        expect = 0.1 * keys[n][0].pow(2).sum(-1).mean()
        assert out["lambda"][n] == pytest.approx(float(expect), rel=1e-5)
        assert float(editor.regularizer(n).detach()) == pytest.approx(float(expect), rel=1e-5)
    losses = out["meta_loss"]
    assert len(losses) == len(out["eta_grid"]) and out["eta"] == out["eta_grid"][losses.index(min(losses))]
    assert len(set(losses)) > 1  # eta matters on this group
    assert all(float(net.eta().detach().min()) == pytest.approx(out["eta"]) for net in editor.net.values())
    # the normaliser is as before: the first meta-step folds this group in once, not twice
    assert all(int(net.norm.count) == 0 for net in editor.net.values())


def test_log_eta_stays_positive_and_moves_at_its_own_rate():
    cfg, model, editor, group = editor_for(*SCALED)
    scale_group = editor.opt.param_groups[1]
    names = {id(p): n for n, p in editor.net.named_parameters()}
    assert scale_group["lr"] == 0.05 and sorted(names[id(p)].split(".")[-1] for p in scale_group["params"]) == \
        ["log_lambda", "log_lr"]
    assert editor.opt.param_groups[0]["lr"] == cfg.editor.meta_lr
    for _ in range(3):
        metrics = editor.meta_step(group)
        assert all(e > 0 for e in metrics["eta"]) and all(v > 0 for v in metrics["lambda"])
    assert editor.calibrated is not None and editor.state_dict()["calibrated"] == editor.calibrated


def test_the_learning_curve_is_recorded_and_resumed(tmp_path):
    train = write_records(tmp_path / "train.json", qa_records(24), "zsre")
    valid = write_records(tmp_path / "valid.json", qa_records(12, start=100), "zsre")
    base = [sys.executable, "main.py", "model=tiny-llama", "data=zsre", f"data.train_path={train}",
            f"data.valid_path={valid}", "data.n_edits=4", "data.batch_size=4", "editor.rank=16", "eval_every=2",
            "eval_groups=2", "max_valid_steps=1", f"cache_dir={tmp_path / 'cache'}", *SCALED]
    run = tmp_path / "run"
    first = subprocess.run([*base, "max_train_steps=4", "save_every=2", f"hydra.run.dir={run}"], cwd=ROOT,
                           capture_output=True, text=True)
    assert first.returncode == 0, first.stderr[-2000:]
    res = json.loads((run / "results.json").read_text())
    assert [c["step"] for c in res["curve"]] == [2, 4] and all(c["groups"] == 2 for c in res["curve"])
    assert {"ES", "GS", "LS", "generated"} <= set(res["curve"][0])
    assert [len(r["eta"]) for r in res["train"]] == [2] * 4 and res["calibrated"]["eta"] > 0
    again = subprocess.run([*base, "max_train_steps=6", "editor.resume=true", f"hydra.run.dir={run}"], cwd=ROOT,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    res = json.loads((run / "results.json").read_text())
    assert [c["step"] for c in res["curve"]] == [2, 4, 6] and [r["step"] for r in res["train"]] == list(range(1, 7))
    plot = subprocess.run([sys.executable, "scripts/train_curves.py", str(run)], cwd=ROOT, capture_output=True,
                          text=True)
    assert plot.returncode == 0 and (run / "train_curves.png").stat().st_size > 10_000
    other = subprocess.run([*base, "max_train_steps=8", "editor.resume=true", "editor.eta_param=plain",
                            f"hydra.run.dir={run}"], cwd=ROOT, capture_output=True, text=True)
    assert other.returncode != 0 and "editor.eta_param: checkpoint 'log', this run 'plain'" in other.stderr


@pytest.mark.parametrize("overrides", [("editor=mend",), ("ablation=sum",), ("ablation=no_reg",)])
def test_lambda_rel_is_refused_where_there_is_no_lambda(overrides):
    """MEND's sum and the no-regularisation ablation have no lambda: editor.lambda_rel would do nothing."""
    from pipeline.preflight import check_editor
    with pytest.raises(ValueError, match="editor.lambda_rel=0.1 sets lambda, which .* does not have"):
        check_editor(make_cfg("model=tiny-gpt2", *overrides, "editor.lambda_rel=0.1"))
    check_editor(make_cfg("model=tiny-gpt2", "editor=malmen", "editor.lambda_rel=0.1"))  # MALMEN solves with lambda
