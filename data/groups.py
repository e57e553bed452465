"""Grouping edit records into m-edit groups, each tokenised lazily into LM batches."""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Iterator

import numpy as np
import torch

from data.collate import Collator
from data.records import DataError, EditRecord

log = logging.getLogger(__name__)


@dataclass
class EditGroup:
    """m edits with their equivalent and unrelated tuples, each split into LM batches."""

    records: list[EditRecord]
    edit: list[dict[str, torch.Tensor]]  # batches of (prompt, answer)
    equiv: list[dict[str, torch.Tensor]]  # batches of (one equivalent prompt, answer)
    unrel: list[dict[str, torch.Tensor]]  # batches of (unrel_prompt, unrel_answer)
    path: str = "<records>"  # file of the records, for error messages of editors that read them

    def to(self, device) -> "EditGroup":
        """The same group with every batch on `device` (moved once per step, not once per use)."""
        move = lambda batches: [{k: v.to(device) for k, v in b.items()} for b in batches]  # noqa: E731
        return replace(self, edit=move(self.edit), equiv=move(self.equiv), unrel=move(self.unrel))


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
        answers = [r.answer for r in recs]
        yield EditGroup(
            records=recs,
            edit=_batches(collator, recs, [r.prompt for r in recs], answers, batch_size, path, "edit"),
            equiv=_batches(collator, recs, equiv[start: start + m], answers, batch_size, path, "equivalent"),
            unrel=_batches(collator, recs, [r.unrel_prompt for r in recs], [r.unrel_answer for r in recs],
                           batch_size, path, "unrelated"),
            path=path,
        )


def _batches(collator: Collator, recs: list[EditRecord], prompts: list[str], answers: list, batch_size: int,
             path: str, kind: str) -> list[dict[str, torch.Tensor]]:
    """LM batches of the tuples sorted by token length (issue 17; the authors' runs sort too). A batch
    holds at most `batch_size` tuples and at most batch_size x (the mean tuple length) tokens with its
    padding, so short tuples share wide batches and long ones narrow ones. On zsRE this cuts the
    tokens through the LM by 27-30% at m = 64 against batches of 64 in record order, and no batch is
    larger than one of those. Every loss and metric is per example: neither the order nor the cut
    changes a result (tests/test_meta_grad.py, batch-size invariance)."""
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
    return [collator([prompts[j] for j in order[a:b]], [answers[j] for j in order[a:b]]) for a, b in cuts]
