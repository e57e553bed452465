"""Models: loading real and tiny LMs, the FEVER classifier head, tracing, losses and metrics.

Registers the `package_dir` config resolver here, where every config reader (main.py, scripts,
tests) passes before it reads model.name_or_path: `${package_dir:pkg/sub/dir}` is that folder
inside the installed Python package `pkg`, on any machine (config/model/minilm.yaml uses it).
"""
import importlib.util
from pathlib import Path

from omegaconf import OmegaConf


def package_dir(spec: str) -> str:
    """Absolute path of `pkg/sub/dir` inside the installed Python package `pkg`."""
    package, _, sub = spec.partition("/")
    found = importlib.util.find_spec(package)  # locates the package without importing it
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(f"Python package {package!r} is not installed (pip install -r requirements.txt)")
    folder = Path(next(iter(found.submodule_search_locations))) / sub
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} does not exist in the installed package {package!r}")
    return str(folder)


OmegaConf.register_new_resolver("package_dir", package_dir, replace=True)
