"""Grouping edit records into m-edit groups, each tokenised lazily into LM batches."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from typing import Iterator

import numpy as np
import torch

from data.collate import Collator
from data.records import DataError, EditRecord

log = logging.getLogger(__name__)
KIND_NAMES = {"edit": "edit", "equiv": "equivalent", "unrel": "unrelated", "edit_true": "edit (true answer)",
              "equiv_true": "equivalent (true answer)", "unrel_new": "unrelated (new answer)"}  # for errors


@dataclass
class EditGroup:
    """m edits with their equivalent and unrelated tuples, each split into LM batches."""

    records: list[EditRecord]
    edit: list[dict[str, torch.Tensor]]  # batches of (prompt, answer)
    equiv: list[dict[str, torch.Tensor]]  # batches of (one equivalent prompt, answer)
    unrel: list[dict[str, torch.Tensor]]  # batches of (unrel_prompt, unrel_answer)
    path: str = "<records>"  # file of the records, for error messages of editors that read them
    # CounterFact (records with a true_answer): the tuples its scores compare the ones above with,
    # {"edit_true": (prompt, true answer), "equiv_true": (equivalent prompt, true answer),
    #  "unrel_new": (unrel_prompt, new answer)}; None for other data
    counter: dict[str, list[dict[str, torch.Tensor]]] | None = None
    # the group position of each tuple of a kind (edit, equiv, unrel and those of `counter`), in batch order:
    # batches are sorted by length, so per-tuple values concatenated over them come in this order
    order: dict[str, list[int]] = field(default_factory=dict)

    def to(self, device) -> "EditGroup":
        """The same group with every batch on `device` (moved once per step, not once per use)."""
        move = lambda batches: [{k: v.to(device) for k, v in b.items()} for b in batches]  # noqa: E731
        counter = None if self.counter is None else {k: move(b) for k, b in self.counter.items()}
        return replace(self, edit=move(self.edit), equiv=move(self.equiv), unrel=move(self.unrel), counter=counter)


def n_groups(n_records: int, n_edits: int) -> int:
    """Number of full groups of `n_edits` records; the remainder is dropped."""
    if n_edits < 1:
        raise ValueError(f"n_edits must be >= 1, got {n_edits}")
    return n_records // n_edits


def edit_groups(records: list[EditRecord], n_edits: int, batch_size: int, collator: Collator,
                *, seed: int, shuffle: bool, path: str = "<records>") -> Iterator[EditGroup]:
    """Yield groups of exactly `n_edits` records, tokenised only when reached.

    shuffle: records in a `seed`-ed random order (training and validation: the same seed gives the same
    groups, another seed another choice of edits); False keeps the file order.
    """
    # checks, shuffling and the equivalent-prompt draw run now, so errors surface at the call
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(records)
    if n < n_edits:
        raise DataError(path, None, None, f"has {n} records, fewer than data.n_edits={n_edits}")
    k = n_groups(n, n_edits)
    if n % n_edits:
        log.warning("%s: %d records beyond the last full group of %d are not used", path, n % n_edits, n_edits)
    # one seeded rng orders the records and draws the equivalent prompts: the groups are a function of
    # the seed, so validation (shuffled by cfg.seed) and its max_valid_steps prefix repeat exactly
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if shuffle else np.arange(n)
    used = [records[i] for i in order[: k * n_edits]]
    picks = rng.integers(0, [len(r.equiv_prompts) for r in used])  # (k * m,)
    equiv = [r.equiv_prompts[j] for r, j in zip(used, picks.tolist())]
    return _groups(used, equiv, n_edits, batch_size, collator, path)


def _groups(used: list[EditRecord], equiv: list[str], m: int, batch_size: int,
            collator: Collator, path: str) -> Iterator[EditGroup]:
    for start in range(0, len(used), m):
        recs = used[start: start + m]
        new, prompts, rephrased = [r.answer for r in recs], [r.prompt for r in recs], equiv[start: start + m]
        unrel = [r.unrel_prompt for r in recs]
        kinds = {"edit": (prompts, new), "equiv": (rephrased, new), "unrel": (unrel, [r.unrel_answer for r in recs])}
        if all(r.true_answer is not None for r in recs):  # CounterFact: the same prompts with the other answer
            true = [r.true_answer for r in recs]
            kinds.update(edit_true=(prompts, true), equiv_true=(rephrased, true), unrel_new=(unrel, new))
        batches, order = {}, {}
        for kind, (texts, answers) in kinds.items():
            batches[kind], order[kind] = _batches(collator, recs, texts, answers, batch_size, path, KIND_NAMES[kind])
        yield EditGroup(records=recs, edit=batches.pop("edit"), equiv=batches.pop("equiv"),
                        unrel=batches.pop("unrel"), path=path, counter=batches or None, order=order)


def _batches(collator: Collator, recs: list[EditRecord], prompts: list[str], answers: list, batch_size: int,
             path: str, kind: str) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """LM batches of the tuples sorted by token length (the authors' runs sort too). A batch
    holds at most `batch_size` tuples and at most batch_size x (the mean tuple length) tokens with its
    padding, so short tuples share wide batches and long ones narrow ones. On zsRE this cuts the
    tokens through the LM by 27-30% at m = 64 against batches of 64 in record order, and no batch is
    larger than one of those. Every loss and metric is per example: neither the order nor the cut
    changes a result (tests/test_meta_grad.py, batch-size invariance). Returns the batches and the
    group position of each tuple in batch order."""
    try:
        lengths = collator.lengths(prompts, answers)  # (n,) tokens of each tuple
    except ValueError:  # find the record that cannot be tokenised and name it
        for j in range(len(prompts)):
            try:
                collator([prompts[j]], [answers[j]])
            except ValueError as err:
                raise DataError(path, recs[j].index, f"{kind} tuple", str(err)) from err
        raise
    order = sorted(range(len(prompts)), key=lambda j: lengths[j])  # stable: ties keep the file order
    budget = batch_size * sum(lengths) / len(lengths)  # padded tokens per batch
    cuts, start = [], 0
    for i, j in enumerate(order):  # lengths grow along `order`: tuple j sets the batch's width
        if i > start and (i + 1 - start > batch_size or (i + 1 - start) * lengths[j] > budget):
            cuts.append((start, i))
            start = i
    cuts.append((start, len(order)))
    return [collator([prompts[j] for j in order[a:b]], [answers[j] for j in order[a:b]]) for a, b in cuts], order
