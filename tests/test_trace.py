"""One edit's cached (key, value-gradient) pairs do not depend on its group.

The hyper-network's inputs must be the same whether an edit is traced alone, in a small group or inside a
large one, whatever data.batch_size: the edit loss is summed over answer tokens (model/trace.py), never
divided by a total of the group. Each token of the small group is matched to its twin in the large one.
"""
import pytest
import torch

from data.collate import Collator
from data.groups import edit_groups
from model.load import resolve_modules
from model.trace import token_mask, trace
from tests.helpers import build_model, make_cfg, records_for

FAMILIES = [("tiny-gpt2", "zsre"), ("tiny-gptj", "zsre"), ("tiny-llama", "zsre"), ("tiny-t5", "zsre"),
            ("tiny-bert", "fever")]


def traced(cfg, model, tokenizer, records, batch_size: int, token: str) -> dict[str, dict]:
    """Per module, per edit (named by its input tokens): its keys (n_i, d_in) and value gradients (n_i, d_out)."""
    family = cfg.model.family
    group = next(edit_groups(records, len(records), batch_size, Collator(tokenizer, family), seed=0, shuffle=False))
    modules = resolve_modules(model, list(cfg.model.edit_modules), "edit_modules")
    cache = trace(model, modules, group.edit, family, token, "cpu", "cpu", torch.float64)
    # the batches are sorted by length (data/groups.py): an edit is found by its tokens, not its place
    names = [tuple(ids[mask.bool()].tolist()) for b in group.edit for ids, mask in zip(b["input_ids"], b["attention_mask"])]
    assert len(set(names)) == len(records)
    out = {}
    for name, (keys, grads) in cache.items():  # rows: batch by batch, each batch example by example (row-major)
        counts = torch.cat([token_mask(b, family, name, token).sum(1) for b in group.edit]).tolist()
        out[name] = dict(zip(names, zip(keys.split(counts), grads.split(counts))))
    return out


@pytest.mark.parametrize("token", ["ans", "all"])
@pytest.mark.parametrize("model_name,data", FAMILIES)
def test_an_edits_inputs_do_not_depend_on_its_group(model_name, data, token):
    cfg = make_cfg(f"model={model_name}", f"data={data}")
    torch.manual_seed(0)
    model, tokenizer = build_model(cfg)
    model.double()
    records = records_for(cfg.model.family, 24)
    small = records[3:7]  # four edits, traced alone in batches of one
    large = records[:3] + records[20:24] + small[:2] + records[7:20] + small[2:]  # 24 edits, batches of five
    alone = traced(cfg, model, tokenizer, small, batch_size=1, token=token)
    inside = traced(cfg, model, tokenizer, large, batch_size=5, token=token)
    for name in alone:
        assert len(alone[name]) == len(small)
        for j, edit in enumerate(alone[name]):
            (k_a, g_a), (k_b, g_b) = alone[name][edit], inside[name][edit]
            assert k_a.shape == k_b.shape and k_a.shape[0] > 0, (name, j)
            assert g_a.abs().max() > 0, f"{name}: value gradients of edit {j} are zero, the check would be vacuous"
            assert torch.allclose(k_a, k_b, rtol=1e-10, atol=1e-12), (name, j)
            assert torch.allclose(g_a, g_b, rtol=1e-10, atol=1e-14 * g_a.abs().max()), (name, j)
