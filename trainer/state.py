"""Checkpoints that survive SIGKILL and a full disk at any moment, without pickle.

    <output>/checkpoints/step-00000020/  state/*.safetensors  trained weights + optimizer tensors: one file,
                                                              or one shard per process of a sharded (FSDP) run
                                         rng.safetensors      RNG states of the main process
                                         state.json           everything else (step, LR schedule, data position)
                                         <name>.safetensors   the user-facing generator / LoRA file(s)
    <output>/checkpoints/latest          name of the newest *complete* step folder

The state is read back through torch.distributed.checkpoint with its safetensors reader, which
cuts every tensor to the current layout: a checkpoint of 2 sharded processes resumes in 1
process (sharded or not) or in 4, and a plain one resumes sharded.

A step folder is written under a temporary name and renamed when complete; ``latest`` is then
replaced atomically. A kill or a failed write (disk full) before the rename leaves a ``.tmp-*``
folder that is ignored (and removed by the next save); the previous checkpoint stays usable.
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

STATE_VERSION = 2
STATE_DIR = "state"


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; the message names the previous, intact checkpoint."""


_FLAGS: dict = {}


class Group:
    """The processes of the run as the checkpoint code needs them (a single process when
    torch.distributed is not initialised)."""

    def __init__(self, device: torch.device | None = None):
        import torch.distributed as dist

        self.dist = dist if dist.is_available() and dist.is_initialized() else None
        self.rank = self.dist.get_rank() if self.dist else 0
        self.world = self.dist.get_world_size() if self.dist else 1
        self.device = device or torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.dist:
            self.dist.barrier()

    def all_true(self, flag: bool) -> bool:
        if not self.dist:
            return flag
        # One tensor per device for the life of the process: a fresh one per call can be released
        # last by gloo's worker thread, which then needs the GIL, and the process hung when that
        # happened while accelerate destroyed the process group at the end of a run.
        t = _FLAGS.setdefault(str(self.device), torch.zeros(1, dtype=torch.long, device=self.device))
        t.fill_(1 if flag else 0)
        self.dist.all_reduce(t, op=self.dist.ReduceOp.MIN)
        return bool(t.item())

    def any_true(self, flag: bool) -> bool:
        return not self.all_true(not flag)


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


def _is_dtensor(t) -> bool:
    return type(t).__name__ == "DTensor"


def training_tensors(module: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Weights and optimizer state as one flat dict of tensors (plain or sharded DTensors) plus
    JSON: ``model.<name>``, ``optim.<param index>.<key>``; scalar state (AdamW's step) goes to JSON."""
    tensors = {f"model.{k}": v.detach() for k, v in module.state_dict().items()}
    sd = optimizer.state_dict()
    scalars, shapes = {}, {}
    for pid, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v) and v.ndim > 0:
                tensors[f"optim.{pid}.{k}"] = v.detach()
                shapes[f"{pid}.{k}"] = list(v.shape)
            else:
                scalars[f"{pid}.{k}"] = {"value": float(v), "tensor": torch.is_tensor(v),
                                         "dtype": str(v.dtype).removeprefix("torch.") if torch.is_tensor(v) else None}
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars, "tensors": shapes}


def _write_state(folder: Path, tensors: dict, sharded: bool) -> None:
    """One safetensors file, or (sharded) one per process through torch.distributed.checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    if sharded:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint import HuggingFaceStorageWriter

        dcp.save(tensors, storage_writer=HuggingFaceStorageWriter(str(folder), save_distributed=True))
    else:
        save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(folder / "model-00001-of-00001.safetensors"))


def save_checkpoint(root: str | os.PathLike, step: int, module: torch.nn.Module, optimizer, scheduler, data_states: list[dict],
                    write_user_files, info: dict, keep: int = 2, group: Group | None = None, sharded: bool = False,
                    history: dict | None = None) -> Path:
    """Write a complete step folder, then point ``latest`` at it. ``write_user_files(folder)``
    writes the generator / LoRA file(s) into the temporary folder (main process only).
    Unsharded: call on the main process only. Sharded: call on every process.
    A failed write (disk full, permissions) raises :class:`CheckpointWriteError` after removing
    the partial folder; the previous checkpoint is untouched. ``history`` (losses so far, JSON)
    is kept so a resumed run reports and plots the whole run."""
    group = group or Group()
    root = Path(root)
    name = f"step-{step:08d}"
    tmp = root / f".tmp-{name}-w{group.world}"  # the same name on every process of a sharded save
    ok, err = True, None
    try:
        if group.is_main:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob(".tmp-*"):
                shutil.rmtree(stale, ignore_errors=True)  # a previous run died while saving
            tmp.mkdir()
    except OSError as e:
        ok, err = False, e
    if sharded:
        ok = group.all_true(ok)
    try:
        if ok:
            tensors, opt_meta = training_tensors(module, optimizer)
            _write_state(tmp / STATE_DIR, tensors, sharded)  # collective when sharded
            if group.is_main:
                write_user_files(str(tmp))
                rng_tensors, rng_meta = rng_state()
                save_file(rng_tensors, str(tmp / "rng.safetensors"))
                meta = {"version": STATE_VERSION, "step": step, "optimizer": opt_meta, "scheduler": scheduler.state_dict(),
                        "data": data_states, "rng": rng_meta, "info": info, "processes": group.world, "sharded": sharded,
                        "history": history or {}, "complete": True}
                (tmp / "state.json").write_text(json.dumps(meta, indent=1))
                _fsync_dir(tmp)
    except OSError as e:
        ok, err = False, e
    if sharded:
        ok = group.all_true(ok)
    if not ok:
        if group.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(root)
        reason = f"{err.strerror or err}" if err is not None else "another process failed to write its shard"
        raise CheckpointWriteError(
            f"checkpoint {name} could not be written ({reason}); "
            + (f"the previous checkpoint {previous} is intact and --resume continues from it" if previous else
               "there is no earlier checkpoint, so --resume would start from step 0")
            + ". Free disk space (or point --output elsewhere) to keep saving.")
    final = root / name
    if group.is_main:
        publish(tmp)
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


def publish(path: str | os.PathLike) -> None:
    """Make written files readable by the group and others (0644, folders 0755): some writers use
    private temp files (mode 0600), and a generator is meant to be copied into ComfyUI."""
    p = Path(path)
    try:
        if p.is_dir():
            p.chmod(0o755)
            for f in p.rglob("*"):
                f.chmod(0o755 if f.is_dir() else 0o644)
        elif p.exists():
            p.chmod(0o644)
    except OSError:
        pass  # a file system without modes


def _is_complete(d: Path) -> bool:
    return (d / "state.json").is_file() and ((d / STATE_DIR).is_dir() or (d / "state.safetensors").is_file())


def complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    out = []
    for d in root.glob("step-*"):
        try:
            meta = json.loads((d / "state.json").read_text())
            if meta.get("complete") and _is_complete(d):
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
        if _is_complete(d):
            return d
    found = complete_checkpoints(root)
    return max(found)[1] if found else None


def _scalar(entry: dict):
    if not entry["tensor"]:
        return entry["value"]
    return torch.tensor(entry["value"], dtype=getattr(torch, entry["dtype"]))


def load_checkpoint(folder: Path, module: torch.nn.Module, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, LR schedule and RNGs into the current (possibly sharded)
    module; returns the JSON metadata (step, data). Call on every process."""
    meta = json.loads((folder / "state.json").read_text())
    if meta.get("version", 1) == 1:  # one state.safetensors, written before sharded checkpoints existed
        return _load_v1(folder, meta, module, optimizer, scheduler)
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    opt_meta = meta["optimizer"]
    params = [p for g in optimizer.param_groups for p in g["params"]]
    targets = {f"model.{k}": v for k, v in module.state_dict().items()}
    state: dict[int, dict] = {}
    for key, shape in opt_meta["tensors"].items():
        pid, k = key.split(".", 1)
        p = params[int(pid)]
        if list(p.shape) != shape:
            raise ValueError(f"{folder}: optimizer state {key} has shape {shape}, the parameter has {list(p.shape)}; "
                             "the checkpoint is from another model configuration")
        state.setdefault(int(pid), {})[k] = targets[f"optim.{key}"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
    import warnings

    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
        dcp.load(targets, storage_reader=HuggingFaceStorageReader(str(folder / STATE_DIR)))
    module.load_state_dict({k[len("model."):]: v for k, v in targets.items() if k.startswith("model.")})
    for key, entry in opt_meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = _scalar(entry)
    optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(load_file(str(folder / "rng.safetensors")), meta["rng"])
    return meta


def _load_v1(folder: Path, meta: dict, module, optimizer, scheduler) -> dict:
    tensors = load_file(str(folder / "state.safetensors"))
    module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict = {}
    for key, v in tensors.items():
        if key.startswith("optim."):
            _, pid, k = key.split(".", 2)
            state.setdefault(int(pid), {})[k] = v
    for key, v in meta["optimizer"]["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    set_rng_state(tensors, meta["rng"])
    return meta
