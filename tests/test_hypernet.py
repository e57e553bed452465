"""The hyper-network as the runs behind the paper's numbers built it (methods.md, "Where the paper
is silent"): block h + s * max(0, h A B + c) + t, one input normaliser per weight shape; checkpoints written
before its per-layer offset t was renamed (from `shift`) still load."""
import pytest
import torch
from omegaconf import OmegaConf

from editor.hypernet import INPUT_VERSION, HyperNet, RunningNorm
from pipeline.checkpoint import load_editor_checkpoint
from pipeline.experiment import build_editor
from tests.helpers import build_model, make_cfg, one_group, records_for
from util import save_checkpoint


def test_block_matches_a_hand_computation():
    net = HyperNet(d_in=2, d_out=1, n_layers=1, rank=2, n_blocks=1, lr_init=1.0, lambda_init=1.0)
    with torch.no_grad():  # no statistics yet: the normaliser is the identity
        net.A[0] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (d, r)
        net.B[0] = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]])  # (r, d)
        net.c[0] = torch.tensor([0.5, -1.0, 0.0])
        net.scale[0, 0] = torch.tensor([2.0, 1.0, 1.0])
        net.offset[0, 0] = torch.tensor([0.1, 0.2, 0.3])
    # h = (1, -2, 0.5): h A = (1.5, -1.5); h A B + c = (2, -4, -3); max(0, .) = (2, 0, 0);
    # h + s * (2, 0, 0) + t = (1 + 4 + 0.1, -2 + 0.2, 0.5 + 0.3)
    key, grad = net(torch.tensor([[1.0, -2.0]]), torch.tensor([[0.5]]), layer=0)
    torch.testing.assert_close(key, torch.tensor([[5.1, -1.8]]))
    torch.testing.assert_close(grad, torch.tensor([[0.8]]))


def test_initial_block_is_the_identity_and_b_learns_from_the_first_step():
    torch.manual_seed(0)
    net = HyperNet(d_in=5, d_out=3, n_layers=2, rank=4, n_blocks=2, lr_init=1.0, lambda_init=1.0)
    assert net.A.std() > 0.5  # N(0, 1), not scaled by 1 / sqrt(d)
    keys, grads = torch.randn(6, 5), torch.randn(6, 3)
    pk, pg = net(keys, grads, layer=1)
    assert torch.equal(pk, keys) and torch.equal(pg, grads)
    (pk.sum() + (pg ** 2).sum()).backward()
    assert net.B.grad.abs().sum() > 0  # max(0, .) passes the gradient at exactly 0; relu would not
    assert net.c.grad.abs().sum() > 0


def test_a_state_dict_with_the_old_name_of_the_offset_loads_with_the_same_outputs():
    torch.manual_seed(0)
    net = HyperNet(d_in=5, d_out=3, n_layers=2, rank=4, n_blocks=2, lr_init=1e-3, lambda_init=1.0)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p))  # every block away from the identity, the offset t included
    net.norm.update(torch.randn(10, 8))
    old = {("shift" if k == "offset" else k): v.clone() for k, v in net.state_dict().items()}  # as written before
    assert "shift" in old and "offset" not in old
    loaded = HyperNet(d_in=5, d_out=3, n_layers=2, rank=4, n_blocks=2, lr_init=1e-3, lambda_init=1.0)
    loaded.load_state_dict(old)  # strict: nothing missing, nothing unexpected
    keys, grads = torch.randn(6, 5), torch.randn(6, 3)
    for layer in (0, 1):
        for got, want in zip(loaded(keys, grads, layer), net(keys, grads, layer)):
            assert torch.equal(got, want)


@pytest.fixture
def trained():
    """A MALMEN editor on the tiny GPT-2 (two edited layers of one shape) after one meta-step."""
    cfg = make_cfg("model=tiny-gpt2", "data.n_edits=4", "data.batch_size=4", "editor.rank=8")
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg)
    editor = build_editor(cfg, model)
    group = one_group(cfg, tokenizer, records_for("causal", 4))
    editor.meta_step(group)
    return cfg, model, editor, group


def test_one_normaliser_per_shape_shared_by_its_layers(trained):
    _, _, editor, group = trained
    (net,) = editor.net.values()  # both edited layers have one shape
    cache = editor.cache(group.edit)
    assert [k for k in net.state_dict() if "norm" in k] == ["norm.count", "norm.mean", "norm.m2"]
    assert net.norm.count == sum(keys.shape[0] for keys, _ in cache.values())  # both layers fed it
    z = torch.cat([torch.cat(kg, -1) for kg in cache.values()])  # every cached (u, dL/dv)
    torch.testing.assert_close(net.norm.mean, z.mean(0))
    torch.testing.assert_close(net.norm.m2 / (net.norm.count - 1), z.var(0, unbiased=True))  # n - 1


def test_validation_and_edits_leave_the_normaliser_alone(trained):
    _, _, editor, group = trained
    before = {k: v.clone() for k, v in editor.net.state_dict().items()}
    editor.edit(group.edit)
    editor.edit_group(group)
    assert all(torch.equal(before[k], v) for k, v in editor.net.state_dict().items())


def test_a_checkpoint_with_the_old_name_of_the_offset_passes_the_checks_and_loads(trained, tmp_path):
    """pipeline/checkpoint.py compares a checkpoint's tensors with this run's by name: the old name is read as
    the new one, and the loaded editor gives the same shifts."""
    cfg, model, editor, group = trained
    config = OmegaConf.to_container(cfg, resolve=True)
    state = {**editor.state_dict(), "config": config}
    state["net"] = {k.replace(".offset", ".shift"): v for k, v in state["net"].items()}  # as written before
    save_checkpoint(state, tmp_path / "old.pt")
    fresh = build_editor(cfg, model)
    load_editor_checkpoint(tmp_path / "old.pt", fresh, config)
    assert all(torch.equal(v, fresh.net.state_dict()[k]) for k, v in editor.net.state_dict().items())
    got = fresh.edit(group.edit)
    assert all(torch.equal(got[name], shift) for name, shift in editor.edit(group.edit).items())


def test_checkpoints_with_per_layer_statistics_are_refused(trained, tmp_path):
    cfg, model, editor, _ = trained
    config = OmegaConf.to_container(cfg, resolve=True)
    old = {k: v for k, v in editor.net.state_dict().items() if ".norm." not in k}
    shape = next(iter(editor.net))
    old.update({f"{shape}.norms.{i}.{b}": editor.net[shape].norm.state_dict()[b] for i in range(2)
                for b in ("count", "mean", "m2")})
    path = tmp_path / "old.pt"
    save_checkpoint({"net": old, "opt": {}, "step": 1, "config": config}, path)
    with pytest.raises(ValueError, match="earlier version of this project.*norms.*meta-train the editor again"):
        load_editor_checkpoint(path, build_editor(cfg, model), config)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_normaliser_standardises_channels_of_any_scale(dtype):
    """Value-gradient channels of scale 1e-6 (SmolLM2's) and key channels of scale 1e3 alike come
    out with mean 0 and standard deviation 1: the epsilon is added to the std, 1.19e-7, far under 1e-6."""
    torch.manual_seed(0)
    scales = torch.tensor([1e-6, 1e-3, 1.0, 1e3], dtype=dtype).repeat_interleave(8)  # (32,)
    x = (torch.randn(4096, 32, dtype=torch.float64) * 3 + 5).to(dtype) * scales  # (n, 32), mean 5 * scale
    norm = RunningNorm(32).to(dtype)
    for chunk in x.split(1000):  # merged batch by batch, as meta-training feeds it
        norm.update(chunk)
    z = norm(x).double()
    torch.testing.assert_close(z.mean(0), torch.zeros(32, dtype=torch.float64), rtol=0, atol=1e-3)
    # the 1e-6 channels keep 1 - 1.19e-7 / 3e-6 = 0.96 of their std; a floor of 1e-4 would leave them at 0.03
    assert ((z.std(0) - 1).abs() < 0.05).all(), z.std(0)


def test_checkpoints_of_the_old_inputs_are_refused(trained, tmp_path):
    """A network of input version 1 (value gradients shrinking as 1/m, the sqrt(var + 1e-8) normaliser)
    was fed other inputs than this code gives it: refused, with the reason."""
    cfg, model, editor, _ = trained
    config = OmegaConf.to_container(cfg, resolve=True)
    state = {**editor.state_dict(), "config": config}
    assert state["input_version"] == INPUT_VERSION == 2
    del state["input_version"]  # as written by input version 1
    save_checkpoint(state, tmp_path / "old.pt")
    with pytest.raises(ValueError, match="inputs of version 1.*1/m.*sqrt\\(var \\+ 1e-8\\).*Meta-train"):
        load_editor_checkpoint(tmp_path / "old.pt", build_editor(cfg, model), config)
    save_checkpoint({**state, "input_version": INPUT_VERSION}, tmp_path / "new.pt")
    load_editor_checkpoint(tmp_path / "new.pt", build_editor(cfg, model), config)
