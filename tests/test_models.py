"""model/: loading tiny and real-structure LMs offline, tokenizers, module resolution, checkpoints."""
import re
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from torch import nn
from transformers import (BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, GPTJConfig,
                          GPTJForCausalLM, T5Config, T5ForConditionalGeneration)
from transformers.pytorch_utils import Conv1D

from model.classifier import BertClassifier
from model.load import _ranges, linear_module_groups, load_model, resolve_modules

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "config" / "model"
GPT2_TOKENIZER = Path(__file__).resolve().parents[2] / "shared" / "data" / "gpt2-tokenizer"
KEYS = {"name", "arch", "family", "name_or_path", "tokenizer", "dtype", "tiny", "checkpoint", "device_map",
        "edit_modules", "first_ffn_modules", "ft_modules"}
TINY = ["tiny-gpt2", "tiny-gptj", "tiny-bert", "tiny-t5"]
REAL = ["gpt2", "bert-base", "t5-xl", "gpt-j"]
TEXTS = ["the capital of France is", "hi"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def cfg_of(name: str) -> dict:
    """The YAML config file as a plain dict."""
    return yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())


def load(cfg: dict, **over) -> tuple[nn.Module, object]:
    """load_model called with the config's keys, `over` replacing some."""
    kw = {k: cfg[k] for k in ("arch", "family", "name_or_path", "tokenizer", "dtype", "tiny",
                              "checkpoint")}
    kw.update(over)
    return load_model(**kw)


def forward(model: nn.Module, family: str, batch: dict) -> torch.Tensor:
    """Logits of one forward pass (seq2seq: teacher-forced on the input ids as labels)."""
    if family == "seq2seq":
        return model(**batch, labels=batch["input_ids"]).logits
    out = model(**batch)
    return out if family == "classifier" else out.logits


LLAMA = ["tiny-llama", "smollm2", "llama-3.2-1b", "qwen2.5-0.5b", "llama-3-8b"]  # tests/test_llama.py builds them


@pytest.mark.parametrize("name", TINY + REAL + LLAMA)
def test_config_has_all_keys(name):
    cfg = cfg_of(name)
    # the comparison editors: LocFT-BF's module everywhere, MEMIT/EMMET's settings on causal LMs;
    # smollm2 also names the GGUF file it is converted from, and its last 12 blocks' down_proj (a capacity variant)
    extra = ({"memit"} if cfg["family"] == "causal" else set()) | ({"gguf", "wide_edit_modules"} if name == "smollm2"
                                                                 else set())
    assert set(cfg) == KEYS | {"locft_module"} | extra
    assert cfg["name"] == name
    assert (cfg["tiny"] is None) == (cfg["name_or_path"] is not None or cfg.get("gguf") is not None)
    assert cfg["edit_modules"] and cfg["ft_modules"]


@pytest.mark.parametrize("name", TINY)
def test_tiny_builds_runs_and_resolves(name):
    cfg = cfg_of(name)
    torch.manual_seed(0)
    model, tok = load(cfg)
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert {p.dtype for p in model.parameters()} == {DTYPES[cfg["dtype"]]}
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    logits = forward(model, cfg["family"], batch)
    b, t = batch["input_ids"].shape
    if cfg["family"] == "classifier":
        assert logits.shape == (b,)
    else:
        assert logits.shape == (b, t, len(tok))
    assert torch.isfinite(logits.float()).all()
    for key in ("edit_modules", "first_ffn_modules", "ft_modules"):
        mods = resolve_modules(model, cfg[key])
        assert list(mods) == cfg[key]
        assert all(mods[n] is model.get_submodule(n) for n in cfg[key])
        assert all(isinstance(m, (nn.Linear, Conv1D)) for m in mods.values())


def test_tiny_gptj_is_bfloat16():
    model, _ = load(cfg_of("tiny-gptj"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def test_tiny_build_follows_torch_seed():
    cfg = cfg_of("tiny-gpt2")
    states = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        states.append(load(cfg)[0].transformer.h[0].mlp.c_fc.weight.clone())
    assert torch.equal(states[0], states[1])
    assert not torch.equal(states[0], states[2])


def test_gpt_tokenizer_specials():
    for name in ("tiny-gpt2", "tiny-gptj"):
        model, tok = load(cfg_of(name))
        assert tok.eos_token == tok.bos_token == "<|endoftext|>"
        assert tok.pad_token_id == tok.eos_token_id == len(tok) - 1 == 256
        assert model.config.vocab_size == len(tok)
        assert tok.model_max_length == cfg_of(name)["tiny"]["n_positions"]
        ids = tok(["héllo wörld"])["input_ids"][0]
        assert len(ids) == len("héllo wörld".encode())  # one token per byte, no specials added
        assert tok.decode(ids) == "héllo wörld"
        assert tok.padding_side == "right"


def test_t5_tokenizer_appends_eos():
    model, tok = load(cfg_of("tiny-t5"))
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    ids = tok("abc")["input_ids"]
    assert len(ids) == 4 and ids[-1] == 1
    assert tok.decode(ids, skip_special_tokens=True) == "abc"
    assert model.config.decoder_start_token_id == 0 and model.config.pad_token_id == 0
    assert model.config.feed_forward_proj == "gated-gelu"


def test_bert_tokenizer_wraps_cls_sep():
    model, tok = load(cfg_of("tiny-bert"))
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id,
            tok.mask_token_id] == [0, 1, 2, 3, 4]
    ids = tok("abc")["input_ids"]
    assert ids[0] == tok.cls_token_id and ids[-1] == tok.sep_token_id and len(ids) == 5
    assert tok.decode(ids, skip_special_tokens=True) == "abc"
    assert isinstance(model, BertClassifier) and model.bert.config.vocab_size == len(tok)


def test_classifier_reads_first_token():
    model, tok = load(cfg_of("tiny-bert"))
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    logits = model(**batch, labels=torch.ones(2))  # extra batch keys are ignored
    cls_state = model.bert(**batch).last_hidden_state[:, 0]  # (B, d)
    torch.testing.assert_close(logits, model.head(cls_state).squeeze(-1))
    assert logits.shape == (2,)


def test_resolve_bad_name_lists_available():
    model, _ = load(cfg_of("tiny-gpt2"))
    with pytest.raises(ValueError) as err:
        resolve_modules(model, ["transformer.h.3.mlp.c_proj", "transformer.h.9.mlp.c_proj"])
    msg = str(err.value)
    assert "transformer.h.9.mlp.c_proj" in msg and "transformer.h.3.mlp.c_proj (" not in msg
    for group in ("transformer.h.{0-3}.mlp.c_proj", "transformer.h.{0-3}.mlp.c_fc",
                  "transformer.h.{0-3}.attn.c_attn", "lm_head"):
        assert group in msg
    with pytest.raises(ValueError, match="not Linear/Conv1D"):
        resolve_modules(model, ["transformer.h.0.mlp"])


def group_regex(group: str) -> re.Pattern:
    """Regex matching the names a folded group stands for: '{0-2,5}' -> '(0|1|2|5)'."""
    def expand(ranges: str) -> str:
        idx = [i for part in ranges.split(",")
               for i in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
        return "(" + "|".join(map(str, idx)) + ")"
    pieces = re.split(r"\{([^}]*)\}", group)  # literal, ranges, literal, ranges, ..., literal
    return re.compile("^" + "".join(re.escape(p) if i % 2 == 0 else expand(p)
                                    for i, p in enumerate(pieces)) + "$")


def test_linear_module_groups_cover_every_linear():
    model, _ = load(cfg_of("tiny-t5"))
    groups = linear_module_groups(model)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))]
    patterns = [group_regex(g) for g in groups]
    assert all(any(p.match(n) for p in patterns) for n in names)
    assert not any(p.match("encoder.block.3.layer.1.DenseReluDense.wo") for p in patterns)
    assert len(groups) < len(names)
    assert _ranges([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.mark.parametrize("fmt", ["safetensors", "pt", "pt-wrapped"])
def test_classifier_checkpoint_round_trip(tmp_path, fmt):
    cfg = cfg_of("tiny-bert")
    torch.manual_seed(0)
    trained, tok = load(cfg)
    state = {k: v.contiguous() for k, v in trained.state_dict().items()}
    path = tmp_path / ("ckpt.safetensors" if fmt == "safetensors" else "ckpt.pt")
    if fmt == "safetensors":
        save_file(state, str(path))
    else:
        torch.save({"model": state, "step": 3} if fmt == "pt-wrapped" else state, path)
    torch.manual_seed(1)  # a different random init, so only the checkpoint can make outputs match
    loaded, _ = load(cfg, checkpoint=str(path))
    torch.manual_seed(1)
    fresh, _ = load(cfg)
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    assert torch.equal(loaded(**batch), trained(**batch))
    assert not torch.allclose(fresh(**batch), trained(**batch))
    assert all(not p.requires_grad for p in loaded.parameters())


def test_checkpoint_errors_name_the_file(tmp_path):
    cfg = cfg_of("tiny-bert")
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load(cfg, checkpoint=str(missing))
    bad = tmp_path / "other.pt"
    torch.save({"head.weight": torch.zeros(1, 32)}, bad)
    with pytest.raises(ValueError, match="other.pt") as err:
        load(cfg, checkpoint=str(bad))
    assert "bert.embeddings.word_embeddings.weight" in str(err.value)  # names a missing key


def test_load_argument_errors():
    cfg = cfg_of("tiny-gpt2")
    with pytest.raises(ValueError, match="arch"):
        load(cfg, arch="mamba")
    with pytest.raises(ValueError, match="family"):
        load(cfg, family="seq2seq")
    with pytest.raises(ValueError, match="dtype"):
        load(cfg, dtype="int8")
    with pytest.raises(ValueError, match="n_layers"):
        load(cfg, tiny={"n_layers": 2, "n_embd": 32, "n_head": 2})
    with pytest.raises(ValueError, match="exactly one"):
        load(cfg, tiny=None)


@pytest.mark.skipif(not GPT2_TOKENIZER.is_dir(), reason="shared gpt2-tokenizer absent")
def test_real_gpt2_tokenizer_with_tiny_gpt2():
    model, tok = load(cfg_of("tiny-gpt2"), tokenizer=str(GPT2_TOKENIZER))
    assert len(tok) == 50257 and model.config.vocab_size == 50257
    assert tok.pad_token_id == tok.eos_token_id == 50256
    assert tok.model_max_length == cfg_of("tiny-gpt2")["tiny"]["n_positions"]  # clamped to the model's positions
    assert tok("Hello world")["input_ids"] == [15496, 995]
    batch = tok(TEXTS, return_tensors="pt", padding=True)
    assert model(**batch).logits.shape == (2, batch["input_ids"].shape[1], 50257)


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-t5", "tiny-bert"])
def test_pretrained_path_from_local_dir(tmp_path, name):
    """The real-model path (from_pretrained on name_or_path, tokenizer from the same dir), offline."""
    cfg = cfg_of(name)
    torch.manual_seed(0)
    tiny, tok = load(cfg)
    (tiny.bert if cfg["arch"] == "bert" else tiny).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    real, tok2 = load(cfg, name_or_path=str(tmp_path), tiny=None)
    assert type(real) is type(tiny) and tok2(TEXTS)["input_ids"] == tok(TEXTS)["input_ids"]
    assert all(not p.requires_grad for p in real.parameters())
    batch = tok2(TEXTS, return_tensors="pt", padding=True)
    if cfg["arch"] == "bert":  # the head is not part of the encoder dir: compare encoder states
        torch.testing.assert_close(real.bert(**batch).last_hidden_state,
                                   tiny.bert(**batch).last_hidden_state)
    else:
        torch.testing.assert_close(forward(real, cfg["family"], batch),
                                   forward(tiny, cfg["family"], batch))


def real_structure(arch: str) -> tuple[nn.Module, int]:
    """The real model's depth and module layout at tiny widths (no download), and its depth."""
    if arch == "gpt2":  # openai-community/gpt2: 12 blocks
        return GPT2LMHeadModel(GPT2Config(n_layer=12, n_embd=16, n_head=2, n_positions=32,
                                          vocab_size=64)), 12
    if arch == "gptj":  # EleutherAI/gpt-j-6b: 28 layers
        return GPTJForCausalLM(GPTJConfig(n_layer=28, n_embd=16, n_head=2, rotary_dim=4,
                                          n_positions=32, vocab_size=64)), 28
    if arch == "t5":  # google/t5-xl-ssm-nq: 24 + 24 blocks, gated-gelu FFN (T5 v1.1)
        return T5ForConditionalGeneration(T5Config(
            num_layers=24, d_model=16, d_ff=32, num_heads=2, d_kv=8, vocab_size=64,
            feed_forward_proj="gated-gelu", decoder_start_token_id=0)), 24
    # google-bert/bert-base-uncased: 12 layers
    return BertClassifier(BertModel(BertConfig(num_hidden_layers=12, hidden_size=16,
                                               num_attention_heads=2, intermediate_size=32,
                                               vocab_size=64), add_pooling_layer=False)), 12


@pytest.mark.parametrize("name", REAL)
def test_real_config_modules_exist(name):
    cfg = cfg_of(name)
    model, depth = real_structure(cfg["arch"])
    for key in ("edit_modules", "first_ffn_modules", "ft_modules"):
        assert len(resolve_modules(model, cfg[key])) == len(cfg[key])
    # Table 1's "edit first FC in FFN": the first FFN layer of the same blocks as edit_modules
    blocks = lambda key: {re.match(r"(.*?\.\d+)\.", n).group(1) for n in cfg[key]}  # noqa: E731
    assert blocks("first_ffn_modules") == blocks("edit_modules")
    # Paper 5.1: the edited layers are the LAST blocks (6; T5: 3 per stack).
    stacks: dict[str, list[int]] = {}
    for n in cfg["edit_modules"]:
        prefix, idx = re.match(r"(.*?)\.(\d+)\.", n).groups()
        stacks.setdefault(prefix, []).append(int(idx))
    per_stack = 3 if cfg["arch"] == "t5" else 6
    assert all(sorted(ix) == list(range(depth - per_stack, depth)) for ix in stacks.values())
    assert len(stacks) == (2 if cfg["arch"] == "t5" else 1)
