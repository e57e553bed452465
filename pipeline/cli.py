"""The command line, checked before Hydra runs: an override that names no config key or group option
(a typo such as `edtor=malmen` or `data.n_edit=5`) is one line that names it and suggests the closest
name, instead of Hydra's paragraph and traceback hint.

The overrides are composed with Hydra's own compose API, as Hydra will compose them; with -m, once per
option of each swept config group (other sweeps at their first value), so a typo in the third option
of a sweep is refused before the first job runs. What this check does not recognise is left to Hydra.
"""
from __future__ import annotations

import difflib
import re
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser  # the parser @hydra.main uses
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
from omegaconf import OmegaConf

CONFIG_DIR = Path(__file__).resolve().parents[1] / "config"
# Hydra's messages for the mistakes explained here (hydra/_internal/config_loader_impl.py)
UNKNOWN_KEY = re.compile(r"Could not override '([^']+)'|Could not delete from config\. '([^']+)' does not exist"
                         r"|config group '([^']+)' does not exist")
TAKEN_KEY = re.compile(r"Could not append to config\. An item is already at '([^']+)'")
AMBIGUOUS = re.compile(r"Ambiguous value for argument '([^']+)'")


def override_problem(argv: list[str], config_name: str = "config") -> str | None:
    """One line on the first override of `argv` (sys.argv[1:]) that Hydra would refuse, or None."""
    args, _ = get_args_parser().parse_known_args(argv)
    if not args.overrides or args.help or args.hydra_help or args.shell_completion or args.info \
            or args.config_path or args.config_name or args.config_dir:
        return None  # nothing to check, or a search path this check does not follow
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        try:
            parsed = OverridesParser.create(GlobalHydra.instance().config_loader()).parse_overrides(args.overrides)
        except OverrideParseException as err:
            return f"cannot read the override {err.override!r}: {_one_line(err.message)}"
        for job in _jobs(parsed) if args.multirun else [args.overrides]:
            try:
                cfg = compose(config_name, overrides=job, return_hydra_config=True)
            except ConfigCompositionException as err:
                return _explain(err, parsed, job, config_name)
            problem = _wrong_type(cfg, job, config_name)
            if problem:
                return problem
    return None


def _wrong_type(cfg, job: list[str], config_name: str) -> str | None:
    """One line on an override that gives a number or a switch a value of another kind (data.n_edits=abc),
    which would otherwise fail minutes later (after the toy LM's pretraining) with a TypeError."""
    groups = set(_groups())
    choices = [o for o in job if _key(o.partition("=")[0]) in groups]
    default = compose(config_name, overrides=choices, return_hydra_config=True)
    for override in job:
        key = _key(override.partition("=")[0])
        if key in groups or key.startswith("hydra."):
            continue
        try:
            before = OmegaConf.select(default, key, throw_on_missing=False)
            after = OmegaConf.select(cfg, key, throw_on_missing=False)
        except Exception:  # an interpolation that resolves only at run time: left to the run
            continue
        if after is None or before is None:
            continue
        if isinstance(before, bool) and not isinstance(after, bool):
            kind = "true or false"
        elif isinstance(before, int) and not isinstance(before, bool) and not isinstance(after, int):
            kind = "an integer"
        elif isinstance(before, float) and (isinstance(after, bool) or not isinstance(after, (int, float))):
            kind = "a number"
        else:
            continue
        default = str(before).lower() if isinstance(before, bool) else repr(before)  # as the YAML writes it
        return f"{override}: {key} takes {kind} (its default is {default}), not {after!r}"
    return None


def _jobs(parsed: list[Override]) -> list[list[str]]:
    """Single-value override lists that cover every option of every swept config group (-m)."""
    groups = set(_groups())
    values = []
    for o in parsed:
        try:  # as Hydra's basic sweeper splits a sweep into its jobs' overrides
            values.append([f"{o.get_key_element()}={v}" for v in o.sweep_string_iterator()]
                          if o.is_sweep_override() else [o.input_line])
        except Exception:  # an interval or a glob: left to Hydra's sweeper
            values.append([])
    first = [v[0] for v in values if v]
    jobs = [first]
    for i, (o, options) in enumerate(zip(parsed, values)):
        if o.is_sweep_override() and o.key_or_group in groups:
            k = sum(1 for v in values[:i] if v)  # position of this override in `first`
            jobs += [first[:k] + [option] + first[k + 1:] for option in options[1:]]
    return jobs


def _explain(err: ConfigCompositionException, parsed: list[Override], job: list[str],
             config_name: str) -> str | None:
    """One line for a composition error of `job` (its overrides) of a kind explained here; None leaves it
    to Hydra."""
    text = str(err)
    if isinstance(err, MissingConfigException) and err.missing_cfg_file and err.options:
        group, _, name = err.missing_cfg_file.rpartition("/")
        close = difflib.get_close_matches(name, err.options, n=1)
        hint = f"; did you mean {group}={close[0]}?" if close else ""
        return (f"{group}={name}: config group {group!r} has no option {name!r}{hint} "
                f"(options: {', '.join(err.options)})")
    match = UNKNOWN_KEY.search(text)
    if match:
        key = next(g for g in match.groups() if g)
        bad = next((o for o in parsed if key in (o.key_or_group, _key(o.get_key_element()))), None)
        line = bad.input_line if bad else key
        groups = _groups()
        choices = [o for o in job if _key(o.partition("=")[0]) in groups]  # editor=ft: which keys there are
        close = _closest(key, [n for n in _names(config_name, choices) if n != key])
        hint = f"; did you mean {close}?" if close else "" if line.startswith("~") else \
            f"; to add a new key, write +{line.lstrip('+')}"
        choice = next((o for o in choices if o.partition("=")[0] == key.partition(".")[0]), None)
        return f"{line}: the config{f' with {choice}' if choice else ''} has no key {key!r}{hint}"
    match = TAKEN_KEY.search(text)
    if match:
        key = match.group(1)
        return (f"+{key}=...: the config already has {key!r}, and + only adds new keys; write {key}=... to change "
                f"it (or ++{key}=... to add or change)")
    match = AMBIGUOUS.search(text)
    if match:
        return (f"{match.group(1)}: a comma-separated value is a sweep: add -m (--multirun) for one run per value, "
                "or write key=[a,b] for a list, or quote it for a string")
    return None


def _groups() -> list[str]:
    """The config groups (model, editor, ...; hydra/launcher, ...)."""
    loader = GlobalHydra.instance().config_loader()
    return loader.list_groups("") + [f"hydra/{g}" for g in loader.list_groups("hydra")]


def _names(config_name: str, choices: list[str]) -> list[str]:
    """Every dotted key of the config with these group `choices` (or without, if they fail; Hydra's own
    keys included) and every config group: the names a typo is compared with."""
    try:
        cfg = compose(config_name, overrides=choices, return_hydra_config=True)
    except ConfigCompositionException:
        cfg = compose(config_name, return_hydra_config=True)
    return _keys(OmegaConf.to_container(cfg, resolve=False)) + _groups()


def _key(element: str) -> str:
    """An override's key without its ~, + or ++ prefix."""
    return element.lstrip("~+")


def _closest(key: str, names: list[str]) -> str | None:
    """The name most like `key`: among its siblings when its parent exists (data.n_edit: data.n_edits),
    else among all names."""
    parent, _, last = key.rpartition(".")
    siblings = {n.rpartition(".")[2]: n for n in names if parent and n.startswith(parent + ".")
                and "." not in n[len(parent) + 1:]}
    if siblings:
        close = difflib.get_close_matches(last, list(siblings), n=1, cutoff=0.75)
        return siblings[close[0]] if close else None
    close = difflib.get_close_matches(key, names, n=1, cutoff=0.75)
    return close[0] if close else None


def _keys(node: dict, prefix: str = "") -> list[str]:
    """Dotted paths of every key of a nested dict (the config as a container, unresolved)."""
    out = []
    for key, value in node.items():
        out.append(f"{prefix}{key}")
        if isinstance(value, dict):
            out += _keys(value, f"{prefix}{key}.")
    return out


def _one_line(text: str) -> str:
    """Hydra's message on one line, without its HYDRA_FULL_ERROR hint."""
    return "; ".join(line.strip() for line in text.splitlines() if line.strip() and "HYDRA_FULL_ERROR" not in line)
