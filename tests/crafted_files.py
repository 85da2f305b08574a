"""Crafted generator files: every way a file in models/hywu can be wrong, made from one good
generator file. Used in-process (tests/test_core_file_checks.py) and through the real server
(tests/test_bad_inputs.py). Not a test module.

``CASES`` maps a case name to ``(make, needles)``: ``make(good, out)`` writes the bad file
``out`` from the good file ``good``; ``needles`` must all appear in the error message (what is
wrong and what to do). Nothing here loads a pickle: the pickled cases are written, never read.
"""
from __future__ import annotations

import io
import json
import pickle
import struct
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

COPY_AGAIN = "copy the generator file again"
EDITED = "copy it again from the output folder of its training run"


def read(good: Path) -> tuple[dict, dict]:
    with safe_open(str(good), framework="pt") as f:
        return dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}


def write(out: Path, meta: dict, tensors: dict) -> Path:
    save_file(tensors, str(out), metadata=meta)
    return out


def raw(data: bytes):
    def make(good, out):
        out.write_bytes(data)
        return out
    return make


def header_bytes(header: dict | bytes, data: bytes = b"", length: int | None = None):
    """A file with this header (JSON or raw bytes), an optional announced length and data."""
    def make(good, out):
        body = header if isinstance(header, bytes) else json.dumps(header).encode()
        out.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)
        return out
    return make


def meta_edit(**changes):
    """Replace (or with None drop) metadata keys; tensors unchanged."""
    def make(good, out):
        meta, tensors = read(good)
        for k, v in changes.items():
            if v is None:
                meta.pop(k, None)
            else:
                meta[k] = v
        return write(out, meta, tensors)
    return make


def json_edit(key: str, edit):
    """Edit the parsed JSON of metadata ``key`` in place with ``edit(obj)``; NaN is written as NaN."""
    def make(good, out):
        meta, tensors = read(good)
        obj = json.loads(meta[key])
        edit(obj)
        meta[key] = json.dumps(obj)
        return write(out, meta, tensors)
    return make


def config(**changes):
    return json_edit("hywu.config", lambda c: c.update(changes))


def target(**changes):
    return json_edit("hywu.target_spec", lambda s: s["targets"][0].update(changes))


def condition(index=0, options=None, **changes):
    def edit(sources):
        sources[index].update(changes)
        if options:
            sources[index]["options"].update(options)
    return json_edit("hywu.condition_spec", edit)


def tensor_edit(edit):
    """Edit the tensor dict with ``edit(tensors)``; metadata unchanged."""
    def make(good, out):
        meta, tensors = read(good)
        edit(tensors)
        return write(out, meta, tensors)
    return make


def _nan_first(tensors):
    k = sorted(tensors)[0]
    tensors[k] = torch.full_like(tensors[k], float("nan"))


def _int_tensor(tensors):
    k = sorted(tensors)[0]
    tensors[k] = torch.zeros(tensors[k].shape, dtype=torch.int64)


def truncated(good, out):
    data = good.read_bytes()
    out.write_bytes(data[: len(data) // 2])
    return out


def zip_pickle(good, out):
    buf = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buf)  # a zip archive with a pickle inside, as .pt files are
    out.write_bytes(buf.getvalue())
    return out


def plain_lora(good, out):
    return write(out, {}, {"lora_unet_x.lora_up.weight": torch.zeros(4, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 4)})


def oversized_header(good, out):
    body = b'{"__metadata__":{"pad":"' + b" " * (9 * 1024 * 1024) + b'"}}'
    out.write_bytes(struct.pack("<Q", len(body)) + body)
    return out


def too_large(good, out):
    """A self-consistent generator (every tensor present, metadata coherent) whose token grid is
    65,536 rows x 65,536 positions: a few MB on disk, petabytes to run. Built on 'meta'."""
    from hywu_nodes.core import ConditionSource, ConditionSpec, GeneratorConfig, HYWUGenerator, LinearTarget, TargetSpec
    from hywu_nodes.core.checkpoint import FORMAT, FORMAT_VERSION

    n = 65_536
    spec = TargetSpec("sd15_ip2p", tuple(LinearTarget(f"t{i}", 1, 1, i) for i in range(n)))
    cond = ConditionSpec((ConditionSource("text", "text_hidden_states", 8, 4),))
    cfg = GeneratorConfig(d_model=4, n_blocks=1, n_heads=1, token_width=1, rank=1, alpha=1.0, row_tokens=n)
    with torch.device("meta"):
        gen = HYWUGenerator(cfg, spec, cond, index_buffers=False)
    tensors = {k: torch.zeros(v.shape) for k, v in gen.state_dict().items()}
    meta = {"hywu.format": FORMAT, "hywu.format_version": str(FORMAT_VERSION), "hywu.base_family": "sd15_ip2p",
            "hywu.config": json.dumps(gen.config.to_dict()), "hywu.target_spec": spec.to_json(),
            "hywu.target_fingerprint": spec.fingerprint, "hywu.condition_spec": cond.to_json(),
            "hywu.rank": "1", "hywu.alpha": "1.0"}
    return write(out, meta, tensors)


CASES: dict[str, tuple] = {
    # bytes
    "empty": (raw(b""), ["empty (0 bytes)", COPY_AGAIN]),
    "three_bytes": (raw(b"abc"), ["only 3 bytes", COPY_AGAIN]),
    "zip_pickle": (zip_pickle, ["PyTorch checkpoint", "never loads pickles", ".safetensors file"]),
    "raw_pickle": (raw(pickle.dumps({"w": [0.0] * 4}, protocol=2)), ["Python pickle", "never loads pickles"]),
    "gguf": (raw(b"GGUF" + bytes(60)), ["GGUF file", "use that file"]),
    "header_beyond_file": (header_bytes({"a": 1}, length=10_000), ["cut short", "10,000-byte header", COPY_AGAIN]),
    "header_length_2_63": (header_bytes(b"{}", length=2 ** 63), ["cut short", COPY_AGAIN]),
    "header_over_cap": (oversized_header, ["header is at most", "copy the generator file again"]),
    "header_not_json": (header_bytes(b"{not json at all}"), ["not valid JSON", "damaged"]),
    "header_not_object": (header_bytes([1, 2, 3]), ["not a JSON object", "damaged"]),
    "tensor_bad_dtype": (header_bytes({"w": {"dtype": "X99", "shape": [1], "data_offsets": [0, 4]}}, bytes(4)),
                         ["unknown dtype", "damaged"]),
    "tensor_negative_shape": (header_bytes({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, bytes(4)),
                              ["invalid shape", "damaged"]),
    "tensor_offsets": (header_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}, bytes(8)),
                       ["do not fit its shape", "damaged"]),
    "truncated": (truncated, ["truncated", COPY_AGAIN]),
    # metadata
    "plain_lora": (plain_lora, ["without HY-WU generator metadata", "LoRA", "models/loras"]),
    "missing_key": (meta_edit(**{"hywu.condition_spec": None}), ["lacks hywu.condition_spec", EDITED]),
    "config_not_json": (meta_edit(**{"hywu.config": "{not json"}), ["'hywu.config' is not valid JSON", EDITED]),
    "version_word": (meta_edit(**{"hywu.format_version": "one"}), ["'one', not a version number", EDITED]),
    "version_zero": (meta_edit(**{"hywu.format_version": "0"}), ["'hywu.format_version' is 0", EDITED]),
    "version_newer": (meta_edit(**{"hywu.format_version": "99"}), ["format v99", "Update the HY-WU node pack"]),
    "unknown_key": (meta_edit(**{"hywu.future_field": "1"}), ["does not know (hywu.future_field)", "update the node pack"]),
    "unknown_config_field": (config(warp_factor=9), ["unknown field(s) warp_factor", EDITED]),
    "n_blocks_20000": (config(n_blocks=20000), ["'n_blocks' is 20000", "from 1 to 256", EDITED]),
    "row_tokens_huge": (config(row_tokens=10 ** 9), ["'row_tokens' is 1000000000", EDITED]),
    "row_tokens_max": (config(row_tokens=65_536), ["weights do not match", "of another shape", EDITED]),
    "d_model_zero": (config(d_model=0), ["'d_model' is 0", EDITED]),
    "n_heads_zero": (config(n_heads=0), ["'n_heads' is 0", EDITED]),
    "rank_negative": (config(rank=-1), ["'rank' is -1", EDITED]),
    "token_width_zero": (config(token_width=0), ["'token_width' is 0", EDITED]),
    "heads_do_not_divide": (config(n_heads=5), ["cannot be built", "not divisible", EDITED]),
    "ffn_mult_nan": (config(ffn_mult=float("nan")), ["'ffn_mult' is nan", "finite", EDITED]),
    "n_blocks_text": (config(n_blocks="2"), ["'n_blocks' is '2'", "whole number", EDITED]),
    "rank_fraction": (config(rank=2.5), ["'rank' is 2.5", "whole number", EDITED]),
    "checkpointing_text": (config(gradient_checkpointing="yes"), ["true or false", EDITED]),
    "alpha_infinite": (meta_edit(**{"hywu.alpha": "inf"}), ["'hywu.alpha' is inf", "finite", EDITED]),
    "d_in_1e13": (target(d_in=10 ** 13), ["'d_in' is 10000000000000", EDITED]),
    "d_out_negative": (target(d_out=-5), ["'d_out' is -5", EDITED]),
    "target_unknown_field": (target(bias=True), ["unknown field(s) bias", EDITED]),
    "family_disagrees": (meta_edit(**{"hywu.base_family": "flux_kontext"}),
                         ["base family 'flux_kontext', but its target layers are recorded for 'sd15_ip2p'", EDITED]),
    "family_unknown": (meta_edit(**{"hywu.base_family": "sdxl"}), ["'sdxl'", "does not know", "Update the node pack"]),
    "fingerprint": (meta_edit(**{"hywu.target_fingerprint": "0" * 16}), ["fingerprint", EDITED]),
    "condition_kind": (condition(kind="audio_tokens"), ["'kind' is 'audio_tokens'", EDITED]),
    "condition_width_zero": (condition(width=0), ["'width' is 0", EDITED]),
    "condition_resolution_huge": (condition(index=1, options={"resolution": 10 ** 6}), ["'resolution' is 1000000", EDITED]),
    "condition_unknown_option": (condition(options={"mystery": 1}), ["unknown field(s) mystery", EDITED]),
    "tensor_missing": (tensor_edit(lambda t: t.pop("head_a.weight")), ["weights do not match", "missing", EDITED]),
    "tensor_extra": (tensor_edit(lambda t: t.update(extra=torch.zeros(3))), ["not part of it", "'extra'", EDITED]),
    "tensor_shape": (config(d_model=128, n_heads=8), ["weights do not match", "of another shape", EDITED]),
    "tensor_integer": (tensor_edit(_int_tensor), ["not floating point", EDITED]),
    "weights_nan": (tensor_edit(_nan_first), ["NaN or infinite", "earlier checkpoint"]),
    "too_large": (too_large, ["does not fit", "GiB", "pick a smaller generator"]),
}


def make_all(good: Path, folder: Path, prefix: str = "hywu_bad_") -> dict[str, Path]:
    """Every case as ``folder/<prefix><case>.safetensors``."""
    folder.mkdir(parents=True, exist_ok=True)
    return {name: make(Path(good), folder / f"{prefix}{name}.safetensors") for name, (make, _) in CASES.items()}
