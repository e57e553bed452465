"""The prefix states: the hidden states below the first edited block, computed once per tuple.

An edit changes only the edited modules, so every block below the first edited one computes, for a
tuple, exactly what it computed the last time that tuple went through: the hidden state entering the
first edited block depends on the tuple's tokens and the frozen lower weights alone. `PrefixStates`
holds that state per tuple and runs the model from it. For the call the lower blocks are swapped for a
pass-through and the state goes in as `inputs_embeds`, so the model's own code still builds the
attention mask and the positions, runs the upper blocks, the final norm and the output head.

Which families start from a hidden state exactly, in one place (`SPECS`):
  gpt2         its position embeddings, which the model adds to inputs_embeds, are zeroed for the call
               (the state the upper blocks start from holds them already)
  gptj, llama, qwen2, mistral   inputs_embeds is the first hidden state as it is
The states also persist on disk (`PrefixStore`, config `prefix_store`): every run with the same weights below the
first edited block reads what an earlier run, seed, editor or grid cell computed, so a tuple's lower blocks run
once per machine, not once per process.
Every other model runs whole, and `PrefixStates.reason` says why: T5 (its relative position bias is
computed by its first block and handed to the others, and its decoder reads the edited encoder through
cross-attention), BERT (its embeddings add positions, token types and a LayerNorm to inputs_embeds),
models dispatched over devices by accelerate (their hooks move tensors block by block).
"""
import hashlib
import json
import logging
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

# model_type: (the block list, does a block return a tuple, modules whose output is zeroed for the call)
SPECS = {
    "gpt2": ("transformer.h", False, ("transformer.wpe",)),
    "gptj": ("transformer.h", True, ()),
    "llama": ("model.layers", False, ()),
    "qwen2": ("model.layers", False, ()),
    "mistral": ("model.layers", False, ()),
}
WHY_NOT = {
    "t5": "T5's relative position bias is computed by its first block and handed to the others",
    "bert": "BERT's embeddings add positions, token types and a LayerNorm to inputs_embeds",
}


class PassThrough(nn.Module):
    """A lower block for the call: returns the hidden state it is given (as a 1-tuple where blocks return tuples)."""

    def __init__(self, block: nn.Module, as_tuple: bool):
        super().__init__()
        self.as_tuple = as_tuple
        if hasattr(block, "attention_type"):  # Qwen2-style models read it to pick the block's mask
            self.attention_type = block.attention_type

    def forward(self, hidden_states, *args, **kwargs):
        return (hidden_states, None) if self.as_tuple else hidden_states


class Zero(nn.Module):
    """An embedding that adds nothing: GPT-2's position embeddings, already inside the held state."""

    def __init__(self, embedding: nn.Embedding):
        super().__init__()
        self.dim, self.dtype = embedding.embedding_dim, embedding.weight.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.zeros(*ids.shape, self.dim, dtype=self.dtype, device=ids.device)


def first_block(prefix: str, edited: list[str]) -> int | None:
    """The lowest block index among the edited modules' names (`prefix`.<i>. ...); None when one lies outside
    the blocks (an embedding or the head: nothing is below it)."""
    if not edited or any(not n.startswith(prefix + ".") for n in edited):
        return None
    return min(int(n[len(prefix) + 1:].split(".")[0]) for n in edited)


class PrefixStore:
    """The prefix states on disk: one safetensors file per tuple under `root`/<fingerprint>-b<first block>/, named
    by the sha256 of the tuple's tokens, in the dtype the model computed them in (float32 for float32 models: read
    back, they are the same numbers). Shared by every process that runs the same lower weights: a file is written
    under a temporary name and renamed into place, so two runs can fill one store side by side and neither reads a
    torn file; a store of other weights or another first block is another folder, never read. At most `max_gb`:
    beyond it, states are computed each time and not stored, and one warning says so."""

    def __init__(self, root: str | Path, fingerprint: str, first: int, max_gb: float):
        self.dir, self.max_bytes = Path(root) / f"{fingerprint}-b{first}", max_gb * 2 ** 30
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "key.json").write_text(json.dumps({"fingerprint": fingerprint, "first_block": first}))
        self.bytes = sum(f.stat().st_size for f in self.dir.glob("*/*.safetensors"))  # by every run so far
        self.reads = self.writes = self.refused = 0

    def _path(self, tokens: bytes) -> Path:
        digest = hashlib.sha256(tokens).hexdigest()
        return self.dir / digest[:2] / f"{digest}.safetensors"

    def get(self, tokens: bytes) -> torch.Tensor | None:
        """The stored state (T, d) of the tuple with these token bytes, or None."""
        path = self._path(tokens)
        if not path.is_file():
            return None
        self.reads += 1
        return load_file(path)["h"]

    def put(self, tokens: bytes, state: torch.Tensor) -> None:
        """Store a state (T, d), unless it is there already or the store is at its limit."""
        path = self._path(tokens)
        if path.is_file():
            return
        size = state.numel() * state.element_size()
        if self.bytes + size > self.max_bytes:
            if not self.refused:
                log.warning("prefix store %s holds %.2f GiB, its limit (prefix_store_gb=%g): hidden states beyond "
                            "it are computed each time and not stored (raise prefix_store_gb, or delete the folder)",
                            self.dir, self.bytes / 2 ** 30, self.max_bytes / 2 ** 30)
            self.refused += 1
            return
        path.parent.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            save_file({"h": state.detach().cpu().contiguous()}, tmp)
            os.replace(tmp, path)  # atomic: readers see the whole file or none
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        self.bytes += path.stat().st_size  # as counted at the start: the files' sizes
        self.writes += 1


class PrefixStates:
    """The prefix states: the hidden states entering the first edited block, one (T, d) per tuple, held in memory
    on `device` up to `max_gb` (beyond that the lower blocks run again) and, with `store_dir`, read from and
    written to a `PrefixStore` on disk. `run` is what model/lm.py calls for every forward pass of an LM batch."""

    def __init__(self, model: nn.Module, edited: list[str], device="cpu", max_gb: float = 2.0, enabled: bool = True,
                 store_dir: str | Path | None = None, store_gb: float = 20.0):
        self.model, self.device, self.max_bytes = model, torch.device(device), max_gb * 2 ** 30
        self.disk: PrefixStore | None = None  # the states on disk (store_dir; None: this process's only)
        self.held: dict[tuple, torch.Tensor] = {}  # in memory: (fingerprint, first block, tokens) -> (T, d)
        self.hits = self.misses = self.bytes = self.not_kept = 0
        spec = SPECS.get(getattr(model.config, "model_type", None))
        self.reason = ("prefix_cache=false" if not enabled else "prefix_cache_gb=0" if max_gb == 0 else
                       "dispatched over devices (accelerate's hf_device_map)" if getattr(model, "hf_device_map", None)
                       else None if spec else WHY_NOT.get(model.config.model_type,
                                                          f"model_type {model.config.model_type!r} is not in SPECS"))
        self.first = None
        if self.reason is None:
            path, self.as_tuple, self.zeroed = spec
            self.blocks = model.get_submodule(path)
            self.first = first_block(path, edited)
            if not self.first:  # 0 or None
                self.reason = f"an edited module lies in the first block or outside the blocks ({edited})"
            else:
                self.fingerprint = self._fingerprint()
                if store_dir is not None:
                    self.disk = PrefixStore(store_dir, self.fingerprint, self.first, store_gb)

    @property
    def active(self) -> bool:
        return self.reason is None

    def _fingerprint(self) -> str:
        """sha256 of every weight except those of the first edited block and above: what the states depend on."""
        h, upper = hashlib.sha256(), {id(p) for b in self.blocks[self.first:] for p in b.parameters()}
        for name, p in self.model.named_parameters():
            if id(p) not in upper:
                h.update(name.encode() + p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        return h.hexdigest()

    def _keys(self, inputs: dict) -> list[tuple]:
        lengths = inputs["attention_mask"].sum(1).tolist()  # right-padded (data/collate.py)
        return [(self.fingerprint, self.first, row[:n].cpu().numpy().tobytes())
                for row, n in zip(inputs["input_ids"], lengths)]

    @contextmanager
    def _from_hidden(self):
        """The lower blocks as pass-throughs (and GPT-2's position embeddings zeroed) for one call."""
        saved = {i: self.blocks[i] for i in range(self.first)}
        zeroed = {n: self.model.get_submodule(n) for n in self.zeroed}
        try:
            for i, block in saved.items():
                self.blocks[i] = PassThrough(block, self.as_tuple)
            for n, module in zeroed.items():
                parent, _, child = n.rpartition(".")
                setattr(self.model.get_submodule(parent), child, Zero(module))
            yield
        finally:
            for i, block in saved.items():
                self.blocks[i] = block
            for n, module in zeroed.items():
                parent, _, child = n.rpartition(".")
                setattr(self.model.get_submodule(parent), child, module)

    def run(self, call, inputs: dict):
        """call(**inputs) (the model's forward), from the held states when every tuple of the batch has one;
        otherwise the whole model, keeping the states it passes through the first edited block."""
        if not self.active:
            return call(**inputs)
        keys = self._keys(inputs)
        states = [self._state(k) for k in keys]
        if all(s is not None for s in states):
            self.hits += len(keys)
            b, t = inputs["input_ids"].shape
            hidden = states[0].new_zeros(b, t, states[0].shape[-1])  # (B, T, d); padding: never read by a real token
            for i, s in enumerate(states):
                hidden[i, : len(s)] = s
            device = next(self.blocks[self.first].parameters()).device
            with self._from_hidden():
                return call(inputs_embeds=hidden.to(device), attention_mask=inputs["attention_mask"])
        self.misses += len(keys)
        seen = {}

        def keep(module, args, kwargs):
            seen["h"] = (args[0] if args else kwargs["hidden_states"]).detach()  # (B, T, d)
        handle = self.blocks[self.first].register_forward_pre_hook(keep, with_kwargs=True)
        try:
            out = call(**inputs)
        finally:
            handle.remove()
        lengths = inputs["attention_mask"].sum(1).tolist()
        for key, h, n in zip(keys, seen["h"], lengths):
            if self.disk is not None:
                self.disk.put(key[2], h[:n])
            self._keep(key, h[:n])
        return out

    def _state(self, key: tuple) -> torch.Tensor | None:
        """The state of a tuple: held in memory, else read from the disk store (and then held), else None."""
        if key in self.held or self.disk is None:
            return self.held.get(key)
        state = self.disk.get(key[2])
        if state is not None:
            self._keep(key, state)
        return state

    def _keep(self, key: tuple, state: torch.Tensor) -> None:
        """Hold a state (T, d) in memory, up to max_gb; beyond it the tuple is read or computed again next time."""
        size = state.numel() * state.element_size()
        if key in self.held:
            return
        if self.bytes + size > self.max_bytes:
            self.not_kept += 1
            return
        self.held[key] = state.to(self.device, copy=True)
        self.bytes += size

    def summary(self) -> dict:
        """results.json's `prefix_cache`: hits and misses (tuples), bytes and tuples held, passes whose state was not kept because
        it was full (prefix_cache_gb), the first edited block, and why it is off (null when on)."""
        disk = self.disk
        return {"hits": self.hits, "misses": self.misses, "bytes": self.bytes, "tuples": len(self.held),
                "not_kept": self.not_kept, "first_block": self.first, "off": self.reason,
                "store": None if disk is None else {"dir": str(disk.dir), "reads": disk.reads, "writes": disk.writes,
                                                    "bytes": disk.bytes, "not_stored": disk.refused}}
