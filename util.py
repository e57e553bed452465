"""Small helpers for main.py: seeding, checkpoints, memory, logging."""
import contextlib
import json
import os
import pickle
import random
import resource
import signal
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and CUDA)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextlib.contextmanager
def sigint_deferred():
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it as KeyboardInterrupt.

    A KeyboardInterrupt inside torch.save makes its zip writer fail on exit with a RuntimeError that
    hides the interrupt; holding the signal lets the file be finished and the interrupt be reported.
    """
    if threading.current_thread() is not threading.main_thread():  # only the main thread gets signals
        yield
        return
    caught = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if caught:
        raise KeyboardInterrupt


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sigint_deferred():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one
        except BaseException:
            os.unlink(tmp)
            raise


def atomic_write(path: str | Path, data: str | bytes) -> None:
    """Write text (UTF-8) or bytes atomically: a reader sees the old file or the new one, never half."""
    _atomic(Path(path), lambda f: f.write(data.encode() if isinstance(data, str) else data))


def save_checkpoint(state: dict, path: str | Path) -> None:
    """Write {net, opt, step, config} atomically (temp file + rename)."""
    _atomic(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint without running code from it (weights_only=True)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"editor checkpoint {path} does not exist")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the unpickler met an object other than tensors and containers
        # torch's message is a paragraph of advice around one line of reason; keep the reason
        skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
        reason = " ".join(ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith(skip))
        raise ValueError(f"refused to load {path}: it holds objects other than tensors and plain containers, "
                         f"which could run code on load ({reason[:300]})") from err
    except (RuntimeError, EOFError) as err:  # truncated or not a torch file
        raise ValueError(f"cannot read checkpoint {path}: {err}") from err


def save_json(obj, path: str | Path) -> None:
    """Write JSON atomically."""
    atomic_write(path, json.dumps(obj, indent=2))


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of the process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / (2**20 if sys.platform == "darwin" else 2**10)


class Logger:
    """Metrics to wandb when enabled; namespaced keys such as train/gen_loss."""

    def __init__(self, kind: str | None, project: str, mode: str, config: dict, run_dir: Path):
        self.run = None
        if kind == "wandb":
            import wandb
            self.run = wandb.init(project=project, mode=mode, config=config, dir=str(run_dir))
        elif kind is not None:
            raise ValueError(f"logger must be null or wandb, got {kind!r}")

    def log(self, metrics: dict, step: int) -> None:
        if self.run is not None:
            self.run.log(metrics, step=step)

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
