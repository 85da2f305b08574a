"""Read a ``.safetensors`` header without trusting it.

A safetensors file is an 8-byte little-endian header length, a JSON header (the tensor index:
name -> dtype, shape, byte offsets; plus ``__metadata__``, a str -> str map) and the tensor data.
Everything here is checked before anything is allocated from it: the length against the file
size and a cap, the JSON against the format, every tensor's byte range against its dtype, shape
and the file. Pickles, zip archives and GGUF files are recognised by their first bytes, so the
message says what the file is.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

from .errors import GeneratorFileError

# A generator header is tens of KB (a tensor index of a few hundred entries plus the target
# spec); the cap keeps a crafted header from costing more than a few tens of MB to parse.
MAX_HEADER_BYTES = 8 * 1024 * 1024
MAX_TENSORS = 100_000
MAX_DIMS = 8
DTYPE_BYTES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4, "F64": 8, "I64": 8, "U64": 8,
}
_COPY_AGAIN = "Copy the generator file again (an interrupted copy or download leaves such a file)."
_DAMAGED = "The file is damaged: copy the generator file again, or pick another generator."


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class SafetensorsHeader:
    metadata: dict[str, str]
    tensors: dict[str, TensorEntry]
    file_bytes: int


def _sniff(head: bytes, label: str) -> GeneratorFileError | None:
    """The error for a file that is recognisably something else, from its first bytes."""
    pickle_kind = None
    if head.startswith(b"PK\x03\x04"):
        pickle_kind = "a PyTorch checkpoint (a zip archive holding a pickle, as .pt/.ckpt/.pth files are)"
    elif len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        pickle_kind = "a Python pickle (as old .pt/.ckpt/.bin files are)"
    renamed = " renamed to .safetensors" if label.lower().endswith(".safetensors") else ""
    if pickle_kind:
        return GeneratorFileError(
            f"{label} is {pickle_kind}{renamed}. HY-WU never loads pickles (loading one can run code hidden in it). "
            "Use the generator's .safetensors file: the HY-WU trainer writes only those.", "pickle")
    if head.startswith(b"GGUF"):
        return GeneratorFileError(
            f"{label} is a GGUF file{renamed}. HY-WU generators are .safetensors files written by the HY-WU trainer: "
            "use that file.", "not_safetensors")
    return None


def read_safetensors_header(path: str, label: str) -> SafetensorsHeader:
    """Parse and check the header of ``path``; ``label`` names the file in messages."""
    size = os.path.getsize(path)
    if size == 0:
        raise GeneratorFileError(f"{label} is empty (0 bytes). {_COPY_AGAIN}", "empty")
    with open(path, "rb") as f:
        head = f.read(16)
        other = _sniff(head, label)
        if other:
            raise other
        if size < 10:
            raise GeneratorFileError(f"{label} is only {size} bytes, too short for a safetensors file. {_COPY_AGAIN}",
                                     "truncated")
        (n,) = struct.unpack("<Q", head[:8])
        if n > size - 8:
            raise GeneratorFileError(
                f"{label} is cut short or is not a safetensors file: its first 8 bytes announce a {n:,}-byte header, "
                f"but the file has only {size:,} bytes. {_COPY_AGAIN}", "truncated")
        if n > MAX_HEADER_BYTES:
            raise GeneratorFileError(
                f"{label} has a {n:,}-byte safetensors header; a HY-WU generator's header is at most "
                f"{MAX_HEADER_BYTES:,} bytes. {_DAMAGED}", "damaged")
        f.seek(8)
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise GeneratorFileError(
            f"{label} is not a readable safetensors file: its header is not valid JSON ({str(e)[:120]}). {_DAMAGED}",
            "damaged") from None
    if not isinstance(header, dict):
        raise GeneratorFileError(f"{label} is not a readable safetensors file: its header is not a JSON object. "
                                 f"{_DAMAGED}", "damaged")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
        raise GeneratorFileError(f"{label}: the safetensors metadata is not a map of text to text. {_DAMAGED}",
                                 "damaged")
    if len(header) > MAX_TENSORS:
        raise GeneratorFileError(f"{label} lists {len(header):,} tensors; a generator has far fewer. {_DAMAGED}",
                                 "damaged")
    data_bytes = size - 8 - n
    tensors, end_max = {}, 0
    for name, entry in header.items():
        problem = _entry_problem(entry)
        if problem:
            raise GeneratorFileError(f"{label}: tensor '{name[:80]}' in the safetensors header {problem}. {_DAMAGED}",
                                     "damaged")
        begin, end = entry["data_offsets"]
        end_max = max(end_max, end)
        tensors[name] = TensorEntry(entry["dtype"], tuple(entry["shape"]))
    if end_max > data_bytes:
        raise GeneratorFileError(
            f"{label} is truncated: its weights need {8 + n + end_max:,} bytes, the file has {size:,}. {_COPY_AGAIN}",
            "truncated")
    return SafetensorsHeader(metadata, tensors, size)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _entry_problem(entry) -> str | None:
    if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
        return "is not a {dtype, shape, data_offsets} entry"
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if dtype not in DTYPE_BYTES:
        return f"has an unknown dtype {str(dtype)[:20]!r}"
    if not isinstance(shape, list) or len(shape) > MAX_DIMS or not all(_is_count(d) for d in shape):
        return "has an invalid shape (it must be a list of at most 8 non-negative whole numbers)"
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        return "has invalid data offsets"
    begin, end = offsets
    if end < begin or end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        return f"has data offsets {offsets} that do not fit its shape {shape} and dtype {dtype}"
    return None
