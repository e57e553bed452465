"""The lower blocks' states on disk (model/prefix.PrefixStore): a run that reads them from a store that an earlier
process filled gets the meta-gradients, shifts and scores of a run without prefix states; a store of other weights or
other modules is never read; the size limit holds; two processes fill one store side by side."""
import dataclasses
import json
import logging
import subprocess
import sys

import pytest
import torch

from model.prefix import PrefixStates
from pipeline.experiment import evaluate
from tests.helpers import ROOT, build_model, max_rel_err, meta_grads, one_group, qa_records, twins, write_records

TOL = 1e-10


def counterfact_group(cfg):
    """A group of CounterFact-like records (with a true answer), for its three scores too."""
    records = [dataclasses.replace(r, true_answer=f"True{i}") for i, r in enumerate(qa_records(6))]
    return one_group(cfg, build_model(cfg)[1], records)


@pytest.mark.parametrize("editor_name", ["malmen", "mend"])
@pytest.mark.parametrize("model_name", ["tiny-gpt2", "tiny-llama"])
def test_a_warm_store_changes_no_gradient_shift_or_score(tmp_path, model_name, editor_name):
    cfg, model, plain, prefixed, group = twins(model_name, "zsre", editor_name)
    state = {k: v.clone() for k, v in prefixed.net.state_dict().items()}
    prefixed.prefix = PrefixStates(model, prefixed.edited_modules(), store_dir=tmp_path)  # a cold store: filled
    meta_grads(prefixed, group, end_to_end=False)
    writes = prefixed.prefix.summary()["store"]["writes"]
    assert writes == 3 * 6  # edit, equivalent and unrelated tuples, each once
    prefixed.net.load_state_dict(state)
    prefixed.prefix = PrefixStates(model, prefixed.edited_modules(), store_dir=tmp_path)  # a new process: memory empty
    for end_to_end in (False, True):
        prefixed.net.load_state_dict(state)
        plain.net.load_state_dict(state)
        got, ref = meta_grads(prefixed, group, end_to_end), meta_grads(plain, group, end_to_end)
        assert max_rel_err(got, ref) <= TOL
    summary = prefixed.prefix.summary()
    assert summary["misses"] == 0 and summary["store"]["reads"] == 3 * 6 and summary["store"]["writes"] == 0
    for name, shift in plain.edit(group.edit).items():
        torch.testing.assert_close(prefixed.edit(group.edit)[name], shift, rtol=TOL, atol=TOL * shift.abs().max())
    cf = counterfact_group(cfg)
    model_scores = {}
    for store in (None, tmp_path, tmp_path):  # none; the store filled; the store read by new prefix states
        prefix = None if store is None else PrefixStates(model, prefixed.edited_modules(), store_dir=store)
        model_scores[len(model_scores)] = evaluate(model, cf, "causal", "cpu", prefix, generate=True)[0]
    assert model_scores[0] == model_scores[1] == model_scores[2]
    assert {"efficacy", "paraphrase", "neighborhood", "generated"} <= set(model_scores[0])


def test_a_store_of_other_weights_or_modules_is_never_read(tmp_path):
    cfg, model, plain, prefixed, group = twins("tiny-llama", "zsre", "malmen")
    first = PrefixStates(model, prefixed.edited_modules(), store_dir=tmp_path)
    prefixed.prefix = first
    prefixed.meta_grad(group)
    assert first.summary()["store"]["writes"] > 0
    # the same weights below the first edited block, an edited block changed: the store still applies
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight.add_(1.0)
    same = PrefixStates(model, prefixed.edited_modules(), store_dir=tmp_path)
    assert same.disk.dir == first.disk.dir
    # other modules (the lowest edited block 3, not 2): another folder, nothing read
    other_modules = PrefixStates(model, ["model.layers.3.mlp.down_proj"], store_dir=tmp_path)
    # other weights below the edited blocks (one embedding row moved): another folder, nothing read
    with torch.no_grad():
        model.model.embed_tokens.weight[5].add_(1e-3)
    other_weights = PrefixStates(model, prefixed.edited_modules(), store_dir=tmp_path)
    for prefix in (other_modules, other_weights):
        assert prefix.disk.dir != first.disk.dir
        prefixed.prefix = prefix
        evaluate(model, group, "causal", "cpu", prefix)
        assert prefix.summary()["store"]["reads"] == 0 and prefix.summary()["misses"] > 0
    assert len([d for d in tmp_path.iterdir() if d.is_dir()]) == 3
    assert json.loads((first.disk.dir / "key.json").read_text())["first_block"] == 2


def test_the_store_keeps_to_its_limit_and_says_so(tmp_path, caplog):
    cfg, model, plain, prefixed, group = twins("tiny-gpt2", "zsre", "malmen")
    one = max(b["input_ids"].shape[1] for b in group.edit) * model.config.n_embd * 8  # float64 bytes, the longest
    prefixed.prefix = PrefixStates(model, prefixed.edited_modules(), store_dir=tmp_path, store_gb=2.5 * one / 2 ** 30)
    with caplog.at_level(logging.WARNING, logger="model.prefix"):
        prefixed.meta_grad(group)
    store = prefixed.prefix.summary()["store"]
    assert store["writes"] >= 2 and store["bytes"] <= 2.5 * one
    assert store["not_stored"] == 3 * 6 - store["writes"]
    files = list(prefixed.prefix.disk.dir.glob("*/*.safetensors"))
    assert len(files) == store["writes"] and sum(f.stat().st_size for f in files) >= store["bytes"]
    assert sum("its limit (prefix_store_gb=" in r.message for r in caplog.records) == 1  # once, not per tuple


def test_two_processes_fill_one_store_side_by_side(tmp_path):
    """Two runs of the same model and records at once: every file they leave is whole and equal to a cold pass."""
    train = write_records(tmp_path / "train.json", qa_records(12), "zsre")
    valid = write_records(tmp_path / "valid.json", qa_records(12, start=100), "zsre")
    cmd = [sys.executable, "main.py", "model=tiny-llama", f"data.train_path={train}", f"data.valid_path={valid}",
           "data=zsre", "data.n_edits=6", "data.batch_size=3", "max_train_steps=2", "max_valid_steps=2",
           f"cache_dir={tmp_path / 'cache'}", "cache_pre_edit=false"]
    procs = [subprocess.Popen([*cmd, f"hydra.run.dir={tmp_path / f'run{i}'}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        assert p.wait(timeout=300) == 0, p.stderr.read()[-2000:]
    results = [json.loads((tmp_path / f"run{i}" / "results.json").read_text()) for i in range(2)]
    assert results[0]["final"] == results[1]["final"]
    stores = [r["prefix_cache"]["store"] for r in results]
    assert stores[0]["dir"] == stores[1]["dir"]
    from safetensors.torch import load_file
    files = list((tmp_path / "cache" / "prefix_store").glob("*/*/*.safetensors"))
    assert files and all(load_file(f)["h"].ndim == 2 for f in files)  # none torn
    assert not list((tmp_path / "cache" / "prefix_store").glob("*/*/*.tmp"))
    third = subprocess.run([*cmd, f"hydra.run.dir={tmp_path / 'run2'}"], cwd=ROOT, capture_output=True, text=True)
    assert third.returncode == 0, third.stderr[-2000:]
    warm = json.loads((tmp_path / "run2" / "results.json").read_text())
    assert warm["final"] == results[0]["final"] and warm["prefix_cache"]["store"]["writes"] == 0
    assert warm["prefix_cache"]["store"]["reads"] > 0 and warm["prefix_cache"]["misses"] == 0
