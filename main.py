"""Meta-train an editor and evaluate it: python main.py model=M data=D editor=E [key=value ...]
Edit a model with your facts: python main.py mode=edit edit.facts=FILE [editor=E ...]

The one place that reads the Hydra config, in four steps so that a mistake costs seconds:
  1. pipeline/cli.py: overrides that name no config key or option (typos) are refused before Hydra runs;
  2. pipeline/preflight.py: config values and combinations are checked;
  3. pipeline/rerun.py: a run directory that holds this config's results.json is kept as it is (a rerun of a
     sweep runs only its missing cells), one with another config's is refused, an interrupted meta-training
     resumes from its checkpoint.pt; then the input files (facts, data, checkpoints) are checked;
  4. pipeline/experiment.py, imported only then (torch, transformers, the editors: 8 s on a busy machine),
     wires the objects together, trains, validates or edits, and writes results.json and results.md.
This module imports only Hydra, OmegaConf, the standard library and the light checks: keep it so
(tests/test_refusals_are_fast.py checks that --help and refusals never import torch).
A refused run exits 2 with one line and leaves no run directory behind (report.remove_if_empty).
"""
import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

import model  # noqa: F401  registers the ${package_dir:...} config resolver (no torch)
from pipeline.cli import override_problem
from pipeline.preflight import check_config, check_inputs
from pipeline.rerun import earlier_run
from pipeline.report import no_gain_warning, remove_if_empty, terminal_summary

log = logging.getLogger("main")


@hydra.main(version_base="1.3", config_path="config", config_name="config")
def main(cfg: DictConfig) -> None:
    job = HydraConfig.get()
    run_dir, multirun = Path(job.runtime.output_dir), job.mode == RunMode.MULTIRUN
    try:  # before the heavy imports: a bad input is refused in seconds
        check_config(cfg)
        earlier = earlier_run(cfg, run_dir, multirun) if cfg.mode == "train" else None
        if earlier == "kept":
            print(f"kept: {run_dir} (results.json)")
            return
        facts = check_inputs(cfg, run_dir)
        if earlier == "resume":
            cfg.editor.resume = True  # experiment.run restores the checkpoint and skips the steps it took
            print(f"resuming: {run_dir} (checkpoint.pt)")
        from pipeline import experiment  # torch, transformers, the editors
        results = experiment.run_edit(cfg, run_dir, facts) if cfg.mode == "edit" else experiment.run(cfg, run_dir)
    except (FileNotFoundError, ValueError) as err:  # bad input (DataError is a ValueError): one message
        log.debug("error", exc_info=True)
        print(f"error: {err}", file=sys.stderr)
        remove_if_empty(run_dir, refused=True)  # no outputs/<date>/<time>_* folder behind a refusal
        sys.exit(2)
    except KeyboardInterrupt:
        if (run_dir / "checkpoint.pt").is_file() and cfg.mode == "train":  # something to resume
            again = f"hydra.sweep.dir={job.sweep.dir}" if multirun else f"hydra.run.dir={run_dir}"
            print(f"\ninterrupted: the last checkpoint is in {run_dir}; the same command with {again} continues "
                  "from it", file=sys.stderr)
        else:
            print("\ninterrupted before the first checkpoint: nothing to resume (the toy LM's pretraining, "
                  "if it was running, restarts from the beginning next time)", file=sys.stderr)
            remove_if_empty(run_dir)
        sys.exit(130)
    except Exception:  # a crash: its traceback is on the terminal; an empty folder would add nothing
        remove_if_empty(run_dir)
        raise
    print(terminal_summary(results, cfg.mode, run_dir))
    before, after = (results["before"], results["after"]) if cfg.mode == "edit" else \
        (results["pre_edit"], results["final"])
    warning = no_gain_warning(before, after, cfg.editor.name)
    if warning:
        print(warning, file=sys.stderr)


if __name__ == "__main__":
    problem = override_problem(sys.argv[1:])  # Hydra would print a paragraph and a traceback hint
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)
    main()
