"""The generator file: one ``.safetensors`` with the weights and, in its metadata, everything
needed to rebuild and use the generator (config, target spec, condition spec, base family,
LoRA rank/alpha, format version). Nothing is ever unpickled.
"""
from __future__ import annotations

import json
import os
import struct
import tempfile
from dataclasses import dataclass, field

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .conditions import ConditionSpec
from .generator import GeneratorConfig, HYWUGenerator
from .targets import TargetSpec

FORMAT = "hywu-generator"
# v2 added generator options (condition_norm + its stored statistics, shared_rank, film) and the
# text source's layer/mask options. A v1 file is a v2 file with every option off: it loads as is.
FORMAT_VERSION = 2
_REQUIRED = ("hywu.format", "hywu.format_version", "hywu.base_family", "hywu.config", "hywu.target_spec",
             "hywu.target_fingerprint", "hywu.condition_spec", "hywu.rank", "hywu.alpha")


class GeneratorFileError(ValueError):
    """A file that is not a usable HY-WU generator; the message says why and what to do."""


@dataclass
class GeneratorInfo:
    path: str
    base_family: str
    config: GeneratorConfig
    target_spec: TargetSpec
    condition_spec: ConditionSpec
    extra: dict = field(default_factory=dict)  # e.g. training steps, base model name


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


def _check_safetensors_header(path: str) -> None:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise GeneratorFileError(f"{path} is not a safetensors file (only {size} bytes). HY-WU generators are .safetensors files written by trainer.train.")
        (n,) = struct.unpack("<Q", head)
        if n > 100_000_000 or f.read(1) != b"{":
            raise GeneratorFileError(
                f"{path} is not a safetensors file (no safetensors header). HY-WU loads generators from "
                ".safetensors only; pickled .pt/.ckpt/.bin files are refused for safety."
            )
        if 8 + n > size:
            raise GeneratorFileError(f"{path} is truncated: its header says {8 + n} bytes, the file has {size}. Copy or download it again.")


def read_generator_info(path: str | os.PathLike) -> GeneratorInfo:
    """Read and check a generator file's metadata without loading its weights."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise GeneratorFileError(f"generator file not found: {path}")
    _check_safetensors_header(path)
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own parse errors
        raise GeneratorFileError(f"{path} is not a readable safetensors file: {e}") from e
    if meta.get("hywu.format") != FORMAT:
        raise GeneratorFileError(
            f"{os.path.basename(path)} has no HY-WU generator metadata: it looks like another kind of model "
            "(a LoRA or checkpoint?). Pick a generator trained with `python -m trainer.train`."
        )
    missing = [k for k in _REQUIRED if k not in meta]
    if missing:
        raise GeneratorFileError(f"{path}: generator metadata is missing {missing}; the file is damaged or was not written by trainer.train")
    version = int(meta["hywu.format_version"])
    if version > FORMAT_VERSION:
        raise GeneratorFileError(f"{path} uses generator format v{version}; this HY-WU supports up to v{FORMAT_VERSION}. Update the node pack.")
    try:
        config = GeneratorConfig.from_dict(json.loads(meta["hywu.config"]))
        spec = TargetSpec.from_json(meta["hywu.target_spec"])
        cond = ConditionSpec.from_json(meta["hywu.condition_spec"])
        extra = json.loads(meta.get("hywu.extra", "{}"))
    except (ValueError, KeyError, TypeError) as e:
        raise GeneratorFileError(f"{path}: generator metadata is malformed ({e})") from e
    problems = []
    if spec.fingerprint != meta["hywu.target_fingerprint"]:
        problems.append(f"target fingerprint {meta['hywu.target_fingerprint']} != {spec.fingerprint} of the recorded spec")
    if spec.family != meta["hywu.base_family"]:
        problems.append(f"base family '{meta['hywu.base_family']}' != target spec family '{spec.family}'")
    if int(meta["hywu.rank"]) != config.rank or float(meta["hywu.alpha"]) != config.alpha:
        problems.append("rank/alpha disagree with the generator config")
    if problems:
        raise GeneratorFileError(f"{path}: inconsistent generator metadata: " + "; ".join(problems))
    return GeneratorInfo(path, spec.family, config, spec, cond, extra)


def load_generator(path: str | os.PathLike, device="cpu", dtype: torch.dtype | None = None) -> tuple[HYWUGenerator, GeneratorInfo]:
    """Rebuild the generator from a file; raises :class:`GeneratorFileError` with the reason."""
    info = read_generator_info(path)
    with torch.device("meta"):
        generator = HYWUGenerator(info.config, info.target_spec, info.condition_spec)
    try:
        with safe_open(info.path, framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:
        raise GeneratorFileError(f"{info.path}: could not read the weights ({e}); the file may be damaged") from e
    expected = {k: tuple(v.shape) for k, v in generator.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        diff = sorted(set(expected.items()) ^ set(found.items()))[:5]
        raise GeneratorFileError(f"{info.path}: weights do not match the recorded generator config (first differences: {diff})")
    generator.load_state_dict(tensors, assign=True)
    generator.register_index_buffers()  # they were built on 'meta' with the weights
    generator.to(device=device, dtype=dtype)
    generator.eval()
    return generator, info

