"""Small helpers for the pipeline, data, model and editor packages: seeding, checkpoints, memory, logging.
The bottom layer: it imports no module of this project."""
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


def set_threads(threads: int | None) -> None:
    """Pin torch's CPU threads (config `threads`: a positive integer, as pipeline/preflight.py checks it
    before any caller gets here; None keeps torch's default of one per core).

    A different thread count splits float sums differently, and training amplifies the last-bit
    differences (two toy LMs pretrained with 1 and 2 threads differed by up to 0.84 in a weight), so a
    fixed count is what makes a seed's numbers bit-identical on a machine, whatever its load."""
    if threads is not None:
        torch.set_num_threads(threads)


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


def default_mode(directory: bool = False) -> int:
    """The mode a plain open() or mkdir() would give under the process umask (0644/0755 typically);
    tempfile's mkstemp/mkdtemp use 0600/0700, which must not leak into results a user shares."""
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def _atomic(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with sigint_deferred():
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
        try:
            os.chmod(tmp, default_mode())
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
    """Load a checkpoint without running code from it (weights_only=True). A path that is missing or plainly
    not a checkpoint (a directory, a JSON file) is named so by pipeline.preflight.check_checkpoint, run before this."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # the unpickler met an object other than tensors and containers
        # torch's message is a paragraph of advice around one line of reason; keep the reason
        skip = ("Weights only load failed", "Check the documentation", "Please file an issue")
        reason = " ".join(ln.strip() for ln in str(err).splitlines() if ln.strip() and not ln.startswith(skip))
        if "GLOBAL" not in str(err):  # no object was refused: the bytes are not a pickle torch can read
            raise ValueError(f"cannot read checkpoint {path}: not a torch checkpoint ({reason[-300:]})") from err
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


def started_from(start: dict, end: dict) -> dict:
    """A run's environment (run_environment) at its `end`, with the commit and dirty flag of its `start`: the
    code it imported. If the checkout moved while it ran, `checkout_changed` holds the end's (a module
    imported late may come from that code)."""
    env = {**end, "commit": start["commit"], "dirty": start["dirty"]}
    if (end["commit"], end["dirty"]) != (start["commit"], start["dirty"]):
        env["checkout_changed"] = {"commit": end["commit"], "dirty": end["dirty"]}
    return env


def run_environment() -> dict:
    """Where and when a run ran, for results.json: commit, date, machine, threads, load, versions.

    Fast and offline (git with a timeout); anything that cannot be found is None."""
    import datetime
    import importlib.metadata
    import platform
    import subprocess

    def attempt(get):
        try:
            return get()
        except Exception:  # provenance must never stop a run
            return None

    root = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        # --no-optional-locks: `git status` must not rewrite the index under a concurrent `git add`
        out = subprocess.run(["git", "--no-optional-locks", *args], cwd=root, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else None

    top = attempt(lambda: git("rev-parse", "--show-toplevel"))
    in_git = top is not None and Path(top).resolve() == root  # not a copy inside some other checkout
    commit = attempt(lambda: git("rev-parse", "--short", "HEAD")) if in_git else None
    # tracked files only: an untracked file (a venv link, a scratch script) does not change the code run
    status = attempt(lambda: git("status", "--porcelain", "--untracked-files=no")) if commit else None

    def cpu_model() -> str | None:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
        return platform.processor() or None

    return {
        "commit": commit,
        "dirty": None if status is None else status != "",
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": attempt(cpu_model) or attempt(platform.processor) or None,
        "cpu_count": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "load_1min": attempt(lambda: round(os.getloadavg()[0], 2)),
        "platform": attempt(platform.platform),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": attempt(lambda: importlib.metadata.version("transformers")),
        "gpu": attempt(torch.cuda.get_device_name) if torch.cuda.is_available() else None,
    }
