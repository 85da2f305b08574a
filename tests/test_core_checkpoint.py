import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hywu_nodes.core import GeneratorFileError, load_generator, read_generator_info, save_generator, to_lora_state_dict
from tiny_models import COND_SPEC, make_condition, make_generator, tiny_unet


@pytest.fixture()
def saved(tmp_path):
    gen = make_generator(tiny_unet(), "sd15_ip2p", nonzero_b=True).eval()
    path = tmp_path / "gen.safetensors"
    save_generator(path, gen, extra={"steps": 7})
    return gen, path


def test_save_load_roundtrip(saved):
    gen, path = saved
    loaded, info = load_generator(path)
    assert info.base_family == "sd15_ip2p" and info.extra == {"steps": 7}
    assert info.config == gen.config and info.target_spec == gen.target_spec and info.condition_spec == COND_SPEC
    ref = gen.state_dict()
    assert ref.keys() == loaded.state_dict().keys()
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, ref[k]), k
    cond = make_condition(2)
    with torch.no_grad():
        assert torch.equal(loaded(cond), gen(cond))
    assert not any(name.startswith("tmp") or name.startswith(".tmp") for name in os.listdir(path.parent))


def test_metadata_describes_the_generator(saved):
    _, path = saved
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["hywu.format"] == "hywu-generator" and meta["hywu.rank"] == "4" and meta["hywu.alpha"] == "8"
    assert json.loads(meta["hywu.condition_spec"])[0]["name"] == "text"


def test_not_safetensors_is_refused(tmp_path):
    p = tmp_path / "model.ckpt"
    p.write_bytes(b"PK\x03\x04" + os.urandom(200))  # a zip/pickle-style torch checkpoint
    with pytest.raises(GeneratorFileError, match="PyTorch checkpoint .* never loads pickles"):
        load_generator(p)
    (tmp_path / "tiny.bin").write_bytes(b"abc")
    with pytest.raises(GeneratorFileError, match="too short for a safetensors file"):
        read_generator_info(tmp_path / "tiny.bin")
    with pytest.raises(GeneratorFileError, match="not found"):
        read_generator_info(tmp_path / "missing.safetensors")


def test_truncated_file_is_refused(saved, tmp_path):
    _, path = saved
    data = path.read_bytes()
    for cut in (len(data) // 2, 20):
        bad = tmp_path / f"cut{cut}.safetensors"
        bad.write_bytes(data[:cut])
        with pytest.raises(GeneratorFileError, match="truncated|not a safetensors"):
            load_generator(bad)


def test_plain_lora_file_is_not_a_generator(saved, tmp_path):
    gen, _ = saved
    lora_file = tmp_path / "lora.safetensors"
    save_file(to_lora_state_dict(gen.generate(make_condition(1)), "sd15_ip2p"), str(lora_file))
    with pytest.raises(GeneratorFileError, match="without HY-WU generator metadata"):
        load_generator(lora_file)


def rewrite(path, out, **changes):
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    meta.update(changes)
    tensors = {k: v for k, v in tensors.items() if k != changes.get("_drop")}
    meta.pop("_drop", None)
    save_file(tensors, str(out), metadata=meta)
    return out


def test_inconsistent_metadata_is_refused(saved, tmp_path):
    _, path = saved
    cases = {
        "fingerprint": ({"hywu.target_fingerprint": "0" * 16}, "fingerprint that does not match"),
        "family": ({"hywu.base_family": "flux_kontext"}, "base family 'flux_kontext', but its target layers"),
        "rank": ({"hywu.rank": "8"}, "rank 8 / alpha 8, but its generator config has rank 4"),
        "version": ({"hywu.format_version": "99"}, "format v99"),
        "config": ({"hywu.config": "{not json"}, "'hywu.config' is not valid JSON"),
        "weights": ({"_drop": "head_a.weight"}, "weights do not match"),
    }
    for name, (change, message) in cases.items():
        with pytest.raises(GeneratorFileError, match=message):
            load_generator(rewrite(path, tmp_path / f"{name}.safetensors", **change))


def test_lora_export_layout(saved):
    gen, _ = saved
    sd = to_lora_state_dict(gen.generate(make_condition(2)), "sd15_ip2p", index=1)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    assert sd[f"{name}.lora_down.weight"].shape == (4, 32) and sd[f"{name}.lora_up.weight"].shape == (32, 4)
    assert sd[f"{name}.alpha"].item() == 8.0  # ComfyUI scales by alpha / rank
    assert len(sd) == 3 * len(gen.target_spec.targets)
