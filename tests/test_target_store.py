"""MEMIT/EMMET's target vectors stored per request: a rerun reuses them, whatever the batching; a
request not in the store is optimised, and gives the z a run without a store gives; another setting shares nothing."""
import torch

from tests.helpers import F64, edited, world_cfg

BASE = ["editor.n_prefixes=2", "editor.n_steps=3", *F64]


def test_rerun_reuses_each_requests_z(world, tmp_path):
    first, _, _, shifts = edited(world_cfg(world, tmp_path, "memit", *BASE, "editor.batch_size=3"))
    assert first.diagnostics()["targets"]["cache"] == {"hits": 0, "computed": 8}
    again, _, _, shifts2 = edited(world_cfg(world, tmp_path, "memit", *BASE, "editor.batch_size=5"))
    assert again.diagnostics()["targets"]["cache"] == {"hits": 8, "computed": 0}
    assert torch.equal(again.z, first.z) and all(torch.equal(shifts[k], shifts2[k]) for k in shifts)
    plain, _, _, _ = edited(world_cfg(world, tmp_path / "other", "memit", *BASE, "editor.cache_targets=false"))
    assert plain.target_store is None
    assert torch.allclose(plain.z, first.z, rtol=1e-10, atol=1e-12)  # what the store holds is z


def test_an_interrupted_edit_optimises_only_what_is_missing(world, tmp_path):
    first, _, _, _ = edited(world_cfg(world, tmp_path, "emmet", *BASE))
    files = sorted(first.target_store.folder.glob("*.pt"))
    assert len(files) == 8
    for f in files[:3]:  # as if the run had stopped before these were written
        f.unlink()
    files[3].write_bytes(b"not a checkpoint")  # a file cut short: computed again
    resumed, _, _, _ = edited(world_cfg(world, tmp_path, "emmet", *BASE))
    assert resumed.diagnostics()["targets"]["cache"] == {"hits": 4, "computed": 4}
    assert torch.allclose(resumed.z, first.z, rtol=1e-10, atol=1e-12)


def test_another_setting_shares_nothing(world, tmp_path):
    edited(world_cfg(world, tmp_path, "memit", *BASE))
    other, _, _, _ = edited(world_cfg(world, tmp_path, "memit", *BASE[:1], "editor.n_steps=4", *F64))
    assert other.diagnostics()["targets"]["cache"] == {"hits": 0, "computed": 8}
    reseeded, _, _, _ = edited(world_cfg(world, tmp_path, "memit", *BASE), seed=1)  # other weights
    assert reseeded.diagnostics()["targets"]["cache"] == {"hits": 0, "computed": 8}
