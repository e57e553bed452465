"""The editors, one file each in config/editor/: the registry every list of editors is read from.

Each file begins with what the code needs to know about its editor:
  _target_       its class (editor/<file>.py), built by experiment.build_editor;
  name           the config's and the results' name (editor=NAME);
  display_name   how tables name it (MALMEN, LocFT-BF);
  meta_trained   whether it meta-trains a hyper-network before it edits (editor.checkpoint, editor.resume);
  located        only editors that edit modules the model config locates: that model key (model.memit).
The keys after them are the editor's settings: those its class's constructor names are its arguments; the
others are run options (RUN_OPTIONS). Adding an editor: its class in editor/, its file in config/editor/.
Read with OmegaConf alone (no torch, no Hydra composition), so that preflight and main.py stay fast; every
file states these facts itself (emmet.yaml too, which takes MEMIT's settings through its defaults list).
"""
from pathlib import Path

from omegaconf import OmegaConf

FOLDER = Path(__file__).resolve().parents[1] / "config" / "editor"
FACTS = ("_target_", "name", "display_name", "meta_trained", "located")  # about the editor, not settings
RUN_OPTIONS = ("checkpoint", "allow_other_m", "resume")  # settings of a run, not arguments of the editor's class

REGISTRY = {path.stem: OmegaConf.load(path) for path in sorted(FOLDER.glob("*.yaml"))}
EDITORS = tuple(REGISTRY)
META_TRAINED = tuple(name for name, e in REGISTRY.items() if e.meta_trained)  # the others edit without training
LOCATED = {name: e.located for name, e in REGISTRY.items() if e.get("located")}  # editor: its model.<key>
DISPLAY_NAMES = {name: e.display_name for name, e in REGISTRY.items()}
