"""MEMIT, EMMET and LocFT-BF as their authors ran them (issue 15), each rule against a computation written
here from the model's plain forward pass (full logits, hooks, positions counted by hand), on tiny models
in float64 where the rule is a closed form.

The world is tests/test_located.py's: word-level tokens, so the subject of "The home town of {s}" is the
LAST token of every context and the FIRST of "{s} is a", positions this file counts without the editor.
"""
import pytest
import torch
import torch.nn.functional as F

from data.collate import IGNORE
from data.records import EditRecord
from data.subjects import requests
from editor.base import apply_shifts, from_param_layout
from editor.locate import Suffixes, TargetLoss, context_prefixes, target_vectors
from editor.locft_bf import LocFTBF, concat, with_eos
from pipeline.experiment import build_editor, stats_texts
from pipeline.report import diagnostics_lines
from tests.conftest import build_model, make_cfg, one_group
from tests.test_located import edited, world, world_cfg  # noqa: F401 (world is a fixture)

F64 = ["model.dtype=float64"]


def last_token_state(model, module, tok, text: str, at: int = -1, output: bool = False) -> torch.Tensor:
    """The input (or output) of `module` at token `at` of `text`, run alone (no padding)."""
    got = []
    handle = module.register_forward_hook(lambda m, i, o: got.append((o[0] if isinstance(o, tuple) else o)
                                                                     if output else i[0]))
    with torch.no_grad():
        model(**tok(text, add_special_tokens=False, return_tensors="pt"))
    handle.remove()
    return got[0][0, at]


def full_logits(model, inject, ids: list[int], at: int | None = None, vec: torch.Tensor | None = None):
    """Logits (T, V) of the whole sequence; vec added to `inject`'s output at position `at`."""
    def add(m, i, o):
        o = o.clone()
        o[0, at] += vec
        return o
    handle = inject.register_forward_hook(add) if vec is not None else None
    try:
        return model(input_ids=torch.tensor([ids])).logits[0]
    finally:
        if handle:
            handle.remove()


# ----- MEMIT: contexts, keys, target loss, early stop ---------------------------------------------------------
def test_prefixes_are_generated_by_the_model_seeded_and_cached(world, tmp_path, monkeypatch):
    cfg = world_cfg(world, tmp_path, "memit", "editor.n_prefixes=5", *F64)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    args = dict(n_prefixes=5, starts=list(cfg.editor.prefix_starts), n_tokens=10, top_k=5, model_id="m",
                cache_dir=tmp_path / "c", device="cpu")
    prefixes = context_prefixes(model, tok, **args)
    assert prefixes[0] == "" and len(prefixes) == 6
    for start, p in zip(["The", "Therefore", "Because", "I", "You"], prefixes[1:]):
        assert p.endswith(". ") and p.split()[0] == start
        assert len(tok(p[:-2], add_special_tokens=False)["input_ids"]) == 10  # 10 tokens, the start included
    (path,) = (tmp_path / "c" / "context_prefixes").rglob("*.json")
    monkeypatch.setattr("editor.locate.generate_prefixes", lambda *a, **k: pytest.fail("regenerated"))
    assert context_prefixes(model, tok, **args) == prefixes  # from the cache
    monkeypatch.undo()
    path.unlink()
    assert context_prefixes(model, tok, **args) == prefixes  # seeded: the same texts again
    assert context_prefixes(model, tok, **{**args, "model_id": "other"}) == prefixes  # same weights, same texts
    assert len(list((tmp_path / "c" / "context_prefixes").rglob("*.json"))) == 2  # but one file per model


def test_prefixes_of_a_word_level_vocabulary_without_the_starts(tmp_path):
    """The toy model's vocabulary (model/toy.py) has "The" but no "Therefore" and no ".": those starts are
    replaced by BOS (left out of the text) and the separator is " ", so every context stays in the vocabulary."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from data.collate import Collator
    from model.toy import word_tokenizer
    tok = word_tokenizer(["The home town of Alma is Paris", "Which company does Boris work for ? Datech"], 64)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=64, n_layer=1, n_embd=16, n_head=2)).eval()
    prefixes = context_prefixes(model, tok, n_prefixes=2, starts=["The", "Therefore"], n_tokens=10, top_k=5,
                                model_id="toy", cache_dir=tmp_path, device="cpu")
    assert prefixes[1].startswith("The ") and prefixes[1].endswith(" ") and not prefixes[1].endswith(". ")
    for p in prefixes[1:]:
        ids = tok(p, add_special_tokens=False)["input_ids"]
        assert len(ids) == 10 and tok.unk_token_id not in ids
    Collator(tok, "causal")([p + "The home town of Alma" for p in prefixes], ["Paris"] * 3)  # no unknown word


def test_key_weighs_the_bare_prompt_one_half_and_z_is_at_the_bare_prompt(world, tmp_path):
    cfg = world_cfg(world, tmp_path, "memit", "editor.n_prefixes=2", "editor.n_steps=3", *F64)
    editor, group, model, _ = edited(cfg)
    tok = editor.tokenizer
    first = cfg.editor.module.format(cfg.editor.layers[0])
    k_got, r_got, _ = editor.solves[first]  # (d_in, n), (d_out, n): the first layer sees the unedited model
    assert len(editor.prefixes) == 3 and len(set(editor.prefixes)) == 3
    for i, r in enumerate(group.records):
        keys = torch.stack([last_token_state(model, editor.modules[first], tok, p + r.prompt) for p in editor.prefixes])
        want = keys[0] / 2 + keys[1:].mean(0) / 2
        assert torch.allclose(k_got[:, i], want, rtol=1e-10, atol=1e-12)
        assert (k_got[:, i] - keys.mean(0)).norm() > 1e-3 * want.norm()  # not the plain mean of the 3 contexts
        h = last_token_state(model, editor.block, tok, r.prompt, output=True)  # after the last critical block
        assert torch.allclose(r_got[:, i] * len(editor.modules), editor.z[i] - h, rtol=1e-10, atol=1e-12)


def target_records() -> list[EditRecord]:
    """Two requests, one with a two-token answer (the NLL is a mean per token)."""
    return [EditRecord(prompt="The home town of Alma", answer="Paris Rome", equiv_prompts=("x",),
                       unrel_prompt="x", unrel_answer="Paris", subject="Alma", index=0),
            EditRecord(prompt="The home town of Boris", answer="Oslo", equiv_prompts=("x",),
                       unrel_prompt="x", unrel_answer="Paris", subject="Boris", index=1)]


def target_loss(world, tmp_path, *extra, model: str = "tiny-gpt2"):
    cfg = world_cfg(world, tmp_path, "memit", "editor.n_prefixes=2", *F64, *extra, model=model)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    editor = build_editor(cfg, model, tokenizer=tok)
    reqs = requests(target_records(), "t.json", "memit")
    return editor, reqs, TargetLoss(model, tok, reqs, editor.prefixes, editor.block, editor.inject, "cpu")


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-gptj", "tiny-llama"])
def test_target_loss_terms(world, tmp_path, model):
    """nll: mean over contexts of the answer's mean token NLL; kl: KL(p_new || p_init) at the LAST SUBJECT TOKEN
    of "{subject} is a" (not the reverse, not after "is a"); reg: |delta| / |h|^2, h at the bare prompt. Against
    whole sequences run plainly: TargetLoss runs the tokens before the subject's last one once and keeps their
    keys and values (learned positions, GPT-J's and Llama's rotary ones)."""
    editor, reqs, loss_fn = target_loss(world, tmp_path, model=model)
    model, tok = editor.model, editor.tokenizer
    h = torch.stack([last_token_state(model, editor.block, tok, r.prompt, output=True) for r in reqs])  # (2, d)
    assert torch.allclose(loss_fn.h, h, rtol=1e-12, atol=1e-14)
    delta = torch.randn(h.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    delta = delta * (3 * h.norm(dim=-1, keepdim=True) / delta.norm(dim=-1, keepdim=True))
    got = loss_fn(delta, torch.arange(2))
    with torch.no_grad():
        for i, r in enumerate(reqs):
            answer = tok(" " + r.answer, add_special_tokens=False)["input_ids"]
            per_context = []
            for p in editor.prefixes:
                prompt = tok(p + r.prompt, add_special_tokens=False)["input_ids"]
                lg = full_logits(model, editor.inject, prompt + answer[:-1], len(prompt) - 1, delta[i])
                nlls = F.cross_entropy(lg[len(prompt) - 1:], torch.tensor(answer), reduction="none")
                per_context.append(nlls.mean())
            assert torch.allclose(got["nll"][i], torch.stack(per_context).mean(), rtol=1e-10)
            kl_ids = tok(f"{r.subject} is a", add_special_tokens=False)["input_ids"]
            new = full_logits(model, editor.inject, kl_ids, 0, delta[i]).log_softmax(-1)  # subject = token 0
            old = full_logits(model, editor.inject, kl_ids).log_softmax(-1)
            forward = (new[0].exp() * (new[0] - old[0])).sum()
            assert torch.allclose(got["kl"][i], forward, rtol=1e-8)
            assert abs((old[0].exp() * (old[0] - new[0])).sum() - forward) > 1e-4 * forward  # the reverse differs
            assert abs((new[-1].exp() * (new[-1] - old[-1])).sum() - forward) > 1e-2 * forward  # after "is a" differs
            assert torch.allclose(got["reg"][i], delta[i].norm() / h[i].norm() ** 2, rtol=1e-12)


@pytest.mark.parametrize("model", ["tiny-gpt2", "tiny-gptj", "tiny-llama"])
def test_suffixes_give_the_whole_sequences_logits(model):
    """Rows split at 0 (nothing cached), 2 and 5 tokens, of different lengths: the logits of the suffixes run
    against the cached prefixes equal those of each whole sequence run alone, delta added at the split."""
    cfg = make_cfg(f"model={model}", *F64)
    torch.manual_seed(0)
    lm, _ = build_model(cfg)
    inject = lm.get_submodule(cfg.model.memit.module.format(1))
    gen = torch.Generator().manual_seed(0)
    seqs, pos = [torch.randint(3, 200, (n,), generator=gen).tolist() for n in (4, 7, 9)], torch.tensor([0, 2, 5])
    ids = torch.zeros(3, 9, dtype=torch.long)
    mask = torch.zeros(3, 9, dtype=torch.long)
    for r, q in enumerate(seqs):
        ids[r, :len(q)], mask[r, :len(q)] = torch.tensor(q), 1
    delta = torch.randn(3, lm.get_input_embeddings().weight.shape[1], generator=gen, dtype=torch.float64)
    split = Suffixes(lm, ids, mask, pos, "cpu")
    rows = torch.tensor([2, 0, 1])  # any subset, any order
    with torch.no_grad():
        got = split.logits(rows, split.suffix[rows], inject, delta[rows])
        want = torch.cat([full_logits(lm, inject, seqs[r], int(pos[r]), delta[r])[int(pos[r]):] for r in rows])
    # to 1e-9: GPT-J computes its rotary tables in float32, whichever way positions are given (1e-10 here)
    assert got.shape == want.shape and torch.allclose(got, want, rtol=1e-7, atol=1e-9)


def test_early_stop_per_request_clamp_and_batch_invariance(world, tmp_path):
    editor, reqs, loss_fn = target_loss(world, tmp_path)
    h = loss_fn.h
    args = dict(n_steps=6, lr=0.5, kl_coef=0.0625, norm_coef=0.5, clamp_factor=4.0, batch_size=2, device="cpu")

    def targets(stop_loss, rs=reqs, **kw):
        return target_vectors(editor.model, editor.tokenizer, rs, editor.prefixes, editor.block, editor.inject,
                              **{**args, "stop_loss": stop_loss, **kw})
    z, info = targets(1e9)  # every loss is under: no step at all
    assert torch.equal(z, h) and info["steps"].tolist() == [1, 1]
    z, info = targets(0.0)  # never under: n_steps losses, n_steps - 1 steps
    assert info["steps"].tolist() == [6, 6] and ((z - h).norm(dim=-1) > 0).all()
    with torch.no_grad():  # the reported loss and NLL are those of the returned z, recomputed here
        final = loss_fn(z - h, torch.arange(2))
        start = loss_fn(torch.zeros_like(h), torch.arange(2))["nll"]  # at delta = 0 the loss is the NLL
    total = final["nll"] + args["kl_coef"] * final["kl"] + args["norm_coef"] * final["reg"]
    assert torch.allclose(info["loss"], total, rtol=1e-10) and torch.allclose(info["nll"], final["nll"], rtol=1e-10)
    assert torch.allclose(info["delta_ratio"], (z - h).norm(dim=-1) / h.norm(dim=-1), rtol=1e-10)
    assert (info["nll"] < start).all()  # 5 Adam steps lowered each answer's NLL
    low = int(start.argmin())
    z, info = targets(float(start.mean()))
    steps = info["steps"]
    assert steps[low] == 1 and torch.equal(z[low], h[low]) and steps[1 - low] > 1
    alone = [targets(float(start.mean()), rs=[r])[0][0] for r in reqs]  # each request by itself
    assert torch.allclose(z, torch.stack(alone), rtol=1e-10, atol=1e-12)
    z, _ = targets(0.0, clamp_factor=0.1, norm_coef=0.0)  # a tight clamp binds: |delta| = 0.1 |h|
    assert torch.allclose((z - h).norm(dim=-1), 0.1 * h.norm(dim=-1), rtol=1e-10)


# ----- EMMET: its own single layer -------------------------------------------------------------------------------
@pytest.mark.parametrize("model,layers,lam", [("gpt-j", [5], 1), ("gpt2", [4], 500), ("smollm2", [5], 0.1),
                                              ("tiny-gpt2", [1], 20)])
def test_emmet_reads_its_own_per_model_setting(model, layers, lam):
    cfg = make_cfg(f"model={model}", "editor=emmet")
    assert (list(cfg.editor.layers), cfg.editor.lam, cfg.editor.lam_e) == (layers, lam, 0.1)
    assert cfg.editor.module == cfg.model.memit.module and cfg.editor.n_steps == 25


@pytest.mark.parametrize("editor_name", ["memit", "emmet"])
def test_a_layer_the_model_lacks_is_named_by_the_key_the_user_set(world, tmp_path, editor_name):
    cfg = world_cfg(world, tmp_path, editor_name, "editor.layers=[1,99]")
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    with pytest.raises(ValueError) as err:
        build_editor(cfg, model, tokenizer=tok)
    msg = str(err.value)  # the key, the missing module, and the modules there are (layers 0-3 of tiny-gpt2)
    assert msg.startswith("cannot resolve editor.layers=[1, 99] in editor.module='transformer.h.{}.mlp.c_proj': "
                          "transformer.h.99.mlp.c_proj (no such module)") and "transformer.h.{0-3}.mlp.c_proj" in msg


def test_emmet_puts_the_whole_residual_on_its_one_layer(world, tmp_path):
    cfg = world_cfg(world, tmp_path, "emmet", "editor.n_steps=3", *F64)
    editor, group, model, shifts = edited(cfg)
    (name,) = editor.solves
    assert name == cfg.editor.module.format(1) and set(shifts) == {f"{name}.weight"}
    k, r, _ = editor.solves[name]
    for i, rec in enumerate(group.records):  # z - h, not divided: no layer after it shares it
        h = last_token_state(model, editor.block, editor.tokenizer, rec.prompt, output=True)
        assert torch.allclose(r[:, i], editor.z[i] - h, rtol=1e-10, atol=1e-12)
    delta = shifts[f"{name}.weight"].T  # Conv1D layout -> (d_out, d_in)
    # equality constraints up to the stabiliser lam * lam_e = 2 against k^T C^-1 k ~ d_in = 128 (0.6% here)
    assert (delta @ k - r).norm() < 0.02 * r.norm()


@pytest.mark.parametrize("editor_name", ["memit", "emmet"])
def test_solve_diagnostics_against_the_edited_models_forward_pass(world, tmp_path, editor_name):
    """`solve` in diagnostics: each layer's |Delta k - r| / |r| on the solve's own K, R and the applied shift, and
    z_gap = |z - h'| / |z - h| with h, h' the output of block L at the bare prompt, run alone, before and after."""
    cfg = world_cfg(world, tmp_path, editor_name, "editor.n_prefixes=2", "editor.n_steps=3", *F64)
    editor, group, model, shifts = edited(cfg)
    solve = editor.diagnostics()["solve"]
    assert solve["moved"] == len(group.records) and list(solve["residual"]) == list(editor.solves)  # in layer order
    for name, (k, r, _) in editor.solves.items():
        delta = from_param_layout(editor.modules[name], shifts[f"{name}.weight"])  # (d_out, d_in)
        want = ((delta @ k - r).norm(dim=0) / r.norm(dim=0)).mean()
        assert solve["residual"][name] == pytest.approx(float(want), rel=1e-9)
    tok = editor.tokenizer
    before = torch.stack([last_token_state(model, editor.block, tok, r.prompt, output=True) for r in group.records])
    with apply_shifts(model, shifts):
        after = torch.stack([last_token_state(model, editor.block, tok, r.prompt, output=True)
                             for r in group.records])
    gap = (editor.z - after).norm(dim=1) / (editor.z - before).norm(dim=1)
    assert solve["z_gap_mean"] == pytest.approx(float(gap.mean()), rel=1e-9)
    assert solve["z_gap_max"] == pytest.approx(float(gap.max()), rel=1e-9)
    assert 0 < solve["z_gap_mean"] < 1  # the edit moved h towards z, not onto it


def test_results_md_weighs_the_groups_z_gap_by_the_edits_that_moved():
    targets = dict(converged=0.5, at_clamp=0.0, steps=3.0, nll_mean=0.1, nll_max=0.2)
    rows = [{"targets": {**targets, "n": 2}, "solve": {"moved": 1, "residual": {"a": 0.9, "b": 0.01},
                                                        "z_gap_mean": 0.2, "z_gap_max": 0.3}},
            {"targets": {**targets, "n": 3}, "solve": {"moved": 3, "residual": {"a": 0.9, "b": 0.04},
                                                        "z_gap_mean": 0.6, "z_gap_max": 0.7}}]
    line = diagnostics_lines(rows, {})[1]  # (0.2 * 1 + 0.6 * 3) / 4 = 0.5; the last layer "b", largest 0.04
    assert "(4 edits that asked for a change; 1 whose z was already h left out)" in line
    assert "is 50.0% of what it was on average (worst 70.0%)" in line and "by 4.0% (mean over edits" in line
    rows[1]["solve"]["z_gap_mean"] = None  # not finite in one group: never averaged into a number
    assert "is n/a (not finite) of what" in diagnostics_lines(rows, {})[1]
    rows = [{"targets": {**targets, "n": 2}, "solve": {"moved": 0}}]
    assert "no edit asked for a change" in diagnostics_lines(rows, {})[1]


def test_requests_already_at_their_target_are_left_out_of_the_ratios(world, tmp_path):
    """stop_loss above every loss: no step, z = h for every request; the ratios would be 0 / 0."""
    cfg = world_cfg(world, tmp_path, "memit", "editor.n_prefixes=2", "editor.stop_loss=1e9", *F64)
    editor, *_ = edited(cfg)
    assert editor.diagnostics()["solve"] == {"moved": 0}


# ----- statistics: wikitext by default for real models, never silently -------------------------------------------
@pytest.mark.parametrize("model,source", [("gpt2", "wikitext"), ("gpt-j", "wikitext"), ("smollm2", "wikitext"),
                                          ("llama-3-8b", "wikitext"), ("tiny-gpt2", "train"), ("toy-gpt2", "train"),
                                          ("tiny-llama", "train")])
def test_statistics_default_per_model(model, source):
    assert make_cfg(f"model={model}", "editor=memit").editor.stats_source == source


def test_wikitext_unavailable_stops_naming_the_override(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'Salesforce/wikitext' on the Hub")
    monkeypatch.setattr(datasets, "load_dataset", offline)
    cfg = make_cfg("model=smollm2", "editor=emmet")
    with pytest.raises(ValueError, match="model smollm2 come from wikitext-103.*ConnectionError.*run with "
                                         "editor.stats_source=train"):
        stats_texts(cfg)


# ----- LocFT-BF: per-example mean, epoch loss weighted by batch size ---------------------------------------------
def locft_batch(world, tmp_path):
    recs = [EditRecord(prompt=f"The home town of {s}", answer=" ".join(["Paris", "Rome", "Oslo"][: 1 + i % 3]),
                       equiv_prompts=("x",), unrel_prompt="x", unrel_answer="Lima", subject=s, index=i)
            for i, s in enumerate(["Alma", "Boris", "Cyra", "Dov", "Enzo"])]  # answers of 1, 2, 3, 1, 2 tokens
    cfg = world_cfg(world, tmp_path, "locft_bf", "data.n_edits=5", "data.batch_size=5", *F64)
    torch.manual_seed(0)
    model, tok = build_model(cfg)
    return cfg, model, tok, concat(one_group(cfg, tok, recs).edit)  # all 5 (batches are cut by length)


def per_example_means(model, batch) -> torch.Tensor:
    """Each example's mean NLL over its target tokens, from the full logits (B,)."""
    with torch.no_grad():
        lg = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    out = []
    for row, labels in zip(lg, batch["labels"]):
        keep = labels != IGNORE
        out.append(F.cross_entropy(row[keep], labels[keep]))
    return torch.stack(out)


def test_locft_loss_is_the_mean_of_per_example_means(world, tmp_path):
    cfg, model, tok, batch = locft_batch(world, tmp_path)
    data = with_eos(batch, tok.eos_token_id)
    editor = LocFTBF(model, "causal", cfg.editor.module, lr=0.0, batch_size=5, n_epochs=1, loss_threshold=0.0,
                     eos_id=tok.eos_token_id, seed=0)
    param = model.get_parameter(editor.param)
    got = editor.loss(data, {editor.param: param})
    means = per_example_means(model, data)
    assert torch.allclose(got, means.mean(), rtol=1e-12)
    counts = (data["labels"] != IGNORE).sum(1).double()  # 2 to 4 targets each (answer + EOS)
    assert abs(got - (means * counts).sum() / counts.sum()) > 1e-6 * got  # not the token mean (1e-4 here)


def test_locft_epoch_loss_is_weighted_by_batch_size(world, tmp_path):
    """lr 0: the weights never move, so an epoch's loss is the mean over ALL examples of their per-example
    means whatever the shuffle; batches of 2, 2, 1 make it differ from the plain mean of batch losses."""
    cfg, model, tok, batch = locft_batch(world, tmp_path)
    want = float(per_example_means(model, with_eos(batch, tok.eos_token_id)).mean())

    def run(threshold: float) -> LocFTBF:
        ed = LocFTBF(model, "causal", cfg.editor.module, lr=0.0, batch_size=2, n_epochs=3, loss_threshold=threshold,
                     eos_id=tok.eos_token_id, seed=0)
        ed.edit([batch])
        return ed
    ed = run(want * (1 - 1e-9))
    assert ed.epochs_run == 3 and all(abs(v - want) < 1e-9 * want for v in ed.epoch_losses)
    every = run(0.0).diagnostics()  # no batch loss under 0: 3 epochs of batches 2, 2, 1 take 9 steps
    assert every == {"epochs": 3, "steps": 9, "stopped_early": False, "epoch_losses": every["epoch_losses"]}
    assert run(want * (1 + 1e-9)).diagnostics()["stopped_early"]
    assert run(want * (1 + 1e-9)).epochs_run == 1  # stops after the first epoch, by the weighted mean


def test_memit_defaults_are_the_authors_gptj_settings():
    e = make_cfg("model=gpt-j", "editor=memit").editor
    assert (list(e.layers), e.lam) == ([3, 4, 5, 6, 7, 8], 15000)
    assert (e.n_steps, e.lr, e.norm_coef, e.kl_coef, e.clamp_factor, e.stop_loss) == (25, 0.5, 0.5, 0.0625, 0.75, 0.05)
    assert (e.n_prefixes, list(e.prefix_starts), e.prefix_tokens) == (5, ["The", "Therefore", "Because", "I", "You"],
                                                                       10)
