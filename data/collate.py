"""Tokenising (prompt, answer) tuples into LM batches for causal, seq2seq and classifier models.

`labels` are aligned with the positions that PREDICT them (IGNORE elsewhere), for every LM family:
  causal   input prompt + answer[:-1]; labels[t] = the answer token after position t. The last answer
           token is never an input (methods.md, "Where the paper is silent"): a position after it
           would predict nothing, and with editor.token=all it would cache a (key, 0) pair.
  seq2seq  encoder input prompt + </s>; decoder input start + answer[:-1]; labels = the answer
           tokens, without </s> (as the authors' runs).
Whitespace: a prompt loses its trailing whitespace and an answer its surrounding whitespace before they
are joined, so a causal input holds exactly one space between them, whatever the caller passed.
A word-level vocabulary (the toy model's) refuses text with words it does not hold, listing them,
instead of reading them as <unk>.
"""
from __future__ import annotations

import torch

FAMILIES = ("causal", "seq2seq", "classifier")
IGNORE = -100  # label value ignored by the loss


class TextError(ValueError):
    """A prompt or answer that cannot be tokenised as it is; `part` says which ("prompt" or "answer")."""

    def __init__(self, part: str, msg: str):
        self.part = part
        super().__init__(msg)


class Collator:
    """Tokenises (prompt, answer) tuples into one LM batch for a model family."""

    def __init__(self, tokenizer, family: str):
        if family not in FAMILIES:
            raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
        if tokenizer.pad_token_id is None:
            # GPT-2/GPT-J tokenizers ship without a pad token; the model code must set pad = eos
            raise ValueError(f"tokenizer {type(tokenizer).__name__} has no pad token (set tokenizer.pad_token first)")
        self.tok, self.family = tokenizer, family
        self.pad_id: int = tokenizer.pad_token_id
        limit = getattr(tokenizer, "model_max_length", None)
        # HF uses a huge sentinel (~1e30) for "no limit"
        self.max_len: int | None = limit if isinstance(limit, int) and limit < 1_000_000 else None
        self.special_ids = set(tokenizer.all_special_ids)
        backend = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
        # a word-level vocabulary maps every word it lacks to <unk>: such words are refused, by name
        self.word_level = type(backend).__name__ == "WordLevel" and tokenizer.unk_token_id is not None

    def __call__(self, prompts: list[str], answers: list[str | bool]) -> dict[str, torch.Tensor]:
        """Batch of tensors (CPU, right-padded) for `prompts[i]` -> `answers[i]`."""
        if len(prompts) != len(answers) or not prompts:
            raise ValueError(f"need equally many prompts and answers, at least one (got {len(prompts)}, {len(answers)})")
        for p in prompts:
            _check_text(p, "prompt")
        prompts = [p.rstrip() for p in prompts]  # the causal join adds the one space before the answer
        if self.family == "classifier":
            return self._classifier(prompts, answers)
        # FEVER on a generative LM: the claim is the prompt and the label word is the answer.
        answers = [("true" if a else "false") if isinstance(a, bool) else a for a in answers]
        for a in answers:
            _check_text(a, "answer")
        answers = [a.strip() for a in answers]
        return self._causal(prompts, answers) if self.family == "causal" else self._seq2seq(prompts, answers)

    def lengths(self, prompts: list[str], answers: list[str | bool]) -> list[int]:
        """Tokens of each tuple as it would be batched (encoder plus decoder tokens for seq2seq), for
        length-sorted batches; the same checks and errors as calling the collator."""
        batch = self(prompts, answers)
        n = batch["attention_mask"].sum(1)  # (B,)
        return (n + batch["decoder_attention_mask"].sum(1) if "decoder_attention_mask" in batch else n).tolist()

    def _ids(self, texts: list[str], special: bool, what: str) -> list[list[int]]:
        """Token ids per text; refuse unknown words (word-level vocabularies), texts with no content
        tokens, and texts beyond the model's limit."""
        enc = self.tok(texts, add_special_tokens=special, return_offsets_mapping=self.word_level)
        for k, (text, seq) in enumerate(zip(texts, enc["input_ids"])):
            if self.word_level:
                self._check_known(text, seq, enc["offset_mapping"][k], what)
            if not seq:
                raise TextError(what, f"{what} tokenises to zero tokens: {text!r}")
            if all(i in self.special_ids for i in seq):
                raise TextError(what, f"{what} tokenises only to special tokens "
                                f"{self.tok.convert_ids_to_tokens(seq)}: {text!r}")
            self._check_len(len(seq), what, text)
        return enc["input_ids"]

    def _check_known(self, text: str, seq: list[int], offsets: list[tuple[int, int]], what: str) -> None:
        """Refuse words that a word-level vocabulary would read as <unk>, listing them."""
        unk = self.tok.unk_token_id
        words = list(dict.fromkeys(text[s:e] for i, (s, e) in zip(seq, offsets)
                                   if i == unk and text[s:e] != self.tok.unk_token))
        if words:
            raise TextError(what, f"{what} has {len(words)} word(s) outside the model's word-level vocabulary: "
                            f"{', '.join(map(repr, words))} (in {text!r}); they would be read as "
                            f"{self.tok.unk_token!r}. The toy model (model=toy-gpt2) only knows the synthetic "
                            "world's vocabulary, the words it was pretrained on: write facts in that world's "
                            "words, or edit a model with a subword tokenizer (e.g. model=gpt2)")

    def _check_len(self, n: int, what: str, text: str) -> None:
        if self.max_len is not None and n > self.max_len:
            # truncating would silently cut the answer the loss is about; refuse instead
            raise TextError(what, f"{what} is {n} tokens, longer than the tokenizer limit {self.max_len}: "
                            f"{text[:80]!r}")

    def _causal(self, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        p_ids = self._ids(prompts, False, "prompt")
        a_ids = self._ids([" " + a for a in answers], False, "answer")  # GPT-2 BPE: the space belongs to the word
        seqs = [p + a[:-1] for p, a in zip(p_ids, a_ids)]  # (T,) the last answer token is never an input
        labels = [[IGNORE] * (len(p) - 1) + a for p, a in zip(p_ids, a_ids)]  # (T,) position t predicts t + 1
        for s, p, a in zip(seqs, prompts, answers):
            self._check_len(len(s), "prompt + answer (the input)", f"{p} {a}")
        input_ids, mask = _pad(seqs, self.pad_id)  # (B, T)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": _pad(labels, IGNORE)[0]}

    def _seq2seq(self, prompts: list[str], answers: list[str]) -> dict[str, torch.Tensor]:
        input_ids, mask = _pad(self._ids(prompts, True, "prompt"), self.pad_id)  # (B, T), ends in </s>
        a_ids = self._ids(answers, False, "answer")  # the answer tokens, no </s> (as the authors' runs)
        labels, dec_mask = _pad(a_ids, IGNORE)  # (B, Td)
        # T5 convention: the decoder starts from the pad token; teacher forcing shifts labels right
        dec_in = _pad([[self.pad_id] + a[:-1] for a in a_ids], self.pad_id)[0]  # (B, Td)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels,
                "decoder_input_ids": dec_in, "decoder_attention_mask": dec_mask}

    def _classifier(self, prompts: list[str], answers: list[str | bool]) -> dict[str, torch.Tensor]:
        for a in answers:
            if not isinstance(a, bool):
                raise ValueError(f"classifier answers must be bool labels, got {a!r}")
        input_ids, mask = _pad(self._ids(prompts, True, "prompt"), self.pad_id)  # (B, T), [CLS] ... [SEP]
        labels = torch.tensor([float(a) for a in answers], dtype=torch.float32)  # (B,)
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _check_text(text: object, what: str) -> None:
    if not isinstance(text, str):
        raise TextError(what, f"{what} must be a string, got {text!r}")
    if not text.strip():
        # " " + "" is still one GPT-2 token, so catch empty text before tokenising
        raise TextError(what, f"{what} is empty: {text!r}" if not text else f"{what} is only whitespace: {text!r}")


def _pad(seqs: list[list[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence: (values (B, T), mask (B, T) with 1 on real positions)."""
    width = max(len(s) for s in seqs)
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        out[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return out, mask
