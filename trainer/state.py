"""Checkpoints that survive SIGKILL at any moment, without pickle.

    <output>/checkpoints/step-00000020/  trained weights + optimizer tensors (state.safetensors),
                                         everything else as JSON (state.json), and the
                                         user-facing generator / LoRA file(s)
    <output>/checkpoints/latest          name of the newest *complete* step folder

A step folder is written under a temporary name and renamed when complete; ``latest`` is then
replaced atomically. A kill before the rename leaves a ``.tmp-*`` folder that is ignored (and
removed by the next save); a kill after it leaves a complete folder.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

STATE_VERSION = 1


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass  # not supported everywhere (e.g. Windows); the rename is still atomic


def rng_state() -> tuple[dict, dict]:
    """(tensors, json) of every RNG the loop touches."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    py = random.getstate()
    return tensors, {"numpy": [kind, int(pos), int(has_gauss), float(gauss)], "python": [py[0], list(py[1]), py[2]]}


def set_rng_state(tensors: dict, meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        states = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    v, inner, g = meta["python"]
    random.setstate((v, tuple(inner), g))


def _flatten_optimizer(sd: dict) -> tuple[dict, dict]:
    tensors, scalars = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict, meta: dict) -> dict:
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(root: str | os.PathLike, step: int, module: torch.nn.Module, optimizer, scheduler, data_states: list[dict],
                    write_user_files, info: dict, keep: int = 2) -> Path:
    """Write a complete step folder, then point ``latest`` at it. ``write_user_files(folder)``
    writes the generator / LoRA file(s) into the temporary folder."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)  # a previous run died while saving
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    write_user_files(str(tmp))
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    opt_tensors, opt_meta = _flatten_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    save_file({**tensors, **opt_tensors, **rng_tensors}, str(tmp / "state.safetensors"))
    meta = {"version": STATE_VERSION, "step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
            "data": data_states, "rng": rng_meta, "info": info, "complete": True}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    _fsync_dir(tmp)
    final = root / name
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    pointer = root / f".latest-{os.getpid()}"
    pointer.write_text(name)
    os.replace(pointer, root / "latest")
    _fsync_dir(root)
    for old in sorted(complete_checkpoints(root))[:-keep]:
        shutil.rmtree(old[1], ignore_errors=True)
    return final


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    for d in root.glob("step-*"):
        try:
            meta = json.loads((d / "state.json").read_text())
            if meta.get("complete") and (d / "state.safetensors").is_file():
                out.append((int(meta["step"]), d))
        except (OSError, ValueError, KeyError):
            continue
    return out


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    """The folder ``latest`` names if complete, else the newest complete step folder."""
    root = Path(root)
    if not root.is_dir():
        return None
    pointer = root / "latest"
    if pointer.is_file():
        d = root / pointer.read_text().strip()
        if (d / "state.json").is_file() and (d / "state.safetensors").is_file():
            return d
    found = complete_checkpoints(root)
    return max(found)[1] if found else None


def load_checkpoint(folder: Path, module: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, LR schedule and RNGs; returns the JSON metadata (step, data)."""
    meta = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "state.safetensors"))
    module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    optimizer.load_state_dict(_unflatten_optimizer(tensors, meta["optimizer"]))
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(tensors, meta["rng"])
    return meta
