"""Template buckets (trainer/buckets.py, base.buckets: template): the trainer sizes a row as the family's shipped
template does, and batches share one size.

* the scale nodes: trainer.buckets' FluxKontextImageScale and ImageScaleToTotalPixels give ComfyUI's sizes and
  pixels (bit-equal) on 3:2, 9:16 and odd-sized sources, in-process on the ComfyUI under test (0.30 and 0.3.75);
* every shipped API template scales its source with the node the trainer mirrors (class, method, megapixels);
* BatchStream: each global batch is one bucket, every row comes once per epoch, a resumed stream continues
  exactly, and a bucket smaller than a batch is filled with its own rows;
* a 60-pair mixed-aspect folder dataset trains end to end on the tiny SD1.5 and Qwen-Image-Edit bases with its
  encodings cached per bucket (the next run reads them from disk and trains the same losses); 200 pairs train the
  klein generator of tests/test_family_flux2.py's template test. The family parity
  of the reference latents is in the family test modules; the klein template on a non-square source in
  tests/test_family_flux2.py.
"""
from __future__ import annotations

import inspect
import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import comfy_harness
from mixed_aspect import as_comfy, comfy_scaled, mixed_aspect_folders, picture
from trainer.buckets import TEMPLATE_SCALE, ScaleNode, template_scale

SOURCES = [(150, 100), (90, 160), (97, 61), (1000, 1000), (33, 250)]  # 3:2, 9:16, odd sides, square, very tall


@pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile)
@pytest.mark.parametrize("node", [ScaleNode("kontext"), ScaleNode("total_pixels", "lanczos", 0.25),
                                  ScaleNode("total_pixels", "nearest-exact", 0.01), ScaleNode("total_pixels", "lanczos", 1.0)],
                         ids=["kontext", "lanczos-0.25", "nearest-0.01", "lanczos-1"])
def test_scale_nodes_match_comfyui(node, monkeypatch):
    import trainer.buckets

    monkeypatch.setitem(trainer.buckets.TEMPLATE_SCALE, "probe", node)
    for k, (w, h) in enumerate(SOURCES[:3] if node.kind == "kontext" else SOURCES):  # kontext: every output ~1 MP
        image = as_comfy(picture(w, h, seed=k))
        theirs = comfy_scaled("probe", image)
        ours = node(image.movedim(-1, 1)).movedim(1, -1)
        assert node.size(w, h) == (theirs.shape[2], theirs.shape[1]), (w, h)
        assert torch.equal(ours, theirs), (node, w, h, float((ours - theirs).abs().max()))


def test_templates_scale_as_the_trainer_does():
    """Each family's shipped API template scales the source with the node and settings trainer.buckets mirrors."""
    from example_workflows.build_api import WORKFLOWS

    for family, node in TEMPLATE_SCALE.items():
        wf = json.loads((comfy_harness.REPO / "example_workflows" / "api" / f"hywu_edit_{family}.json").read_text())
        assert wf == WORKFLOWS[f"hywu_edit_{family}"]  # the file is build_api's
        scales = [n for n in wf.values() if n["class_type"] in ("FluxKontextImageScale", "ImageScaleToTotalPixels")]
        assert len(scales) == 1, family
        inputs = scales[0]["inputs"]
        if node.kind == "kontext":
            assert scales[0]["class_type"] == "FluxKontextImageScale"
        else:
            assert scales[0]["class_type"] == "ImageScaleToTotalPixels"
            assert (inputs["upscale_method"], inputs["megapixels"], inputs["resolution_steps"]) == (node.method, node.megapixels, node.steps)
        # the scaled image is what HY-WU Condition Encode reads (and passes on to the base's nodes)
        encode = next(n for n in wf.values() if n["class_type"] == "HYWUConditionEncode")
        assert wf[encode["inputs"]["image"][0]] is scales[0], family
    assert template_scale("qwen_image_edit", 0.5).megapixels == 0.5
    assert template_scale("flux_kontext", 0.5) == TEMPLATE_SCALE["flux_kontext"]  # no megapixels on that node


def _mixed_rows(sizes):
    rows = []
    for i, (w, h) in enumerate(sizes):
        img = Image.new("RGB", (w, h), (i * 7 % 256, 40, 90))
        rows.append({"source": img, "target": img, "instruction": f"edit {i}"})
    return rows


def test_bucket_stream_batches_share_a_size_and_resume_exactly():
    from trainer.data import BatchStream, EditDataset

    # 11 rows at 3:2, 7 at 9:16, 2 at 1:1 (a bucket smaller than a global batch of 4)
    sizes = [(150, 100)] * 11 + [(90, 160)] * 7 + [(100, 100)] * 2
    order = torch.randperm(len(sizes), generator=torch.Generator().manual_seed(3)).tolist()
    ds = EditDataset(_mixed_rows([sizes[i] for i in order]), scale=ScaleNode("total_pixels", "lanczos", 0.01))
    streams = [BatchStream(ds, 2, 32, seed=5, rank=r, world=2) for r in range(2)]
    shapes, epoch_rows = set(), []
    for _ in range(12 // 4 + 8 // 4 + 4 // 4):  # an epoch: each bucket filled up to whole global batches of 4
        a, b = (s.next_batch() for s in streams)
        assert a["source"].shape == b["source"].shape == a["target"].shape  # one bucket per global batch
        shapes.add(tuple(a["source"].shape[-2:]))
        epoch_rows += a["row"].tolist() + b["row"].tolist()
    assert streams[0].epoch == 0 and streams[0].cursor == 24
    assert set(epoch_rows) == set(range(len(sizes))) and len(epoch_rows) == 24  # every row, 4 repeats to fill up
    assert shapes == {(84, 125), (137, 77), (102, 102)}
    # resume: a fresh stream from the state continues exactly
    state = streams[0].state_dict()
    expect = [streams[0].next_batch()["row"].tolist() for _ in range(5)]
    again = BatchStream(ds, 2, 32, seed=5, rank=0, world=2)
    again.load_state_dict(state)
    assert [again.next_batch()["row"].tolist() for _ in range(5)] == expect


def test_mixed_aspect_folders_train_with_cached_buckets(tmp_path):
    """60 pairs at 3:2, 9:16 and 1:1 (ai-toolkit's folder layout) on the tiny SD1.5 and Qwen-Image-Edit bases:
    the data check reports the buckets, training batches are one bucket each, the encodings are cached per row at
    their bucket's size, and a second run reads them from disk and trains the same losses."""
    from trainer.tiny_bases import tiny_config
    from trainer.train import run

    data = mixed_aspect_folders(tmp_path / "pairs", 60)
    for family in ("sd15_ip2p", "qwen_image_edit"):
        def config(out):
            return tiny_config(family, tmp_path / out, base={"buckets": "template", "megapixels": 0.01},
                               data={"source": "folders", "path": str(data), "n_train": None, "val_fraction": 0.03,
                                     "n_val": 3, "cache_dir": str(tmp_path / f"cache-{family}")},
                               train={"max_steps": 4, "batch_size": 2, "validate_every": 0, "log_every": 1})
        first = run(config(f"{family}-1"), progress=False)
        second = run(config(f"{family}-2"), progress=False)
        assert first["data_check"]["train"]["buckets"] == {"125x84": 20, "77x137": 20, "102x102": 20}
        assert first["encoded_rows"]["rows"] == 58 and second["encoded_rows"]["from_disk"], second["encoded_rows"]
        assert second["losses"] == first["losses"]
        cache = next((tmp_path / f"cache-{family}").glob("encoded-*.safetensors"))
        with safe_open(str(cache), "pt") as f:
            shapes = {tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.startswith("target.")}
        assert len(shapes) == 3, shapes  # one latent size per bucket
        assert Image.open(first["samples"]).size[0] > 0
        with safe_open(first["files"][0], "pt") as f:  # the file says how its sources were sized
            assert json.loads(f.metadata()["hywu.extra"])["trained_image_scale"] == "ImageScaleToTotalPixels lanczos 0.01 MP"


def test_bucket_cache_bench(tmp_path):
    """bench/bucket_cache.py on a few rows: square and template caches measured, the full-size arithmetic."""
    import sys

    sys.path.insert(0, str(comfy_harness.REPO / "bench"))
    try:
        import bucket_cache
    finally:
        sys.path.pop(0)
    out = bucket_cache.main(["--rows", "9", "--families", "sd15_ip2p"])
    tiny = out["tiny"]["sd15_ip2p"]
    assert tiny["square"]["rows"] == tiny["template"]["rows"] == 9
    assert len(tiny["square"]["target_latent_sizes"]) == 1  # one square bucket
    assert len(tiny["template"]["target_latent_sizes"]) == 3 and tiny["size_ratio"] > 1
    row = bucket_cache.full_size_row_bytes("flux2_klein")  # 1254 x 836: 78 x 52 latent of 128 channels
    assert row["target"] == row["source"] == 128 * 78 * 52 * 2 and row["condition_source"] == 128 * 64 * 64 * 2


@pytest.mark.parametrize("base,message", [
    ({"buckets": "aspect"}, r"base.buckets must be one of square, template, got 'aspect'"),
    ({"megapixels": 0.5}, r"base.megapixels sizes the template buckets: set base.buckets: template"),
    ({"family": "flux_kontext", "buckets": "template", "megapixels": 0.5}, r"FluxKontextImageScale, which has fixed"),
    ({"buckets": "template", "megapixels": 40.0}, r"base.megapixels must be in \[0.01, 16\]"),
])
def test_bucket_options_are_checked(base, message):
    from trainer.config import ConfigError, TrainConfig, apply, validate

    cfg = TrainConfig()
    cfg.base.path = "models/somewhere"
    apply(cfg, {"base": base})
    with pytest.raises(ConfigError, match=message):
        validate(cfg)
