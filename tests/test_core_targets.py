import json

import pytest

from hywu_nodes.core import TargetSpec, build_target_spec
from tiny_models import tiny_flux, tiny_qwen, tiny_unet


def test_sd15_default_targets_are_attention_and_ffn_linears():
    spec = build_target_spec(tiny_unet(), "sd15_ip2p")
    names = spec.names
    # 4 transformer blocks (down, mid, 2 up) x (attn1 q,k,v,out + attn2 q,k,v,out + ff in,out)
    assert len(names) == 40 and spec.n_groups == 4
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k" in names
    assert "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj" in names
    assert not any("proj_in" in n or "time_emb" in n for n in names)
    k = next(t for t in spec.targets if t.name.endswith("attn2.to_k"))
    assert (k.d_in, k.d_out) == (32, 32)  # cross-attention keys read the 32-wide text context


@pytest.mark.parametrize("family,model", [("flux_kontext", tiny_flux), ("qwen_image_edit", tiny_qwen)])
def test_dit_families_have_targets_in_every_block(family, model):
    spec = build_target_spec(model(), family)
    assert spec.n_groups >= 2 and all(t.d_in > 0 and t.d_out > 0 for t in spec.targets)
    assert any(n.endswith("attn.to_q") for n in spec.names) and any("add_k_proj" in n for n in spec.names)


def test_include_exclude_patterns():
    unet = tiny_unet()
    spec = build_target_spec(unet, "sd15_ip2p", include=[r"attn2\.to_[kv]$"], exclude=[r"^up_blocks"])
    assert spec.names == [
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
        "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_v",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    ]
    with pytest.raises(ValueError, match="selects no linear layers"):
        build_target_spec(unet, "sd15_ip2p", include=[r"no_such_layer"])
    with pytest.raises(ValueError, match="unknown base family"):
        build_target_spec(unet, "sdxl")


def test_spec_json_roundtrip_and_stable_fingerprint():
    spec = build_target_spec(tiny_unet(), "sd15_ip2p")
    again = TargetSpec.from_json(spec.to_json())
    assert again == spec and again.fingerprint == spec.fingerprint
    assert build_target_spec(tiny_unet(seed=5), "sd15_ip2p").fingerprint == spec.fingerprint  # weights don't matter
    data = json.loads(spec.to_json())
    data["targets"][0]["d_out"] += 1
    assert TargetSpec.from_dict(data).fingerprint != spec.fingerprint
