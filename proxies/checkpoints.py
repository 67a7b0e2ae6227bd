"""Training checkpoints: one format for the longer training (proxies/longtrain.py) and the proxy's wsd
stable-phase checkpoint (proxies/train.py), from which a larger budget's run continues.

A checkpoint is a folder, written to a temporary sibling and renamed into place (a kill never leaves half of
one): `model.safetensors` (the weights), `optimizer.safetensors` (the optimizer's tensors flattened to
`state.<param index>.<name>`, and `torch_rng_state`) and `state.json` (`step`, `numpy_rng`: the data
sampler's bit-generator state, `optimizer`: its param groups and scalar state, and whatever progress the
writer adds: its plan, best loss, curves). Loading restores all of it, so a run continued from a checkpoint
goes on bit for bit as if never stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from proxies.artifacts import fsync_files


def flatten_optimizer(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The optimizer's state as safetensors-ready tensors and a JSON side (param groups, scalars)."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, values in state["state"].items():
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{index}.{name}"] = value.detach().to("cpu").contiguous().clone()
            else:
                scalars[f"{index}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], side: dict) -> dict:
    """The optimizer state dict `flatten_optimizer` took apart."""
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("state."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    for key, value in side["scalars"].items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": side["param_groups"]}


def write_checkpoint(
    final: Path, step: int, model, optimizer, rng: np.random.Generator, progress: dict, fsync: bool = True
) -> Path:
    """The checkpoint at `step` as the folder `final` (replacing one there), atomically."""
    from safetensors.torch import save_file

    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{step}-{time.time_ns()}"
    tmp.mkdir()
    try:
        weights = {name: t.detach().to("cpu").contiguous().clone() for name, t in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        tensors, side = flatten_optimizer(optimizer)
        tensors["torch_rng_state"] = torch.get_rng_state()
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        state = {**progress, "step": step, "numpy_rng": rng.bit_generator.state, "optimizer": side}
        (tmp / "state.json").write_text(json.dumps(state))
        if fsync:
            fsync_files(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # only left when writing failed
    return final


def read_state(path: Path) -> dict:
    """A checkpoint's state.json (its step, plan, curves), without loading any tensor."""
    return json.loads((Path(path) / "state.json").read_text())


def load_checkpoint(path: Path, model, optimizer, device: torch.device) -> tuple[dict, np.random.Generator]:
    """Weights, optimizer state and the torch RNG restored from `path`; its state and the data sampler's
    generator, where it stood."""
    from safetensors.torch import load_file

    path = Path(path)
    state = read_state(path)
    model.load_state_dict(load_file(str(path / "model.safetensors"), device=str(device)))
    tensors = load_file(str(path / "optimizer.safetensors"))
    torch.set_rng_state(tensors.pop("torch_rng_state"))
    optimizer.load_state_dict(unflatten_optimizer(tensors, state["optimizer"]))
    rng = np.random.default_rng()
    rng.bit_generator.state = state["numpy_rng"]
    return state, rng
