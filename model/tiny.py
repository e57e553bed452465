"""Offline byte-level tokenizers and tiny random configs for the tiny-* model configs."""
import inspect

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import BertConfig, GPT2Config, GPTJConfig, LlamaConfig, PretrainedConfig, PreTrainedTokenizerFast
from transformers import T5Config

CAUSAL = ("gpt2", "gptj", "llama")  # decoder-only archs: one <|endoftext|> for bos, eos, unk (and pad)
# Special tokens per architecture, in vocabulary order. For the causal archs they go AFTER the 256
# bytes (like GPT-2, where <|endoftext|> is the last id); for t5/bert BEFORE them (pad must be id 0).
SPECIALS = {
    "gpt2": ["<|endoftext|>"],
    "gptj": ["<|endoftext|>"],
    "llama": ["<|endoftext|>"],  # as SmolLM2's own vocabulary; real Llama 3 names it <|end_of_text|>
    "t5": ["<pad>", "</s>", "<unk>"],
    "bert": ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
}

CONFIG_CLASSES: dict[str, type[PretrainedConfig]] = {
    "gpt2": GPT2Config, "gptj": GPTJConfig, "llama": LlamaConfig, "t5": T5Config, "bert": BertConfig,
}


def byte_tokenizer(arch: str, model_max_length: int) -> PreTrainedTokenizerFast:
    """Build a byte-level BPE tokenizer (256 byte symbols, no merges) with `arch`'s special tokens."""
    if arch not in SPECIALS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(SPECIALS)}")
    specials = SPECIALS[arch]
    byte_symbols = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 printable stand-ins for bytes
    ordered = byte_symbols + specials if arch in CAUSAL else specials + byte_symbols
    vocab = {tok: i for i, tok in enumerate(ordered)}
    unk = "<|endoftext|>" if arch in CAUSAL else specials[2 if arch == "t5" else 1]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    if arch == "t5":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", vocab["</s>"])])
        kw = dict(pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    elif arch == "bert":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        kw = dict(pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                  mask_token="[MASK]")
    else:
        kw = dict(bos_token="<|endoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **kw)


def tiny_config(arch: str, sizes: dict, vocab_size: int, pad_id: int | None,
                eos_id: int | None) -> PretrainedConfig:
    """Transformers config for a small random `arch` model; `sizes` uses the config class's own keys."""
    cls = CONFIG_CLASSES[arch]
    # PretrainedConfig silently stores unknown kwargs, so a typo (n_layers) would be ignored.
    known = set(inspect.signature(cls.__init__).parameters) | set(getattr(cls, "attribute_map", {}))
    unknown = sorted(set(sizes) - known)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} keys in model.tiny: {unknown}")
    kw = dict(sizes, vocab_size=vocab_size)
    if arch in CAUSAL:
        kw.update(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    elif arch == "t5":
        kw.setdefault("feed_forward_proj", "gated-gelu")  # T5 v1.1 / t5-xl-ssm-nq FFN
        # transformers 5 no longer defaults decoder_start_token_id; T5 starts decoding from pad.
        kw.update(pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id)
    else:
        kw.update(pad_token_id=pad_id)
    return cls(**kw)


def context_size(config: PretrainedConfig) -> int:
    """Longest input the model accepts (T5 has relative positions: use its usual 512)."""
    for key in ("n_positions", "max_position_embeddings"):
        if getattr(config, key, None):
            return int(getattr(config, key))
    return 512
