"""Load the edited LM (real or tiny random) with its tokenizer, and resolve edit-module names."""
import functools
import logging
import re
import threading
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoModel, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer,
                          BertModel, GPT2LMHeadModel, GPTJForCausalLM, LlamaForCausalLM, PreTrainedTokenizerBase,
                          T5ForConditionalGeneration)
from transformers.pytorch_utils import Conv1D

from model.classifier import BertClassifier
from model.tiny import CAUSAL, byte_tokenizer, context_size, tiny_config

FAMILIES = ("causal", "seq2seq", "classifier")
# llama: any Llama-family causal LM (Llama, Qwen2, Mistral, ...): AutoModelForCausalLM reads the real class
# from the checkpoint's config; nn.Linear FFN mlp.up_proj / gate_proj / down_proj. Its tiny twin is a Llama.
ARCH_FAMILY = {"gpt2": "causal", "gptj": "causal", "llama": "causal", "t5": "seq2seq", "bert": "classifier"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          "float64": torch.float64}
TINY_CLASSES = {"gpt2": GPT2LMHeadModel, "gptj": GPTJForCausalLM, "llama": LlamaForCausalLM,
                "t5": T5ForConditionalGeneration}
# Default context of the tiny byte tokenizer when the sizes do not give one (T5: relative positions).
TINY_DEFAULT_CONTEXT = 512
# Seconds the hub may take to answer before a hub name missing from the cache is refused.
HUB_PROBE_TIMEOUT = 5.0


def load_model(arch: str, family: str, name_or_path: str | None, tokenizer: str | None, dtype: str,
               tiny: dict | None = None, checkpoint: str | None = None, device: str = "cpu",
               device_map: str | dict | None = None) -> tuple[nn.Module, PreTrainedTokenizerBase]:
    """Load (or build tiny, random) the LM and its tokenizer, eval mode, all params requires_grad=False.

    device_map None: the whole model on `device`. Else ("auto", "balanced", or {module: device}) accelerate
    places its modules across devices and its hooks carry activations between them; `device` is then only
    where callers put batches. Every module must stay resident (offloading to cpu/disk is refused)."""
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
    if device_map is not None and family == "classifier":
        raise ValueError("model.device_map: the FEVER classifier (encoder + head) loads on one device; "
                         "set model.device_map=null")
    torch_dtype = DTYPES[dtype]

    tok = _load_tokenizer(arch, name_or_path, tokenizer, tiny)
    if tiny is not None:
        model = _build_tiny(arch, dict(tiny), tok)
    elif arch == "bert":
        # No pooler: the head reads the raw [CLS] state, so pooler weights would be dead parameters.
        model = BertClassifier(_pretrained(AutoModel.from_pretrained, name_or_path, "model.name_or_path",
                                           dtype=torch_dtype, add_pooling_layer=False))
    else:
        auto = AutoModelForCausalLM if family == "causal" else AutoModelForSeq2SeqLM
        model = _pretrained(auto.from_pretrained, name_or_path, "model.name_or_path", dtype=torch_dtype,
                            device_map=device_map)

    if arch in CAUSAL and tok.pad_token is None:
        tok.pad_token = tok.eos_token  # right padding; attention masks hide the pad positions
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tok.pad_token_id
    # Clamp (never raise) the tokenizer's limit to what the positions table can hold.
    ctx = context_size(model.config)
    if tok.model_max_length is None or tok.model_max_length > ctx:
        tok.model_max_length = ctx

    if checkpoint is not None:
        _load_checkpoint(model, checkpoint)
    if device_map is None:
        model = model.to(dtype=torch_dtype, device=device)
    elif tiny is not None:  # real models were placed by from_pretrained
        model = _dispatch(model.to(dtype=torch_dtype), device_map)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)  # editors create their own leaf tensors
    if device_map is not None:
        check_resident(model)
    return model, tok


def _dispatch(model: nn.Module, device_map: str | dict) -> nn.Module:
    """Place a tiny model by `device_map` through accelerate, as from_pretrained(device_map=...) does.

    force_hooks: accelerate attaches its hooks even when the map names one device, so that a CPU-only
    machine runs the same hooked forward passes as a model sharded across GPUs."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.utils import get_balanced_memory
    if isinstance(device_map, str):  # "auto" / "balanced": accelerate's planner over the visible devices
        no_split = model._no_split_modules
        memory = get_balanced_memory(model, no_split_module_classes=no_split)
        device_map = infer_auto_device_map(model, max_memory=memory, no_split_module_classes=no_split)
    # accelerate warns "offloaded to the cpu" whenever a map names the cpu, also when the cpu is where those
    # modules run (nothing offloaded); check_resident catches real offloading
    quiet = logging.getLogger("accelerate.big_modeling")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        return dispatch_model(model, device_map=dict(device_map), force_hooks=True)
    finally:
        quiet.setLevel(level)


def check_resident(model: nn.Module) -> None:
    """Refuse a device map that offloads weights: accelerate then keeps them on the meta device and swaps
    them in per forward pass, which would overwrite the editors' weights (functional_call, apply_shifts)."""
    offloaded = sorted({n.rsplit(".", 1)[0] for n, p in model.named_parameters() if p.device.type == "meta"})
    if offloaded:
        raise ValueError(f"model.device_map offloaded {len(offloaded)} modules to cpu/disk (e.g. {offloaded[:3]}); "
                         "editors change weights in place and need every module resident on a device: give the "
                         "model more GPU memory (more GPUs, model.dtype=bfloat16) or an explicit device map")


def _pretrained(load, source: str, key: str, **kwargs):
    """load(source, **kwargs) (a from_pretrained); a hub name that cannot be fetched (no network, HF_HUB_OFFLINE,
    a wrong or gated name) stops with one message naming `key` and the override for a local folder.

    A hub name is looked up in the local cache first; only on a miss is the hub probed (once per process, a few
    seconds at most) before the download, because huggingface_hub retries an unreachable hub for about a minute."""
    if Path(source).is_dir():  # a local folder: its own error says what is missing
        return load(source, **kwargs)
    from huggingface_hub import constants
    try:
        if constants.is_offline_mode():  # HF_HUB_OFFLINE: the cache alone, no retries
            return load(source, **kwargs)
        try:
            return load(source, local_files_only=True, **kwargs)
        except OSError:  # not (fully) in the cache: download it, if the hub answers
            unreachable = hub_unreachable(constants.ENDPOINT)
            if unreachable:
                raise OSError(f"{constants.ENDPOINT} cannot be reached: {unreachable}") from None
        return load(source, **kwargs)
    except OSError as err:  # transformers turns every hub failure into an OSError
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(f"{key}={source}: not a local folder, and the Hugging Face hub cannot provide it "
                         f"({reason}). Download it where there is a network (e.g. `hf download {source} "
                         f"--local-dir DIR`) and pass {key}=/path/to/folder") from err


@functools.cache
def hub_unreachable(endpoint: str, timeout: float = HUB_PROBE_TIMEOUT) -> str | None:
    """Why `endpoint` (HF_ENDPOINT) does not answer one HEAD request within `timeout` s, or None if it does.

    A status below 500 is an answer; 5xx (a gateway, an outage) is what huggingface_hub would retry for a
    minute. huggingface_hub's session, so its proxies and client factory apply; run in a daemon thread because
    name resolution does not obey the request's timeout."""
    from huggingface_hub import get_session
    outcome = []

    def probe():
        try:
            status = get_session().head(endpoint, timeout=timeout).status_code
            outcome.append(f"it answers HTTP {status}" if status >= 500 else None)
        except Exception as err:  # connection, DNS, TLS, proxy: all mean the download would fail too
            outcome.append(str(err).strip() or type(err).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def _load_tokenizer(arch: str, name_or_path: str | None, tokenizer: str | None,
                    tiny: dict | None) -> PreTrainedTokenizerBase:
    """Tokenizer from `tokenizer`, else from the model path, else (tiny) an offline byte tokenizer."""
    source = tokenizer if tokenizer is not None else name_or_path
    if source is not None:
        return _pretrained(AutoTokenizer.from_pretrained, source,
                           "model.tokenizer" if tokenizer is not None else "model.name_or_path")
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


def resolve_modules(model: nn.Module, names: list[str], key: str = "editor.modules") -> dict[str, nn.Module]:
    """Map configured module names to nn.Linear / transformers Conv1D modules; ValueError naming the config
    `key` the names came from and listing the model's Linear/Conv1D modules if one cannot be resolved."""
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
        raise ValueError(f"cannot resolve {key}: " + "; ".join(bad)
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
