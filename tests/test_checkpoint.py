"""Editor checkpoints: code in a checkpoint never runs, a mismatched one is refused, resumption is exact,
and a normal equation without a finite solution stops with the module's name."""
import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from editor.malmen import SolveError
from pipeline.experiment import build_editor, run
from tests.helpers import ROOT, build_model, make_cfg, train_cfg
from util import load_checkpoint, save_checkpoint


class Payload:
    """Pickles as a call to os.system: unpickling it without weights_only would create the marker."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_checkpoint_that_runs_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"net": Payload(marker), "opt": {}, "step": 0, "config": {}}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="refused to load .*evil.pt: it holds objects other than tensors.*system"):
        load_checkpoint(tmp_path / "evil.pt")
    cfg = make_cfg("model=tiny-gpt2", "editor=malmen", "editor.rank=8", f"editor.checkpoint={tmp_path / 'evil.pt'}")
    model, _ = build_model(cfg)
    with pytest.raises(ValueError, match="refused to load"):
        build_editor(cfg, model)
    assert not marker.exists()
    (tmp_path / "cut.pt").write_bytes((tmp_path / "evil.pt").read_bytes()[:50])  # truncated file
    with pytest.raises(ValueError, match="cannot read checkpoint .*cut.pt"):
        load_checkpoint(tmp_path / "cut.pt")


def test_checkpoint_for_another_model_or_layout_is_refused(tmp_path):
    run(train_cfg(tmp_path, "max_train_steps=1"), tmp_path)
    ckpt = f"editor.checkpoint={tmp_path / 'checkpoint.pt'}"
    for overrides, expected in [
        (["model.edit_modules=[transformer.h.3.mlp.c_proj]"],
         "editor.modules: checkpoint ['transformer.h.2.mlp.c_proj', 'transformer.h.3.mlp.c_proj'], "
         "this run ['transformer.h.3.mlp.c_proj']"),
        (["model.tiny.n_embd=16"], "hyper-network tensor 32x128.A: only in the checkpoint"),
        (["editor=mend", "editor.rank=32"], "editor.name: checkpoint 'malmen', this run 'mend'"),
    ]:
        cfg = make_cfg("model=tiny-gpt2", "editor=malmen", "editor.rank=32", *overrides, ckpt)
        model, _ = build_model(cfg)
        with pytest.raises(ValueError, match="was trained for model tiny-gpt2 with modules") as err:
            build_editor(cfg, model)
        assert expected in str(err.value)
    cfg = make_cfg("model=tiny-gptj", "editor=malmen", "editor.rank=32", ckpt)
    with pytest.raises(ValueError, match="model.arch: checkpoint 'gpt2', this run 'gptj'"):
        build_editor(cfg, build_model(cfg)[0])

    cfg = make_cfg("model=tiny-gpt2", "editor=malmen", "editor.rank=32", "editor.token=all", ckpt)
    with pytest.raises(ValueError, match="editor.token: checkpoint 'ans', this run 'all'"):
        build_editor(cfg, build_model(cfg)[0])


def test_a_checkpoint_is_evaluated_at_its_own_m_unless_asked(tmp_path):
    """The paper trains one hyper-network per m: evaluating a checkpoint of m = 4 at m = 2 needs
    editor.allow_other_m=true, and its results then say what it was trained at."""
    (tmp_path / "train").mkdir()
    run(train_cfg(tmp_path, "max_train_steps=1"), tmp_path / "train")
    ckpt = f"editor.checkpoint={tmp_path / 'train' / 'checkpoint.pt'}"
    with pytest.raises(ValueError, match="meta-trained at m = 4 edits and this run evaluates m = 2.*"
                                         "editor.allow_other_m=true"):
        run(train_cfg(tmp_path, "n_epochs=0", "data.n_edits=2", ckpt), tmp_path)
    assert not (tmp_path / "results.json").exists()
    results = run(train_cfg(tmp_path, "n_epochs=0", "data.n_edits=2", ckpt, "editor.allow_other_m=true"), tmp_path)
    assert results["trained"] == {"m": 4, "token": "ans", "loss_reduction": "token_mean"}
    assert "trained at m = 4" in (tmp_path / "results.md").read_text()
    assert run(train_cfg(tmp_path, "n_epochs=0", ckpt), tmp_path)["trained"]["m"] == 4  # its own m: no switch


def test_resumed_training_equals_uninterrupted(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    reference = run(train_cfg(whole, "n_epochs=2"), whole)  # 4 meta-steps over 2 epochs
    # "interrupted" after 3 steps (mid second epoch), checkpointing every step, then resumed
    run(train_cfg(cut, "n_epochs=2", "max_train_steps=3", "save_every=1"), cut)
    assert load_checkpoint(cut / "checkpoint.pt")["step"] == 3
    resumed = run(train_cfg(cut, "n_epochs=2", "editor.resume=true"), cut)
    assert [r["step"] for r in resumed["train"]] == [1, 2, 3, 4]
    assert resumed["train"] == reference["train"] and resumed["valid"] == reference["valid"]
    a, b = load_checkpoint(whole / "checkpoint.pt"), load_checkpoint(cut / "checkpoint.pt")
    assert a["step"] == b["step"] == 4
    assert a["net"].keys() == b["net"].keys() and all(torch.equal(a["net"][k], b["net"][k]) for k in a["net"])
    with pytest.raises(ValueError, match="data.n_edits: checkpoint 4, this run 2"):  # another trajectory
        run(train_cfg(cut, "n_epochs=2", "editor.resume=true", "data.n_edits=2"), cut)
    with pytest.raises(FileNotFoundError, match="editor.resume=true reads .*checkpoint.pt, which does not exist"):
        run(train_cfg(tmp_path, "editor.resume=true"), tmp_path / "nowhere")


class CtrlC:
    """Sends SIGINT to this process while torch.save pickles it, then pickles as an empty OrderedDict."""

    def __reduce__(self):
        os.kill(os.getpid(), signal.SIGINT)
        return collections.OrderedDict, ()


def test_ctrl_c_during_a_checkpoint_write_finishes_the_file_then_interrupts(tmp_path):
    # unheld, the interrupt aborts the write (and inside torch.save's zip writer becomes a RuntimeError)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"step": 7, "net": {"w": torch.ones(3)}, "extra": CtrlC()}, tmp_path / "checkpoint.pt")
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["step"] == 7 and torch.equal(state["net"]["w"], torch.ones(3)) and state["extra"] == {}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind


def test_killed_cli_run_resumes_to_the_same_numbers(tmp_path):
    """A real interruption: SIGINT once the first checkpoint is written, then the same command again."""
    reference = run(train_cfg(tmp_path, "n_epochs=3"), tmp_path)  # 6 meta-steps
    cfg = train_cfg(tmp_path, "n_epochs=3")
    args = [sys.executable, "main.py", "model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32",
            "editor.lr_init=1e-3", f"data.train_path={cfg.data.train_path}", f"data.valid_path={cfg.data.valid_path}",
            "data.n_edits=4", "data.batch_size=3", "n_epochs=3", "save_every=1", f"hydra.run.dir={tmp_path / 'cli'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # even if we ignore it
    ckpt, deadline = tmp_path / "cli" / "checkpoint.pt", time.time() + 120
    while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    steps = load_checkpoint(ckpt)["step"]
    assert proc.returncode in (0, 130), err  # 0 only if the run ended before the signal arrived
    if proc.returncode == 130:
        assert f"the same command with hydra.run.dir={tmp_path / 'cli'} continues from it" in err
        assert "Traceback" not in err
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    resumed = load_checkpoint(ckpt)
    assert resumed["train_log"] == reference["train"] and 1 <= steps <= 6
    ref = load_checkpoint(tmp_path / "checkpoint.pt")["net"]
    assert all(torch.equal(ref[k], resumed["net"][k]) for k in ref)


@pytest.mark.parametrize("keys,reason", [(torch.zeros(5, 128), "singular"),  # lambda = 0, no key: LinAlgError
                                         (torch.full((5, 128), 1e20), "non-finite")])  # K^T K overflows
def test_solve_without_finite_solution_names_the_module(keys, reason):
    cfg = make_cfg("model=tiny-gpt2", "editor=malmen", "editor.rank=8", "editor.regularize=false")
    editor = build_editor(cfg, build_model(cfg)[0])
    with pytest.raises(SolveError, match=f"module transformer.h.2.mlp.c_proj \\(lambda = 0\\): .*{reason}.*"
                                         "use a larger editor.lambda_init"):
        editor.shifts({"transformer.h.2.mlp.c_proj": (keys, torch.randn(5, 32))})


def test_a_model_folder_is_named_an_edited_model_only_when_mode_edit_saved_it(tmp_path, monkeypatch):
    """A converted model under a relative path (cache/SmolLM2-...) is compared by its absolute folder, and is not
    called "an edited model"; a folder with mode=edit's provenance.json is, with its base model."""
    from pipeline.checkpoint import as_base
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache" / "model").mkdir(parents=True)
    config = {"model": {"arch": "llama", "name_or_path": "cache/model", "tiny": None}}
    compared, note = as_base(config)
    assert compared["model"]["name_or_path"] == str(tmp_path / "cache" / "model") and note == ""
    base = {"arch": "llama", "name_or_path": "/models/base", "tiny": None}
    (tmp_path / "cache" / "model" / "provenance.json").write_text(json.dumps({"base_model": base}))
    compared, note = as_base(config)
    assert compared["model"]["name_or_path"] == "/models/base"
    assert note == " (an edited model, cache/model, whose base model is /models/base)"
