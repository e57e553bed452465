"""What main.py runs, above the model, data and editor packages and util.py:

  cli.py         override typos, checked before Hydra runs;
  preflight.py   config values, combinations and input files, checked before the heavy imports;
  rerun.py       what the run directory already holds: a finished run is kept, an interrupted one resumed;
  registry.py    the editors, read from config/editor/*.yaml (class, display name, meta-trained, located);
  experiment.py  the trainer and validation loop (run), the edit command (run_edit) and the builders;
  checkpoint.py  editor checkpoints: the checks that one fits the run, exact resumption;
  pre_edit.py    the pre-edit scores, stored for later runs;
  edit_facts.py  the edit command's measuring and saving of the edited model;
  report.py      results.md, the terminal summary, the clean-up of a refused run's folder.

Nothing is imported here: cli, preflight, rerun and registry import no torch, so that --help and a refused run answer in
about a second (tests/test_refusals_are_fast.py); import each module by name.
"""
