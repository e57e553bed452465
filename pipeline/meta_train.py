"""Alg. 2's outer loop: meta-train an editor over groups of the training records, checkpointing as it goes.

The plan is a list of stages (m, meta-steps). The paper's protocol is one stage: one network per m, meta-trained at
the m it edits (data.n_edits) for n_epochs epochs, capped by max_train_steps. `curriculum` is another protocol:
stages at growing m that end at data.n_edits, e.g. [[128, 300], [512, 60]] (docs/experiments.md, "Protocols").
Every stage walks epochs of the training records in the order of `seed + epoch`, as a plain run at its m would.
"""
import itertools
import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from omegaconf import DictConfig
from tqdm import tqdm

from data.collate import Collator
from data.groups import EditGroup, edit_groups, n_groups
from data.records import DataError, EditRecord, load_records
from editor.base import Editor
from pipeline.checkpoint import rng_state
from util import Logger, atomic_write, save_checkpoint


def stages(cfg: DictConfig, n_records: int) -> list[tuple[int, int]]:
    """(m, meta-steps) per stage: cfg.curriculum, or one stage at data.n_edits for n_epochs epochs. max_train_steps
    caps the total either way (the last stages are cut first)."""
    if cfg.get("curriculum"):
        plan = [(int(m), int(steps)) for m, steps in cfg.curriculum]
    else:
        plan = [(cfg.data.n_edits, cfg.n_epochs * n_groups(n_records, cfg.data.n_edits))]
    left, capped = cfg.max_train_steps, []
    for m, steps in plan:
        steps = steps if left is None else min(steps, left)
        capped.append((m, steps))
        left = None if left is None else left - steps
    return capped


def stage_groups(cfg: DictConfig, records: list[EditRecord], m: int, collator: Collator,
                 skip: int) -> Iterator[tuple[int, EditGroup]]:
    """(epoch, group) of m training records, epoch after epoch (each shuffled by seed + epoch), after the first
    `skip` groups (those a resumed run already took)."""
    per_epoch = n_groups(len(records), m)
    if per_epoch == 0:
        raise DataError(cfg.data.train_path, None, None, f"has {len(records)} records, fewer than a group of m = {m}")
    first = skip // per_epoch  # the epoch the resumed run was in, and the groups of it already taken
    for epoch in itertools.count(first):
        groups = edit_groups(records, m, cfg.data.batch_size, collator, seed=cfg.seed + epoch, shuffle=True,
                             path=cfg.data.train_path)
        start = skip - first * per_epoch if epoch == first else 0
        yield from ((epoch, g) for g in itertools.islice(groups, start, None))


def train(cfg: DictConfig, editor: Editor, collator: Collator, logger: Logger, run_dir: Path, config: dict,
          done: list[dict] | None = None, evaluate: Callable[[], dict] | None = None,
          curve: list[dict] | None = None) -> list[dict]:
    """Meta-train along `stages(cfg)`; checkpoint to run_dir. Every cfg.eval_every meta-steps, `evaluate()` edits
    and scores the first validation groups ({groups, the mean scores}): a point of `curve` (the learning curve,
    also written to run_dir/curve.json).

    `done`: the train log of an interrupted run being resumed; the steps it holds are not taken again."""
    records = load_records(cfg.data.train_path, cfg.data.format)
    plan = stages(cfg, len(records))
    total = sum(steps for _, steps in plan)
    log_rows, saved_at = list(done or []), time.time()
    bar = tqdm(total=total, initial=min(len(log_rows), total), desc="meta-train", dynamic_ncols=True)
    before = 0  # meta-steps of the earlier stages
    for m, steps in plan:
        taken = min(max(0, len(log_rows) - before), steps)  # of this stage, by a resumed run
        for epoch, group in itertools.islice(stage_groups(cfg, records, m, collator, taken), steps - taken):
            metrics = editor.meta_step(group)
            log_rows.append({"step": editor.step, "epoch": epoch, "m": m, **metrics})
            logger.log({f"train/{k}": v for k, v in metrics.items() if not isinstance(v, list)}, editor.step)
            bar.set_postfix(m=m, gen=f"{metrics['gen_loss']:.3f}", loc=f"{metrics['loc_loss']:.3f}")
            bar.update()
            due = time.time() - saved_at >= 60 * cfg.save_every_minutes  # long steps: keep work by wall time too
            if len(log_rows) % cfg.save_every == 0 or len(log_rows) == total or due:
                save_checkpoint({**editor.state_dict(), "config": config, "train_log": log_rows,
                                 "rng": rng_state()}, run_dir / "checkpoint.pt")
                saved_at = time.time()
            if cfg.get("eval_every") and editor.step % cfg.eval_every == 0 and evaluate and curve is not None:
                curve.append({"step": editor.step, **evaluate()})
                atomic_write(run_dir / "curve.json", json.dumps(curve, indent=1))
        before += steps
    bar.close()
    return log_rows


def read_curve(run_dir: Path) -> list[dict]:
    """The learning curve an interrupted run wrote so far (run_dir/curve.json), or []."""
    path = run_dir / "curve.json"
    return json.loads(path.read_text()) if path.is_file() else []

