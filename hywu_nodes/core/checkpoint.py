"""The generator file: one ``.safetensors`` with the weights and, in its metadata, everything
needed to rebuild and use the generator (config, target spec, condition spec, base family,
LoRA rank/alpha, format version). Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .conditions import ConditionSpec
from .errors import GeneratorFileError
from .footprint import Footprint, MemoryBudget, estimate_footprint
from .generator import GeneratorConfig, HYWUGenerator
from .metadata_schema import FORMAT, FORMAT_VERSION, REMEDY, is_generator_metadata, parse_generator_metadata
from .safetensors_header import DTYPE_BYTES, SafetensorsHeader, read_safetensors_header
from .targets import TargetSpec

__all__ = ["FORMAT", "FORMAT_VERSION", "GeneratorFileError", "GeneratorInfo", "load_generator", "read_generator_info",
           "save_generator"]
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}


@dataclass
class GeneratorInfo:
    path: str
    base_family: str
    config: GeneratorConfig
    target_spec: TargetSpec
    condition_spec: ConditionSpec
    extra: dict = field(default_factory=dict)  # e.g. training steps, base model name
    format_version: int = FORMAT_VERSION
    footprint: Footprint | None = None  # set by load_generator


def save_generator(path: str | os.PathLike, generator: HYWUGenerator, extra: dict | None = None) -> None:
    """Write ``generator`` atomically (temp file + rename): a crash never leaves a half file."""
    cfg, spec = generator.config, generator.target_spec
    metadata = {
        "hywu.format": FORMAT,
        "hywu.format_version": str(FORMAT_VERSION),
        "hywu.base_family": spec.family,
        "hywu.config": json.dumps(cfg.to_dict(), sort_keys=True),
        "hywu.target_spec": spec.to_json(),
        "hywu.target_fingerprint": spec.fingerprint,
        "hywu.condition_spec": generator.condition_spec.to_json(),
        "hywu.rank": str(cfg.rank),
        "hywu.alpha": str(cfg.alpha),
        "hywu.extra": json.dumps(extra or {}, sort_keys=True),
    }
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in generator.state_dict().items()}
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _read(path: str, label: str) -> tuple[GeneratorInfo, SafetensorsHeader]:
    if not os.path.isfile(path):
        raise GeneratorFileError(f"{label} was not found.", "missing")
    header = read_safetensors_header(path, label)
    if not is_generator_metadata(header.metadata):
        raise GeneratorFileError(
            f"{label} is a safetensors file without HY-WU generator metadata: it looks like another kind of model "
            "(a LoRA or a checkpoint, which belong in models/loras or models/checkpoints). Pick a HY-WU generator "
            "file: the HY-WU trainer writes them.", "not_generator")
    meta = parse_generator_metadata(header.metadata, label)
    info = GeneratorInfo(path, meta.target_spec.family, meta.config, meta.target_spec, meta.condition_spec, meta.extra,
                         meta.version)
    return info, header


def read_generator_info(path: str | os.PathLike, label: str | None = None) -> GeneratorInfo:
    """Read and check a generator file's metadata without loading its weights. ``label`` names
    the file in messages (default: its file name, never the full path)."""
    path = os.fspath(path)
    return _read(path, label or os.path.basename(path))[0]


def _check_tensor_index(expected: dict, found: dict, label: str) -> None:
    """The file's tensor index against the state dict of the generator its metadata describes."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k].shape) != found[k].shape)
    not_float = sorted(k for k in found if found[k].dtype not in _FLOAT_DTYPES)
    if not (missing or unexpected or wrong or not_float):
        return
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing (e.g. '{missing[0]}')")
    if unexpected:
        parts.append(f"{len(unexpected)} not part of it (e.g. '{unexpected[0][:80]}')")
    if wrong:
        k = wrong[0]
        parts.append(f"{len(wrong)} of another shape (e.g. '{k}' is {list(found[k].shape)}, the metadata implies "
                     f"{list(expected[k].shape)})")
    if not_float:
        k = not_float[0]
        parts.append(f"{len(not_float)} not floating point (e.g. '{k[:80]}' is {found[k].dtype})")
    raise GeneratorFileError(f"{label}: the weights do not match the generator its metadata describes: "
                             f"{'; '.join(parts)}. {REMEDY}", "mismatch")


def load_generator(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None, *,
                   label: str | None = None, budget: MemoryBudget | None = None) -> tuple[HYWUGenerator, GeneratorInfo]:
    """Rebuild the generator from a file; raises :class:`GeneratorFileError` with the reason.

    Order: the header and every metadata field are checked; the generator is built on 'meta'
    and its state dict compared with the file's tensor index; its memory is estimated and
    checked against ``budget``; only then are the weights read (and checked to be finite)."""
    path = os.fspath(path)
    label = label or os.path.basename(path)
    info, header = _read(path, label)
    try:
        with torch.device("meta"):
            generator = HYWUGenerator(info.config, info.target_spec, info.condition_spec, index_buffers=False)
    except Exception as e:  # a combination of valid fields that does not build (e.g. heads vs d_model)
        raise GeneratorFileError(f"{label}: its metadata describes a generator that cannot be built ({e}). {REMEDY}",
                                 "metadata") from None
    _check_tensor_index(generator.state_dict(), header.tensors, label)
    itemsize = dtype.itemsize if dtype is not None else max(DTYPE_BYTES[t.dtype] for t in header.tensors.values())
    info.footprint = estimate_footprint(generator, itemsize)
    problem = budget.problem(info.footprint) if budget is not None else None
    if problem:
        raise GeneratorFileError(f"{label} does not fit: {problem}. Free memory (unload other models, close other "
                                 "programs) or pick a smaller generator.", "too_large")
    try:
        with safe_open(path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k).to(dtype) if dtype is not None else f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors' own checks (e.g. overlapping data)
        raise GeneratorFileError(f"{label}: the weights could not be read ({str(e)[:200]}). {REMEDY}",
                                 "damaged") from None
    bad = [k for k, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise GeneratorFileError(
            f"{label}: {len(bad)} of {len(tensors)} weight tensors hold NaN or infinite values (e.g. '{bad[0]}'): the "
            "training run diverged or the file is damaged. Use an earlier checkpoint of the training run, or pick "
            "another generator.", "non_finite")
    generator.load_state_dict(tensors, assign=True)
    generator.register_index_buffers()
    generator.to(device=device, dtype=dtype)
    generator.eval()
    return generator, info
