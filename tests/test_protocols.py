"""Meta-training protocols besides the paper's one network per m: a curriculum of growing m that ends at the m
it edits (pipeline/meta_train.py). Its first stage is the plain run at that m, and it resumes exactly."""
import pytest
import torch

from data.records import DataError
from pipeline.experiment import run
from pipeline.preflight import check_config
from tests.helpers import make_cfg, qa_records, write_records
from util import load_checkpoint


def cfg_at(tmp_path, *extra):
    """tiny-gpt2 MALMEN on 8 training records; validation at m = 4."""
    train = write_records(tmp_path / "train.json", qa_records(8), "zsre")
    valid = write_records(tmp_path / "valid.json", qa_records(4, start=100), "zsre")
    return make_cfg("model=tiny-gpt2", "data=zsre", "editor=malmen", "editor.rank=32", "editor.lr_init=1e-3",
                    f"data.train_path={train}", f"data.valid_path={valid}", "data.n_edits=4", "data.batch_size=3",
                    "save_every=1", *extra)


def nets_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_curriculum_trains_each_stage_at_its_m_and_its_first_stage_is_the_plain_run(tmp_path):
    plain, cur = tmp_path / "plain", tmp_path / "cur"
    plain.mkdir(), cur.mkdir()
    # 3 steps at m = 2 (8 records: 4 groups per epoch), then 2 at m = 4 (2 groups per epoch: a second epoch)
    curriculum = run(cfg_at(cur, "curriculum=[[2,3],[4,3]]"), cur)
    assert [(r["m"], r["epoch"]) for r in curriculum["train"]] == [(2, 0), (2, 0), (2, 0), (4, 0), (4, 0), (4, 1)]
    assert curriculum["trained"]["m"] == 4 and curriculum["final"] is not None
    reference = run(cfg_at(plain, "data.n_edits=2", "max_train_steps=3", "max_valid_steps=0"), plain)
    assert reference["train"] == curriculum["train"][:3]
    # the curriculum's checkpoint after its first stage: MALMEN at m = 2 for 3 steps, weight for weight
    run(cfg_at(cur, "curriculum=[[2,3],[4,3]]", "max_train_steps=3", "max_valid_steps=0"), cur)
    assert nets_equal(load_checkpoint(cur / "checkpoint.pt")["net"], load_checkpoint(plain / "checkpoint.pt")["net"])


def test_curriculum_interrupted_in_its_second_stage_resumes_to_the_same_numbers(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    whole.mkdir(), cut.mkdir()
    reference = run(cfg_at(whole, "curriculum=[[2,2],[4,3]]"), whole)
    run(cfg_at(cut, "curriculum=[[2,2],[4,3]]", "max_train_steps=3", "max_valid_steps=0"), cut)
    assert [r["m"] for r in load_checkpoint(cut / "checkpoint.pt")["train_log"]] == [2, 2, 4]
    resumed = run(cfg_at(cut, "curriculum=[[2,2],[4,3]]", "editor.resume=true"), cut)
    assert resumed["train"] == reference["train"] and resumed["valid"] == reference["valid"]
    assert nets_equal(load_checkpoint(cut / "checkpoint.pt")["net"], load_checkpoint(whole / "checkpoint.pt")["net"])
    with pytest.raises(ValueError, match="curriculum: checkpoint .*, this run"):  # another trajectory
        run(cfg_at(cut, "curriculum=[[2,1],[4,3]]", "editor.resume=true"), cut)


def test_a_curriculum_stage_larger_than_the_training_records_names_the_file(tmp_path):
    with pytest.raises(DataError, match="train.json: has 8 records, fewer than a group of m = 16"):
        run(cfg_at(tmp_path, "curriculum=[[16,1],[4,1]]", "max_valid_steps=0"), tmp_path)


@pytest.mark.parametrize("value, message", [
    ("[[2,3],[8,1]]", "curriculum must end at the m it edits: its last stage is m = 8, data.n_edits=4"),
    ("[[2,3],[4]]", "curriculum must be null or a list of \\[m, meta-steps\\] pairs"),
    ("[[2,0],[4,1]]", "pairs of positive integers"),
    ("128", "curriculum must be null or a list"),
])
def test_a_curriculum_that_cannot_run_is_refused_before_anything_loads(tmp_path, value, message):
    with pytest.raises(ValueError, match=message):
        check_config(cfg_at(tmp_path, f"curriculum={value}"))
