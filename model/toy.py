"""The toy LM of the offline default experiment: a small GPT-2 pretrained on a synthetic world.

The tokenizer is word-level over the world's vocabulary (every name and object is one token), built
offline. The model learns every true fact of the known subjects (teacher-forced answers after the
question, as the editors are trained and evaluated). Both are saved with `save_pretrained` under
`cache_dir/toy-<hash of settings and facts>/`, so later runs (and `from_pretrained`) reuse them.
"""
import hashlib
import json
import logging
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from tqdm import tqdm
from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

from data.collate import Collator
from model.lm import accuracy, logits, nll

log = logging.getLogger(__name__)
EOS, UNK = "<|endoftext|>", "<unk>"
MAX_LENGTH = 64  # positions of the toy LM, and its tokenizer's limit


def word_tokenizer(texts: list[str], max_length: int) -> PreTrainedTokenizerFast:
    """Word-level tokenizer (words and punctuation) over the vocabulary of `texts`."""
    pre = pre_tokenizers.Whitespace()
    words = sorted({w for t in texts for w, _ in pre.pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate([EOS, UNK] + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    tok.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS,
                                   unk_token=UNK, model_max_length=max_length)


def smoothed_nll(lg: torch.Tensor, batch: dict, smoothing: float) -> torch.Tensor:
    """Mean label-smoothed cross-entropy over the answer tokens of a causal batch; `lg` (N, V) from
    model.lm.logits, at the answer positions."""
    labels = batch["labels"]
    return F.cross_entropy(lg, labels[labels != -100], label_smoothing=smoothing)


def pretrain(facts: list[dict], texts: list[str], *, n_layer: int, n_embd: int, n_head: int,
             epochs: int, lr: float, weight_decay: float, label_smoothing: float, batch_size: int,
             seed: int, out_dir: Path) -> dict:
    """Train a GPT-2 on {prompt, answer} facts; save model and tokenizer to out_dir; return stats.

    Deterministic for a given torch build and thread count (the caller keys the cache by both)."""
    torch.manual_seed(seed)
    tok = word_tokenizer(texts, max_length=MAX_LENGTH)
    # No dropout: the toy LM must memorise random facts, which dropout fights.
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=MAX_LENGTH, n_layer=n_layer,
                                       n_embd=n_embd, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0))
    collator = Collator(tok, "causal")
    prompts, answers = [f["prompt"] for f in facts], [f["answer"] for f in facts]
    batches = [collator(prompts[i:i + batch_size], answers[i:i + batch_size])
               for i in range(0, len(facts), batch_size)]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * len(batches), pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    bar = tqdm(range(epochs), desc="pretrain toy LM", dynamic_ncols=True)
    for _ in bar:
        total = 0.0
        for i in torch.randperm(len(batches), generator=gen).tolist():
            loss = smoothed_nll(logits(model, batches[i], "causal"), batches[i], label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        bar.set_postfix(loss=f"{total / len(batches):.3f}")
    model.eval()
    with torch.no_grad():
        acc = torch.cat([accuracy(logits(model, b, "causal"), b, "causal") for b in batches]).mean()
    stats = {"fact_accuracy": float(acc), "n_facts": len(facts), "vocab_size": len(tok),
             "n_params": sum(p.numel() for p in model.parameters())}
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return stats


# Raised whenever a change of this file or model.lm changes the pretrained weights bit-wise, so that a
# cache made by older code is not mistaken for this code's LM. 2: the output head only at the answer
# positions (model/lm.py), which sums the head's gradient over fewer rows (max weight change 0.8).
PRETRAIN_VERSION = 2


def world_texts(facts_path: str, texts_paths: list[str]) -> list[str]:
    """The texts the toy LM's vocabulary is built from: every text the runs will tokenise (the world's
    facts, and the edits, rephrasings and unrelated questions of `texts_paths`)."""
    texts = [f["prompt"] + " " + f["answer"] for f in json.loads(Path(facts_path).read_text())]
    for p in texts_paths:
        texts += [" ".join(str(v) for v in r.values()) for r in json.loads(Path(p).read_text())]
    return texts


def world_tokenizer(facts_path: str, texts_paths: list[str]) -> PreTrainedTokenizerFast:
    """The tokenizer the toy LM of this world gets, built without pretraining (seconds): main.py refuses
    facts with words outside it before the minutes-long pretraining."""
    return word_tokenizer(world_texts(facts_path, texts_paths), max_length=MAX_LENGTH)


def ensure_toy_model(facts_path: str, texts_paths: list[str], settings: dict, cache_dir: str | Path) -> str:
    """Directory of the toy LM for these facts and settings, pretraining it on first use."""
    # What else changes the weights is part of the key: torch's kernels (its version), the thread
    # count (float sums split per thread) and the pretraining's own arithmetic (PRETRAIN_VERSION);
    # same key, same machine kind -> bit-identical weights.
    build = {"torch": torch.__version__, "threads": torch.get_num_threads(), "pretrain_version": PRETRAIN_VERSION}
    digest = hashlib.sha256(json.dumps({**settings, **build}, sort_keys=True).encode())
    for p in [facts_path, *texts_paths]:
        digest.update(Path(p).read_bytes())
    out = Path(cache_dir) / f"toy-{digest.hexdigest()[:12]}"
    if (out / "pretrain.json").is_file():
        return str(out)
    facts = json.loads(Path(facts_path).read_text())
    texts = world_texts(facts_path, texts_paths)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=".toy-"))
    try:
        stats = {**pretrain(facts, texts, out_dir=tmp, **settings), **build}
        (tmp / "pretrain.json").write_text(json.dumps(stats, indent=2))
        try:
            tmp.rename(out)  # atomic: a half-trained model is never picked up
        except OSError:  # another run finished the same model first: keep theirs
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("pretrained toy LM in %s: %s", out, stats)
    return str(out)
