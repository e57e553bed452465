"""MEMIT's target vectors as its authors computed them: the generated context prefixes, the keys,
the target loss (NLL, KL, norm term), its cached-prefix Suffixes, early stop and clamp, and MEMIT's defaults, each
against a computation written here from the model's plain forward pass (full logits, hooks, positions counted by
hand), on tiny models in float64. EMMET, the solve and LocFT-BF: tests/test_memit_rules.py.

The world is tests/test_located.py's (the `world` fixture, tests/helpers.py): word-level tokens, so the subject
of "The home town of {s}" is the LAST token of every context and the FIRST of "{s} is a", positions this file
counts without the editor.
"""
import pytest
import torch
import torch.nn.functional as F

from data.records import EditRecord
from data.subjects import requests
from editor.locate import Suffixes, TargetLoss, context_prefixes, target_vectors
from pipeline.experiment import build_editor
from tests.helpers import F64, build_model, edited, last_token_state, make_cfg, world_cfg


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


# ----- MEMIT's defaults --------------------------------------------------------------------------------------
def test_memit_defaults_are_the_authors_gptj_settings():
    e = make_cfg("model=gpt-j", "editor=memit").editor
    assert (list(e.layers), e.lam) == ([3, 4, 5, 6, 7, 8], 15000)
    assert (e.n_steps, e.lr, e.norm_coef, e.kl_coef, e.clamp_factor, e.stop_loss) == (25, 0.5, 0.5, 0.0625, 0.75, 0.05)
    assert (e.n_prefixes, list(e.prefix_starts), e.prefix_tokens) == (5, ["The", "Therefore", "Because", "I", "You"],
                                                                       10)
