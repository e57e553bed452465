"""Paper results as commands: experiment and launcher configs, ablation switches, the Fig. 8 residual,
aggregation of a sweep (CSV, plots, tables), a real multirun, and the Fig. 9 memory benchmark."""
import csv
import itertools
import json
import os
import statistics
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from omegaconf import OmegaConf

from editor.mend import MEND
from pipeline.experiment import build_editor, run
from scripts.aggregate import main as aggregate_main
from scripts.runs import AggregateError, read_run, summarize
from tests.helpers import ROOT, build_model, make_cfg, one_group, qa_records, write_records

EXPERIMENTS = sorted(p.stem for p in (ROOT / "config" / "experiment").glob("*.yaml"))
CAUSAL = {"ft", "mend", "malmen", "memit", "emmet", "locft_bf"}  # MEMIT/EMMET need a causal LM
ABLATIONS = {"none", "sum", "no_reg", "first_ffn", "all_tokens"}
# model, data, m grid (exponents of 2) from the paper's section 5, and the swept editors or ablations
PAPER = {"fig4_bert_fever": ("bert-base", "fever", range(4, 13), {"editor": CAUSAL - {"memit", "emmet"}}),
         "fig5_gpt2_zsre": ("gpt2", "zsre", range(6, 13), {"editor": CAUSAL}),
         "fig6_t5xl_zsre": ("t5-xl", "zsre", range(8, 15), {"editor": CAUSAL - {"memit", "emmet"}}),
         "fig7_gptj_zsre": ("gpt-j", "zsre", range(5, 15), {"editor": CAUSAL}),
         "fig8_residual": ("gpt2", "zsre", range(6, 13), {"ablation": {"none", "sum"}}),
         "table1_bert_fever": ("bert-base", "fever", [9], {"ablation": ABLATIONS}),
         "table1_gpt2_zsre": ("gpt2", "zsre", [9], {"ablation": ABLATIONS}),
         "table2_gptj": ("gpt-j", "zsre", [13], {"ablation": {"none", "all_tokens"}})}


def compose_many(jobs: list[list[str]], hydra: bool = False) -> list:
    """Compose config/config.yaml once per list of overrides, as `python main.py [-m]` would."""
    with initialize_config_dir(config_dir=str(ROOT / "config"), version_base="1.3"):
        return [compose(config_name="config", overrides=job, return_hydra_config=hydra) for job in jobs]


def sweep_grid(cfg) -> dict[str, list[str]]:
    """The multirun grid of a config's hydra.sweeper.params, expanded as Hydra's basic sweeper does."""
    params = [f"{k}={v}" for k, v in cfg.hydra.sweeper.params.items()]
    jobs = BasicSweeper.split_arguments(OverridesParser.create().parse_overrides(params), None)[0]
    grid: dict[str, list[str]] = {}
    for job in jobs:
        for override in job:
            key, value = override.split("=", 1)
            grid.setdefault(key, [])
            if value not in grid[key]:
                grid[key].append(value)
    assert len(jobs) == len(list(itertools.product(*grid.values())))
    return grid


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_config_sweeps_the_paper_grid_and_every_job_composes(name):
    (base,) = compose_many([[f"experiment={name}"]], hydra=True)
    grid = sweep_grid(base)
    assert [int(s) for s in grid["seed"]] == [0, 1, 2]  # at least 3 seeds
    if name in PAPER:
        model, data, exponents, swept = PAPER[name]
        assert [int(m) for m in grid.get("data.n_edits", [base.data.n_edits])] == [2 ** k for k in exponents]
        assert (base.model.name, base.data.name) == (model, data)
        for key, values in swept.items():
            assert set(grid[key]) == values
    # every value of the swept editors/ablations, and the largest m, with the other keys at their first value
    first = {k: v[0] for k, v in grid.items()}
    jobs = [{**first, k: v} for k in grid if k not in ("seed", "data.n_edits") for v in grid[k]]
    jobs.append({**first, "data.n_edits": grid.get("data.n_edits", [base.data.n_edits])[-1]})
    for job, cfg in zip(jobs, compose_many([[f"experiment={name}", *(f"{k}={v}" for k, v in job.items())]
                                            for job in jobs])):
        resolved = OmegaConf.to_container(cfg, resolve=True)
        assert resolved["paper_result"] and resolved["variant"] == job.get("ablation", "none")
        assert resolved["editor"]["name"] == job.get("editor", "malmen")
        assert (cfg.model.name, cfg.data.name) == (base.model.name, base.data.name)


def test_launcher_configs_compose():
    slurm, joblib, basic = compose_many([["experiment=fig5_gpt2_zsre", "launcher=slurm", "hydra.launcher.partition=gpu"],
                                         ["launcher=joblib"], []], hydra=True)
    assert slurm.hydra.launcher._target_.endswith("SlurmLauncher")
    assert slurm.hydra.launcher.partition == "gpu" and slurm.hydra.launcher.gpus_per_node == 1
    assert slurm.model_device == "cuda" and slurm.model.name == "gpt2"
    assert joblib.hydra.launcher._target_.endswith("JoblibLauncher") and joblib.hydra.launcher.n_jobs == 2
    assert basic.hydra.launcher._target_.endswith("BasicLauncher")  # local and sequential by default


def test_ablations_switch_the_malmen_editor(tmp_path):
    base = ("model=tiny-gpt2", "data=zsre", "editor.rank=8")
    cfg = make_cfg(*base, "ablation=sum")
    model, _ = build_model(cfg)
    assert isinstance(build_editor(cfg, model), MEND) and cfg.editor.name == "malmen" and cfg.variant == "sum"
    first = build_editor(make_cfg(*base, "ablation=first_ffn"), model)
    assert sorted(first.modules) == ["transformer.h.2.mlp.c_fc", "transformer.h.3.mlp.c_fc"]
    assert build_editor(make_cfg(*base, "ablation=all_tokens"), model).token == "all"
    assert build_editor(make_cfg(*base, "ablation=no_reg"), model).regularize is False
    assert build_editor(make_cfg(*base), model).regularize is True
    with pytest.raises(ValueError, match="switch of the MALMEN editor: use editor=malmen, not editor=ft"):
        run(make_cfg("model=tiny-gpt2", "data=zsre", "editor=ft", "ablation=sum"), tmp_path)


def test_residual_is_zero_for_an_exact_solve_one_without_shift_and_large_for_summed_shifts():
    def residual(*overrides):
        cfg = make_cfg("model=tiny-gpt2", "data=zsre", "editor.rank=16", "data.n_edits=4", "data.batch_size=4",
                       *overrides)
        torch.manual_seed(0)
        model, tok = build_model(cfg)
        model.double()  # float64: lambda = 1e-12 is far below the smallest squared singular value of the keys
        editor = build_editor(cfg, model, dtype=torch.float64)
        group = one_group(cfg, tok, qa_records(4))
        n_tokens, d_in = editor.cache(group.edit)["transformer.h.2.mlp.c_proj"][0].shape
        assert n_tokens < d_in  # fewer cached tokens than key dimensions: S* u_j = d_j can hold exactly
        editor.edit(group.edit)
        return editor.diagnostics()["residual"]

    exact = residual("editor.lambda_init=1e-12")
    no_shift = residual("editor.lambda_init=1e12")  # S* ~ 0, so ||S* u - d|| / ||d|| ~ 1
    summed = residual("ablation=sum")
    assert exact < 1e-4
    assert no_shift == pytest.approx(1.0, abs=1e-3)
    assert summed > 0.5 and summed > 1e3 * exact


# ----- aggregation on a sweep directory written here ----------------------------------------------
def write_run(root, i, *, result, model, data, editor, variant, m, seed, es, gs, ls, time_s=10.0, residual=None,
              pre_edit=None):
    """A results.json as pipeline.experiment.run writes it (the fields the aggregate reads)."""
    res = {"config": {"model": {"name": model}, "data": {"name": data, "n_edits": m}, "editor": {"name": editor},
                      "variant": variant, "seed": seed, "paper_result": result},
           "final": {"ES": es, "GS": gs, "LS": ls}, "time_s": time_s, "peak_memory_mb": 100.0 + seed}
    if pre_edit is not None:
        res["pre_edit"] = pre_edit
    if residual is not None:
        res["residual"] = residual
    path = root / f"{i}_{model}_{editor}_{variant}_m{m}_s{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(res))
    return res


@pytest.fixture
def sweep(tmp_path):
    """Scaling runs (2 editors x 3 m x 3 seeds), Table 1, Table 2 and toy table runs, numbers from a seeded rng."""
    gen = torch.Generator().manual_seed(0)
    rand = lambda: round(float(torch.rand((), generator=gen)), 4)  # noqa: E731
    root, runs, i = tmp_path / "sweep", [], 0
    settings = [("fig5_gpt2_zsre", "gpt2", "zsre", e, "none", m) for e in ("malmen", "ft") for m in (64, 128, 256)]
    settings += [("table1", model, data, "malmen", v, 512) for model, data in (("bert-base", "fever"), ("gpt2", "zsre"))
                 for v in ("none", "sum", "first_ffn", "all_tokens", "no_reg") if (model, v) != ("bert-base", "no_reg")]
    settings += [("table2", "gpt-j", "zsre", "malmen", v, 8192) for v in ("none", "all_tokens")]
    settings += [("toy_table", "toy-gpt2", "synthetic", e, v, 256)
                 for e, v in (("malmen", "none"), ("malmen", "sum"), ("malmen", "no_reg"), ("mend", "none"))]
    for result, model, data, editor, variant, m in settings:
        for seed in (0, 1, 2):
            runs.append(write_run(root, i, result=result, model=model, data=data, editor=editor, variant=variant,
                                  m=m, seed=seed, es=rand(), gs=rand(), ls=rand(), time_s=3600 * rand(),
                                  residual=rand() if editor in ("malmen", "mend") else None))
            i += 1
    return root, runs


def matching(runs, **config):
    return [r for r in runs if all((r["config"]["data"]["n_edits"] if k == "m" else
                                    r["config"][k]["name"] if k in ("model", "data", "editor") else r["config"][k]) == v
                                   for k, v in config.items())]


def test_aggregate_writes_csv_plots_and_tables(sweep, tmp_path, capsys):
    root, runs = sweep
    out = tmp_path / "out"
    assert aggregate_main([str(root), "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "summary.csv")))
    assert len(rows) == 6 + 9 + 2 + 4
    for row in rows:
        group = matching(runs, paper_result=row["result"], model=row["model"], data=row["data"],
                         editor=row["editor"], variant=row["variant"], m=int(row["m"]))
        assert int(row["n"]) == len(group) == 3 and row["seeds"] == "0 1 2"
        for stat in ("ES", "GS", "LS"):
            values = [r["final"][stat] for r in group]
            assert float(row[f"{stat}_mean"]) == pytest.approx(statistics.fmean(values), abs=5e-5)  # 4 decimals
            assert float(row[f"{stat}_std"]) == pytest.approx(statistics.pstdev(values), abs=5e-5)
        if row["editor"] == "ft":
            assert row["residual_mean"] == ""  # FT records no residual
        else:
            assert float(row["residual_mean"]) == pytest.approx(statistics.fmean(r["residual"] for r in group), abs=5e-5)
    for png in ("fig5_gpt2_zsre.png", "fig5_gpt2_zsre_residual.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and (out / png).stat().st_size > 5000
    assert not (out / "table1.png").exists()  # tables are Markdown, not plots

    table1 = (out / "table1.md").read_text().splitlines()
    body = {line.split(" | ")[0].strip("| "): line for line in table1 if line.startswith("| ") and "---" not in line}
    assert list(body)[1:] == ["Before editing", "Sum param. shifts", "No regularization", "Edit first FC in FFN", "Cache all tokens",
                              "MALMEN"]
    assert "fever, m = 512: bert-base ES (%) ↑" in table1[2] and "zsre, m = 512: gpt2 ES (%) ↑" in table1[2]
    cells = body["No regularization"].strip("| ").split(" | ")
    assert cells[1:4] == ["–"] * 3  # no BERT run finished (as in the paper)
    es = [r["final"]["ES"] for r in matching(runs, paper_result="table1", model="gpt2", variant="no_reg")]
    assert cells[4] == f"{100 * statistics.fmean(es):.1f} ({100 * statistics.pstdev(es):.1f})"

    toy = (out / "toy_table.md").read_text().splitlines()  # scripts/sweep.sh toy_table: MEND beside MALMEN's ablations
    assert [line.split(" | ")[0].strip("| ") for line in toy if line.startswith("| ")][1:] == [
        "Before editing", "MEND", "Sum param. shifts", "No regularization", "MALMEN"]
    assert "synthetic, m = 256: toy-gpt2 ES (%) ↑" in toy[2] and not (out / "toy_table.png").exists()

    table2 = (out / "table2.md").read_text()
    assert "Time (h)" in table2 and "| Cache all tokens |" in table2
    malmen = matching(runs, paper_result="table2", variant="none")
    hours = statistics.fmean(r["time_s"] for r in malmen) / 3600
    assert table2.split("| MALMEN |")[1].split("|")[3].strip() == f"{hours:.3g}"
    assert str(out / "summary.csv") in capsys.readouterr().out


@pytest.mark.parametrize("bad, field", [("{not json", None), ("final.GS", "final.GS"),
                                        ("config.variant", "config.variant"), ("seed", "config.seed")])
def test_aggregate_refuses_a_bad_results_json(sweep, capsys, bad, field):
    root, _ = sweep
    path = sorted(root.rglob("results.json"))[4]
    if bad == "{not json":
        path.write_text(bad)
    elif bad == "seed":  # a second run of the same setting and seed
        twin = path.parent.with_name("again") / "results.json"
        twin.parent.mkdir()
        twin.write_text(path.read_text())
    else:
        res = json.loads(path.read_text())
        parent, key = bad.rsplit(".", 1)
        del (res[parent] if parent == "final" else res["config"])[key]
        path.write_text(json.dumps(res))
    assert aggregate_main([str(root)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert str(path if bad != "seed" else path.parent.with_name("again")) in err
    assert (f"field '{field}'" in err) if field else "cannot read JSON" in err


def test_validation_groups_are_read_and_a_bad_one_is_named(tmp_path):
    """read_run keeps each validation group's scores (the spread of the massive-editing table); a group lacking one
    is refused by its index and field."""
    res = {"config": {"model": {"name": "m"}, "data": {"name": "d", "n_edits": 4}, "paper_result": None,
                      "editor": {"name": "malmen"}, "variant": "none", "seed": 0},
           "final": {"ES": 0.5, "GS": 0.25, "LS": 1.0}, "time_s": 1.0, "peak_memory_mb": 1.0,
           "valid": [{"ES": 0.25, "GS": 0.5, "LS": 1.0}, {"ES": 0.75, "GS": 0.0, "LS": 1.0}]}
    path = tmp_path / "results.json"
    path.write_text(json.dumps(res))
    (row,) = summarize([read_run(path)], spread="groups")  # the std the row states: over the validation groups
    assert read_run(path).groups == {"ES": (0.25, 0.75), "GS": (0.5, 0.0), "LS": (1.0, 1.0)}
    assert (row["spread"], row["n_groups"], row["ES_std"], row["GS_std"], row["LS_std"]) == ("groups", 2, 0.25, 0.25, 0.0)
    (row,) = summarize([read_run(path)])  # over seeds: one seed, no spread
    assert (row["spread"], row["ES_std"], row["GS_std"]) == ("seeds", 0.0, 0.0)
    del res["valid"][1]["LS"]
    path.write_text(json.dumps(res))
    with pytest.raises(AggregateError, match=r"results.json: field 'valid\[1\].LS': expected a number, got None"):
        read_run(path)


def test_aggregate_refuses_a_directory_without_runs(tmp_path, capsys):
    assert aggregate_main([str(tmp_path)]) == 2
    assert "no results.json" in capsys.readouterr().err


def test_aggregate_tables_never_print_a_non_finite_number(tmp_path):
    for seed, es in ((0, float("nan")), (1, 0.5)):  # json writes NaN; a diverged run can record it
        write_run(tmp_path, seed, result="toy_table", model="toy-gpt2", data="synthetic", editor="malmen",
                  variant="none", m=256, seed=seed, es=es, gs=0.25, ls=1.0)
    assert aggregate_main([str(tmp_path)]) == 0
    row = next(ln for ln in (tmp_path / "toy_table.md").read_text().splitlines() if ln.startswith("| MALMEN"))
    assert row.strip("| ").split(" | ")[1:] == ["n/a (non-finite)", "25.0 (0.0)", "100.0 (0.0)"]


def test_before_editing_row_line_and_csv_columns(tmp_path):
    for seed, pre_ls in ((0, 0.9), (1, 0.7)):
        write_run(tmp_path, seed, result="toy_table", model="toy-gpt2", data="synthetic", editor="malmen",
                  variant="none", m=256, seed=seed, es=0.5, gs=0.25, ls=0.8,
                  pre_edit={"ES": 0.0, "GS": 0.125, "LS": pre_ls})
        for j, m in enumerate((16, 32)):  # a curve with a level before editing
            write_run(tmp_path, 10 + 2 * seed + j, result="mini_sweep", model="toy-gpt2", data="synthetic",
                      editor="mend", variant="none", m=m, seed=seed, es=0.5, gs=0.25, ls=0.8,
                      pre_edit={"ES": 0.0, "GS": 0.0, "LS": 1.0})
    assert aggregate_main([str(tmp_path)]) == 0
    before = next(ln for ln in (tmp_path / "toy_table.md").read_text().splitlines() if ln.startswith("| Before"))
    assert before.strip("| ").split(" | ")[1:] == ["0.0", "12.5", "80.0"]  # (0.9 + 0.7) / 2 in %
    row = next(r for r in csv.DictReader(open(tmp_path / "summary.csv")) if r["result"] == "toy_table")
    assert (row["pre_GS_mean"], row["pre_LS_mean"]) == ("0.125", "0.8")
    assert (tmp_path / "mini_sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ----- the real pipeline: Hydra multirun -> results.json -> aggregate ------------------------------
def test_multirun_sweep_then_aggregate(tmp_path):
    train = write_records(tmp_path / "train.json", qa_records(8), "zsre")
    valid = write_records(tmp_path / "valid.json", qa_records(8, start=100), "zsre")
    sweep_dir = tmp_path / "sweep"
    subprocess.run([sys.executable, "main.py", "-m", "experiment=mini_sweep", "model=tiny-gpt2", "data=zsre",
                    f"data.train_path={train}", f"data.valid_path={valid}", "data.n_edits=4", "data.batch_size=4",
                    "editor=malmen,ft", "seed=0,1", "max_train_steps=1", "max_valid_steps=1",
                    f"cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep_dir}"],
                   cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    runs = sorted(p.parent.name for p in sweep_dir.rglob("results.json"))
    assert runs == ["tiny-gpt2_zsre_ft_none_m4_s0", "tiny-gpt2_zsre_ft_none_m4_s1",
                    "tiny-gpt2_zsre_malmen_none_m4_s0", "tiny-gpt2_zsre_malmen_none_m4_s1"]
    results = json.loads((sweep_dir / runs[2] / "results.json").read_text())
    assert results["config"]["variant"] == "none" and results["config"]["paper_result"] == "mini_sweep"
    assert results["residual"] > 0 and "residual" in results["valid"][0]
    assert "residual" not in json.loads((sweep_dir / runs[0] / "results.json").read_text())
    assert aggregate_main([str(sweep_dir)]) == 0
    rows = list(csv.DictReader(open(sweep_dir / "summary.csv")))
    assert [(r["editor"], r["n"]) for r in rows] == [("ft", "2"), ("malmen", "2")]
    # one m: a table, not a curve of one dot per line
    table = (sweep_dir / "mini_sweep.md").read_text()
    assert not (sweep_dir / "mini_sweep.png").exists() and "m = 4" in table and "2 seeds" in table
    assert "| before editing |" in table and "| MALMEN | 2 |" in table and "residual" in table


# ----- Fig. 9 -------------------------------------------------------------------------------------
def test_memory_benchmark_reports_both_procedures(tmp_path):
    out = tmp_path / "fig9"
    proc = subprocess.run([sys.executable, "scripts/memory_benchmark.py", "--model", "tiny-gpt2", "--m", "4",
                           "--out", str(out), "--threads", "1"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader(open(out / "memory.csv")))
    assert [(r["m"], r["procedure"]) for r in rows] == [("4", "two_stage"), ("4", "end_to_end")]
    for r in rows:
        assert float(r["peak_mb"]) >= float(r["setup_mb"]) > 0 and float(r["step_s"]) > 0 and r["status"] == ""
    ratio = float(rows[1]["peak_mb"]) / float(rows[0]["peak_mb"])
    two_stage, end_to_end = (float(r["peak_mb"]) / 1024 for r in rows)  # the table is in GiB, as the plot
    assert f"| 4 | {two_stage:.2f} | {end_to_end:.2f} | {ratio:.2f} |" in proc.stdout
    assert (out / "memory.png").stat().st_size > 0 and (out / "memory.md").read_text() in proc.stdout


def test_speed_benchmark_runs_offline_on_a_tiny_model(tmp_path):
    """scripts/benchmark.py on tiny-llama with its own (byte-level) tokenizer: every phase timed, no hub."""
    data = write_records(tmp_path / "zsre.json", qa_records(8), "zsre")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--data", str(data), "--model", "tiny-llama",
                           "--m", "4", "--out", str(tmp_path / "bench")], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((tmp_path / "bench" / "benchmark.json").read_text())["results"][0]
    assert result["m"] == 4 and all(result["phases"][k][1] > 0 for k in ("meta-step", "validation group")), result


def test_speed_benchmark_times_a_later_run_from_the_warm_store(tmp_path):
    """--prefix-cache store: the first run computes every tuple and fills the disk store, the later one (new
    prefix states) reads every tuple from it; each meta-step phase and the FLOP floor are reported."""
    data = write_records(tmp_path / "zsre.json", qa_records(8), "zsre")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "scripts/benchmark.py", "--data", str(data), "--model", "tiny-llama",
                           "--m", "4", "--prefix-cache", "store", "--editor", "mend", "--out", str(tmp_path / "bench")],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cold, warm = json.loads((tmp_path / "bench" / "benchmark.json").read_text())["results"]
    assert (cold["mode"], warm["mode"]) == ("cold", "warm")
    assert cold["prefix_cache"]["store"]["writes"] == 3 * 4 and cold["prefix_cache"]["store"]["reads"] == 0
    assert warm["prefix_cache"]["misses"] == 0 and warm["prefix_cache"]["store"]["reads"] == 3 * 4
    assert warm["prefix_cache_validation"]["misses"] == 0 and warm["pre"] == cold["pre"] and warm["post"] == cold["post"]
    assert set(warm["phases"]) >= {"trace", "hyper-network", "solve", "stage 1 forward", "stage 1 backward",
                                   "KL reference", "stage 2", "meta-step"}
    assert warm["floor"]["blocks"] == 2 and warm["floor"]["flops"] > 0
    assert "later run (store warm)" in (tmp_path / "bench" / "benchmark.md").read_text()
