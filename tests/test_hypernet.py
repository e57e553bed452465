"""The hyper-network as the runs behind the paper's numbers built it (methods.md, "Where the paper
is silent"): block h + s * max(0, h A B + c) + t, one input normaliser per weight shape."""
import pytest
import torch
from omegaconf import OmegaConf

from checkpoint import load_editor_checkpoint
from editor.hypernet import HyperNet
from experiment import build_editor
from tests.conftest import build_model, make_cfg, one_group, records_for
from util import save_checkpoint


def test_block_matches_a_hand_computation():
    net = HyperNet(d_in=2, d_out=1, n_layers=1, rank=2, n_blocks=1, lr_init=1.0, lambda_init=1.0)
    with torch.no_grad():  # no statistics yet: the normaliser is the identity
        net.A[0] = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # (d, r)
        net.B[0] = torch.tensor([[1.0, 0.0, -1.0], [0.0, 2.0, 1.0]])  # (r, d)
        net.c[0] = torch.tensor([0.5, -1.0, 0.0])
        net.scale[0, 0] = torch.tensor([2.0, 1.0, 1.0])
        net.shift[0, 0] = torch.tensor([0.1, 0.2, 0.3])
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
    editor.edit_with_residual(group.edit)
    editor.edit_group(group)
    assert all(torch.equal(before[k], v) for k, v in editor.net.state_dict().items())


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
