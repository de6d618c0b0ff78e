"""Training checkpoints: a directory per step, written under a temporary name and renamed when complete.

    out/checkpoints/step-000123/
        config.json, model.safetensors, ...               the model, as the trainer's task saves it
        optimizer.safetensors                             optimizer state tensors
        rng.safetensors                                   torch RNG states (uint8 tensors), one per rank
        state.json                                        step, data fingerprint, world size, optimizer
                                                          hyper-parameters, numpy/python RNG states

Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import os
import random
import re
import shutil
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mixret import io
from mixret.errors import MixretError

CHECKPOINTS = "checkpoints"
STATE_NAME = "state.json"
OPTIMIZER_NAME = "optimizer.safetensors"
RNG_NAME = "rng.safetensors"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_dir_name(step: int) -> str:
    return f"step-{step:06d}"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints of a run (renamed into place, with a state.json), oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if (m := _STEP_DIR.match(p.name)) and (p / STATE_NAME).is_file()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | os.PathLike) -> Path | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


# --- optimizer and RNG state <-> tensors + JSON -------------------------------------------------

def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split optimizer.state_dict() into tensors {"state.<param>.<key>": t} and a JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, per_param in sd["state"].items():
        for key, value in per_param.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    """Inverse of optimizer_to_flat: a dict for optimizer.load_state_dict."""
    state: dict[int, dict] = {}
    for name, t in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = t
    for idx, values in rest.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(values)
    return {"state": state, "param_groups": rest["param_groups"]}


def host_rng_state() -> dict:
    """numpy's and Python's global RNG states, as JSON."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {"numpy": [kind, keys.tolist(), pos, has_gauss, gauss],
            "python": [version, list(internal), gauss_next]}


def set_host_rng_state(state: dict) -> None:
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def torch_rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """This process's torch RNG states as uint8 tensors: "cpu", and "cuda" on a GPU."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def set_torch_rng_state(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


# --- save / load --------------------------------------------------------------------------------

def save_checkpoint(run_dir: str | os.PathLike, step: int, save_model: Callable[[Path], None],
                    optimizer: torch.optim.Optimizer, state: dict,
                    rng: dict[str, torch.Tensor], keep: int = 2) -> Path:
    """Write checkpoints/step-NNNNNN/ atomically and keep only the newest `keep` checkpoints.

    `save_model(directory)` writes the model (a folder mixret.load or the matcher reads); `state` is JSON
    (data fingerprint, world size...); `rng` maps names such as "rank0.cpu" to uint8 RNG-state tensors.
    Returns the checkpoint directory.
    """
    root = Path(run_dir) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(step)
    tmp = io.temp_dir(root, final.name)
    try:
        save_model(tmp)
        opt_tensors, opt_rest = optimizer_to_flat(optimizer)
        save_file(opt_tensors, str(tmp / OPTIMIZER_NAME), metadata={"format": "pt"})
        save_file({k: v.contiguous() for k, v in rng.items()}, str(tmp / RNG_NAME))
        io.write_json(tmp / STATE_NAME, {**state, "step": step, "optimizer": opt_rest,
                                         "host_rng": host_rng_state()})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    io.publish_dir(tmp, final)  # the same step may be written again (a resumed run reaching it anew)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def read_checkpoint(directory: str | os.PathLike) -> tuple[dict, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(state JSON, optimizer tensors, RNG tensors) of a checkpoint; the model is read with mixret.load
    or io.load_weights."""
    directory = Path(directory)
    state = io.read_json(directory / STATE_NAME, "checkpoint state")
    return state, _read_tensors(directory / OPTIMIZER_NAME), _read_tensors(directory / RNG_NAME)


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise MixretError(f"{path}: checkpoint file not found")
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for corrupt files
        raise MixretError(f"{path}: cannot read safetensors file ({e})") from None


def remove_temporaries(run_dir: str | os.PathLike) -> None:
    """Delete half-written checkpoint directories left by a crash (names starting with '.')."""
    root = Path(run_dir) / CHECKPOINTS
    if root.is_dir():
        for p in root.iterdir():
            if p.name.startswith(".") and p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
