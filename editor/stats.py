"""Key statistics of MEMIT and EMMET: C = E[k k^T] of an edited module's input over generic text.

MEMIT computes C from 100,000 Wikipedia samples, each truncated at the model's context. For real
models the text here is wikitext-103 (`WIKITEXT`, through `datasets`: a Wikipedia stand-in that the
hub serves as plain text); `train` (the prompts and NQ questions of the training records) is the
offline source of tiny and toy models. pipeline.experiment.stats_texts chooses; see config/model/*.yaml memit.

C is computed once per model, module and text sample, cached on disk and reused. The cache key
holds everything C depends on (model identity and dtype, module, text source, number of samples,
digests of the texts themselves and of the tokenizer's vocabulary, truncation length), so a stale
file is never picked up. One pass serves every module, and it stops at the deepest of them: the
blocks above the edited layers do not change C.
"""
import hashlib
import json
import logging
import re
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from model.load import hub_unreachable
from util import save_checkpoint

log = logging.getLogger(__name__)
WIKITEXT = ("Salesforce/wikitext", "wikitext-103-raw-v1")  # the other text source (needs the hub)


def wikitext_texts() -> list[str]:
    """Non-empty paragraphs of the wikitext-103 training split, through `datasets` (the hub, or a copy in
    the datasets cache); ValueError saying why when it cannot be loaded. With no copy in the cache the
    hub is probed once first (model.load.hub_unreachable): `datasets` alone retries for about 30 s."""
    try:
        from datasets import config, load_dataset
        from huggingface_hub import constants
        copy = Path(config.HF_DATASETS_CACHE) / WIKITEXT[0].replace("/", "___")  # <copy>/<config>/<version>/<hash>
        if not constants.is_offline_mode() and not any(p.is_dir() for p in copy.glob("*/*/*")):
            unreachable = hub_unreachable(constants.ENDPOINT)
            if unreachable:
                raise ConnectionError(f"{constants.ENDPOINT} cannot be reached ({unreachable}) and the datasets "
                                      f"cache has no copy ({copy})")
        rows = load_dataset(*WIKITEXT, split="train")["text"]
    except Exception as err:  # offline: ConnectionError, hub errors, ... all mean "not available here"
        raise ValueError(f"cannot load {'/'.join(WIKITEXT)} through `datasets` "
                         f"({type(err).__name__}: {str(err)[:200]})") from err
    # heading lines (" = Title = ") are not running text
    return [t.strip() for t in rows if t.strip() and not t.strip().startswith("=")]


def sample_texts(texts: list[str], n_samples: int, source: str) -> list[str]:
    """A fixed random sample of at most `n_samples` non-empty texts (seed 0 for every run, so runs share
    the cache); with fewer texts available, all of them and a warning."""
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"key statistics: the text source {source!r} gave no text")
    if len(texts) <= n_samples:
        if len(texts) < n_samples:
            log.warning("key statistics: source %r has %d texts, fewer than editor.n_samples=%d; using all",
                        source, len(texts), n_samples)
        return texts
    picks = np.random.default_rng(0).choice(len(texts), n_samples, replace=False)
    return [texts[i] for i in sorted(picks)]


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over every parameter's name, dtype, shape and bytes: the identity of a random tiny model."""
    h = hashlib.sha256()
    for name, p in model.named_parameters():
        h.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def vocab_digest(tokenizer) -> str:
    """sha256 of the tokenizer's vocabulary (token -> id)."""
    return hashlib.sha256(json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()


def context_length(model: nn.Module) -> int:
    """The model's context in tokens (GPT-2: n_positions; GPT-J, Llama: max_position_embeddings)."""
    cfg = model.config
    return int(getattr(cfg, "n_positions", None) or cfg.max_position_embeddings)


def cached_path(cache_dir: str | Path, kind: str, key: dict, stem: str, suffix: str) -> Path:
    """cache_dir/<kind>/<model>/<stem>.<digest of the whole key><suffix>: one folder per model."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    model = re.sub(r"[^A-Za-z0-9._-]+", "--", key["model"]).strip("-")[-80:]
    return Path(cache_dir) / kind / model / f"{stem}.{digest}{suffix}"


def cache_file(cache_dir: str | Path, key: dict) -> Path:
    """cache_dir/key_stats/<model>/<module>.<source>.n<samples>.<digest of the whole key>.pt"""
    return cached_path(cache_dir, "key_stats", key, f"{key['module']}.{key['source']}.n{key['n_samples']}", ".pt")


def key_second_moments(model: nn.Module, tokenizer, modules: dict[str, nn.Module], texts: list[str], *,
                       source: str, n_samples: int, model_id: str, cache_dir: str | Path, max_len: int,
                       batch_size: int, device) -> tuple[dict[str, torch.Tensor], dict[str, int], float]:
    """C = E[k k^T] (d_in, d_in) per module, float32 on `device`, the number of tokens each was averaged
    over, and the seconds spent computing them (0 when every one came from the cache). `texts` is the
    sample (see `sample_texts`)."""
    digest = hashlib.sha256("\x00".join(texts).encode()).hexdigest()
    vocab = vocab_digest(tokenizer)
    dtype = str(next(model.parameters()).dtype)
    keys = {n: {"model": model_id, "dtype": dtype, "module": n, "source": source, "n_samples": n_samples,
                "n_texts": len(texts), "texts_sha256": digest, "vocab_sha256": vocab, "max_len": max_len}
            for n in modules}
    covs, counts, missing = {}, {}, {}
    for name, key in keys.items():
        path = cache_file(cache_dir, key)
        if path.is_file():
            saved = torch.load(path, map_location=device, weights_only=True)
            if saved["key"] == key:  # the digest names the key; this guards against a collision
                covs[name], counts[name] = saved["cov"], int(saved["n_tokens"])
                log.info("key statistics of %s loaded from %s", name, path)
                continue
        missing[name] = modules[name]
    if not missing:
        return covs, counts, 0.0
    start = time.time()
    computed, n_tokens = _second_moments(model, tokenizer, missing, texts, max_len, batch_size, device)
    seconds = time.time() - start
    for name, cov in computed.items():
        path = cache_file(cache_dir, keys[name])
        save_checkpoint({"cov": cov.cpu(), "n_tokens": n_tokens, "key": keys[name]}, path)  # temp + rename
        covs[name], counts[name] = cov, n_tokens
    log.info("key statistics of %d modules: %d texts, %d tokens in %.1f s, cached under %s",
             len(missing), len(texts), n_tokens, seconds, Path(cache_dir) / "key_stats")
    return covs, counts, seconds


class _Stop(Exception):
    """Ends a forward pass once every hooked module has run (what follows cannot change the statistics)."""


@torch.no_grad()
def _second_moments(model: nn.Module, tokenizer, modules: dict[str, nn.Module], texts: list[str],
                    max_len: int, batch_size: int, device) -> tuple[dict[str, torch.Tensor], int]:
    """One pass over `texts` for all modules: mean of k k^T over every non-padding token. Texts are
    batched in order of length (the mean does not depend on the order; padding is then small)."""
    seen: dict[str, torch.Tensor] = {}

    def record(name):
        def hook(mod, inp, out):
            seen[name] = inp[0]
            if len(seen) == len(modules):
                raise _Stop
        return hook
    hooks = [m.register_forward_hook(record(n)) for n, m in modules.items()]
    lengths = [len(ids) for ids in tokenizer(texts, truncation=True, max_length=max_len)["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    # float64 sums: 100,000 texts of positive terms lose digits in float32
    sums: dict[str, torch.Tensor] = {}
    count = 0
    try:
        for i in tqdm(range(0, len(texts), batch_size), desc="key statistics", dynamic_ncols=True):
            enc = tokenizer([texts[j] for j in order[i: i + batch_size]], truncation=True, max_length=max_len,
                            padding=True, padding_side="right", return_tensors="pt")
            mask = enc["attention_mask"].bool().to(device)  # (B, T)
            seen.clear()
            try:
                model(input_ids=enc["input_ids"].to(device), attention_mask=mask.long())
            except _Stop:
                pass
            for n in modules:
                k = seen[n][mask.to(seen[n].device)].float()  # (n_tokens, d_in), on the module's device
                prod = (k.T @ k).double().to(device)  # (d_in, d_in)
                if n in sums:
                    sums[n] += prod
                else:
                    sums[n] = prod
            count += int(mask.sum())
    finally:
        for h in hooks:
            h.remove()
    return {n: (s / count).float() for n, s in sums.items()}, count
