"""Load the edited LM (real or tiny random) with its tokenizer, and resolve edit-module names."""
import re
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          BertModel, GPT2LMHeadModel, GPTJForCausalLM, PreTrainedTokenizerBase,
                          T5ForConditionalGeneration)
from transformers.pytorch_utils import Conv1D

from model.classifier import BertClassifier
from model.tiny import byte_tokenizer, context_size, tiny_config

FAMILIES = ("causal", "seq2seq", "classifier")
ARCH_FAMILY = {"gpt2": "causal", "gptj": "causal", "t5": "seq2seq", "bert": "classifier"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
TINY_CLASSES = {"gpt2": GPT2LMHeadModel, "gptj": GPTJForCausalLM, "t5": T5ForConditionalGeneration}
# Default context of the tiny byte tokenizer when the sizes do not give one (T5: relative positions).
TINY_DEFAULT_CONTEXT = 512


def load_model(arch: str, family: str, name_or_path: str | None, tokenizer: str | None, dtype: str,
               tiny: dict | None = None, checkpoint: str | None = None, device: str = "cpu"
               ) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load (or build tiny, random) the LM and its tokenizer, eval mode, all params requires_grad=False."""
    if arch not in ARCH_FAMILY:
        raise ValueError(f"unknown model.arch {arch!r}; expected one of {sorted(ARCH_FAMILY)}")
    if family != ARCH_FAMILY[arch]:
        raise ValueError(f"model.family {family!r} does not match arch {arch!r} "
                         f"(expected {ARCH_FAMILY[arch]!r}; families: {FAMILIES})")
    if dtype not in DTYPES:
        raise ValueError(f"unknown model.dtype {dtype!r}; expected one of {sorted(DTYPES)}")
    if (tiny is None) == (name_or_path is None):
        raise ValueError("set exactly one of model.name_or_path (real weights) and model.tiny "
                         f"(random tiny model); got name_or_path={name_or_path!r}, tiny={tiny!r}")
    torch_dtype = DTYPES[dtype]

    tok = _load_tokenizer(arch, name_or_path, tokenizer, tiny)
    if tiny is not None:
        model = _build_tiny(arch, dict(tiny), tok)
    elif arch == "bert":
        # No pooler: the head reads the raw [CLS] state, so pooler weights would be dead parameters.
        model = BertClassifier(AutoModel.from_pretrained(name_or_path, dtype=torch_dtype,
                                                         add_pooling_layer=False))
    elif family == "causal":
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=torch_dtype)
    else:
        model = AutoModelForSeq2SeqLM.from_pretrained(name_or_path, dtype=torch_dtype)

    if arch in ("gpt2", "gptj") and tok.pad_token is None:
        tok.pad_token = tok.eos_token  # right padding; attention masks hide the pad positions
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    # Clamp (never raise) the tokenizer's limit to what the positions table can hold.
    ctx = context_size(model.config)
    if tok.model_max_length is None or tok.model_max_length > ctx:
        tok.model_max_length = ctx

    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
    model = model.to(dtype=torch_dtype, device=device)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # editors create their own leaf tensors
    return model, tok


def _load_tokenizer(arch: str, name_or_path: str | None, tokenizer: str | None,
                    tiny: dict | None) -> PreTrainedTokenizerBase:
    """Tokenizer from `tokenizer`, else from the model path, else (tiny) an offline byte tokenizer."""
    source = tokenizer if tokenizer is not None else name_or_path
    if source is not None:
        return AutoTokenizer.from_pretrained(source)
    sizes = tiny or {}
    ctx = sizes.get("n_positions", sizes.get("max_position_embeddings", TINY_DEFAULT_CONTEXT))
    return byte_tokenizer(arch, int(ctx))


def _build_tiny(arch: str, sizes: dict, tok: PreTrainedTokenizerBase) -> nn.Module:
    """Randomly initialised `arch` model (torch's current RNG) sized by `sizes`, vocab = len(tok)."""
    eos = tok.eos_token_id if tok.eos_token_id is not None else tok.sep_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    config = tiny_config(arch, sizes, vocab_size=len(tok), pad_id=pad, eos_id=eos)
    if arch == "bert":
        return BertClassifier(BertModel(config, add_pooling_layer=False))
    return TINY_CLASSES[arch](config)


def _load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a full state dict (.safetensors, or torch file: plain or under key "model") into `model`."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"model.checkpoint file not found: {file}")
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file
        state = load_file(str(file))
    else:
        state = torch.load(file, map_location="cpu", weights_only=True)
        if isinstance(state, dict) and isinstance(state.get("model"), dict):
            state = state["model"]
    if not isinstance(state, dict):
        raise ValueError(f"model.checkpoint {file} does not hold a state dict (got {type(state)})")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        theirs, ours = set(state), set(model.state_dict())
        raise ValueError(
            f"model.checkpoint {file} does not match {type(model).__name__}: "
            f"missing {sorted(ours - theirs)[:8]}, unexpected {sorted(theirs - ours)[:8]} "
            f"({err.__class__.__name__}: {str(err)[:500]})") from err


def resolve_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """Map configured module names to nn.Linear / transformers Conv1D modules."""
    found, bad = {}, []
    for name in names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            bad.append(f"{name} (no such module)")
            continue
        if not isinstance(module, (nn.Linear, Conv1D)):
            bad.append(f"{name} (is {type(module).__name__}, not Linear/Conv1D)")
            continue
        found[name] = module
    if bad:
        raise ValueError("cannot resolve model.edit_modules / ft_modules: " + "; ".join(bad)
                         + "\navailable Linear/Conv1D modules:\n  "
                         + "\n  ".join(linear_module_groups(model)))
    return found


def linear_module_groups(model: nn.Module) -> list[str]:
    """All Linear/Conv1D module names, layer indices folded: 'transformer.h.{0-11}.mlp.c_proj'."""
    groups: dict[str, list[set[int]]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, Conv1D)):
            continue
        parts = name.split(".")
        template = ".".join("#" if p.isdigit() else p for p in parts)
        slots = groups.setdefault(template, [set() for p in parts if p.isdigit()])
        for slot, idx in zip(slots, (int(p) for p in parts if p.isdigit())):
            slot.add(idx)
    out = []
    for template, slots in groups.items():
        it = iter(slots)
        out.append(re.sub("#", lambda _: "{" + _ranges(sorted(next(it))) + "}", template))
    return out


def _ranges(idx: list[int]) -> str:
    """Compact sorted ints: [0,1,2,5] -> '0-2,5'."""
    spans, start = [], idx[0]
    for a, b in zip(idx, idx[1:] + [None]):
        if b != a + 1:
            spans.append(str(start) if start == a else f"{start}-{a}")
            start = b
    return ",".join(spans)
