"""Qwen-Image-Edit and Qwen-Image-Edit-2509/2511 ("Plus"), trained here and run there: the shipped templates end to
end in a real ComfyUI server (condition parity: tests/test_family_qwen_parity.py).

Base: the trainer's tiny Qwen base (trainer/tiny_bases.py: Qwen2.5-VL with ComfyUI's qwen25 tokenizer, Wan 2.1 VAE
layout, tiny DiT). ComfyUI side: its own classes through the test-only nodes in tests/comfy_test_nodes (tiny_dit.py:
the DiT; tiny_qwen_te.py: QwenImageTEModel as CLIPLoader builds it, at the tiny widths), the real VAELoader with the
tiny VAE in ComfyUI's Wan format, everything else the shipped template (example_workflows/api/hywu_edit_qwen_image_edit
(_plus).json). Two more swaps, both for CPU time: ImageScaleToTotalPixels is bypassed (the source stays 32 px), and
TextEncodeQwenImageEdit(Plus) becomes HYWUTestQwenEditEncode, the same ComfyUI calls at the generator's small
vl_pixels / reference_pixels instead of the core nodes' fixed 1 MP (a 1 MP reference takes minutes on this CPU with
the tiny VAE); test_edit_encode_twin_matches_the_core_nodes shows that at 1 MP it hands the CLIP and the VAE exactly
what the core nodes hand them.

What must hold: a generator trained by `python -m trainer.train` (20 steps, cached under models/e2e/) gives the
trainer's own edit (QwenImageEdit.sample: euler on ComfyUI's simple schedule of ModelSamplingAuraFlow(3), true CFG 2.5
against the empty instruction with the same image, CFGNorm 1 for Plus) at PSNR >= 40 dB in runtime and patch mode;
strength 0 differs from strength 1 by PSNR < 35 dB. N edits in one batch do not run through these templates in
ComfyUI 0.3.75 (its Wan VAE encodes an image batch as video frames, and TextEncodeQwenImageEdit(Plus) shows Qwen2.5-VL
one image with one prompt), so only one edit per sampler batch is checked here; two edits chained on one image (two
Condition Encode -> Generate LoRA -> Apply chains, as trainer/edits.py trains rows with `edits`) give the trainer's
chained edit at PSNR >= 40 dB.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import comfy_harness
import family_e2e as E

pytestmark = pytest.mark.floor  # also on ComfyUI 0.3.75, the requires-comfyui floor (Makefile)

STEPS, SEED, CFG, SHIFT = 3, 0, 2.5, 3.0
FAMILIES = ("qwen_image_edit", "qwen_image_edit_plus")
VAE_NAME = "hywu_test_tiny_qwen_vae.safetensors"


def _options(family):
    return {"cfg": CFG, "shift": SHIFT, "cfg_norm": 1.0 if family.endswith("_plus") else None}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Per family: (train config, adapter, generator file); and the tiny VAE in ComfyUI's format."""
    comfy_harness.load_comfy_nodes(comfy_harness.comfyui_path())
    from comfy_test_nodes.tiny_qwen_te import write_comfy_vae
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    torch.set_num_threads(2)
    out = {}
    for family in FAMILIES:
        cfg = tiny_config(family, tmp_path_factory.mktemp("unused"), train={"max_steps": 20, "lr": 3e-3},
                          data={"n_train": 8, "n_val": 2}, generator={"shared_rank": 2})
        cfg.name = f"e2e_{family}"
        out[family] = (cfg, load_family(cfg, torch.device("cpu"), torch.float32), E.train_generator(cfg))
    vae = write_comfy_vae(out[FAMILIES[0]][0].base.path, tmp_path_factory.mktemp("vae") / VAE_NAME)
    return out, vae


@pytest.fixture(scope="module")
def server(trained):
    from trainer.data import pil_to_tensor
    from trainer.synthetic import make_examples

    runs, vae = trained
    example = make_examples("val", 1, resolution=32)[0]
    with comfy_harness.ComfyServer(extra_models={"hywu": [r[2] for r in runs.values()], "vae": [vae]},
                                   custom_nodes=[comfy_harness.REPO / "tests" / "comfy_test_nodes"]) as srv:
        yield srv, srv.put_input(example.source, "qwen_e2e_source.png"), pil_to_tensor(example.source)[None], example.instruction


def _graph(family, cfg, gen, image, instruction, mode, strength=1.0):
    """The shipped template: loaders swapped for the test nodes, ImageScaleToTotalPixels bypassed, the Qwen edit
    encoders at the generator's small sizes."""
    wf = E.template(f"hywu_edit_{family}")
    base = cfg.base.path
    E.swap_node(wf, "UNETLoader", "HYWUTestTinyDiTLoader", path=f"{base}/transformer")
    E.swap_node(wf, "CLIPLoader", "HYWUTestTinyQwenTE", path=base)
    E.set_inputs(wf, "VAELoader", vae_name=VAE_NAME)
    E.bypass_node(wf, "ImageScaleToTotalPixels", "image")
    core = "TextEncodeQwenImageEditPlus" if family.endswith("_plus") else "TextEncodeQwenImageEdit"
    for k in [k for k, v in wf.items() if v["class_type"] == core]:
        inputs = wf[k]["inputs"]
        wf[k] = {"class_type": "HYWUTestQwenEditEncode", "inputs": {
            "clip": inputs["clip"], "prompt": inputs["prompt"], "vae": inputs["vae"], "image": inputs.get("image", inputs.get("image1")),
            "plus": family.endswith("_plus"), "vl_pixels": cfg.base.vl_pixels, "reference_pixels": cfg.base.reference_pixels}}
    E.set_inputs(wf, "LoadImage", image=image)
    E.set_inputs(wf, "PrimitiveStringMultiline", value=instruction)
    E.set_inputs(wf, "HYWULoadGenerator", generator_name=gen.name)
    E.set_inputs(wf, "HYWUApplyGeneratedLoRA", mode=mode, strength=strength)
    E.set_inputs(wf, "KSampler", steps=STEPS, seed=SEED)
    return wf


@pytest.mark.parametrize("family", FAMILIES)
def test_template_edit_equals_trainer_edit(trained, server, family):
    """POST /prompt of the template graph = the trainer's in-process edit, runtime and patch mode; the LoRA matters."""
    runs, _ = trained
    cfg, adapter, gen = runs[family]
    srv, image, src, instruction = server
    ours = E.trainer_edit(adapter, gen, src, [instruction], STEPS, SEED, **_options(family))
    base = E.trainer_edit(adapter, gen, src, [instruction], STEPS, SEED, strength=0.0, **_options(family))
    for mode in ("runtime", "patch"):
        theirs = E.run_images(srv, _graph(family, cfg, gen, image, instruction, mode), f"qwen_{family}_{mode}")
        assert theirs.shape == ours.shape == (1, 32, 32, 3)
        p = E.psnr(theirs, ours)
        print(f"{family} {mode}: ComfyUI template vs trainer PSNR {p:.1f} dB")
        assert p >= 40, (family, mode, p)
    zero = E.run_images(srv, _graph(family, cfg, gen, image, instruction, "runtime", strength=0.0), f"qwen_{family}_zero")
    p_zero, p_base = E.psnr(zero, ours), E.psnr(zero, base)
    print(f"{family}: strength 0 vs strength 1 PSNR {p_zero:.1f} dB; strength 0 vs trainer's strength 0 {p_base:.1f} dB")
    assert p_zero < 35 and p_base >= 40


@pytest.mark.parametrize("family", FAMILIES)
def test_two_chained_edits_equal_the_trainers_chained_edit(trained, server, family):
    """The template with a second HY-WU edit chained on the same image (Condition Encode -> Generate LoRA with
    include_shared off -> Apply on the first Apply's MODEL), the sampler prompted with the whole instruction = what
    the trainer trains a row with `edits` on (trainer.edits.EditPlan, data.chain_shared: once)."""
    from hywu_nodes.core import load_generator, lora_patched
    from trainer.edits import EditPlan

    runs, _ = trained
    cfg, adapter, gen = runs[family]
    srv, image, src, _ = server
    edits, whole = ("make it brighter", "shift the image left"), "make it brighter and shift the image left"
    generator, _ = load_generator(gen)
    generator.eval()
    assert generator.config.shared_rank == 2
    plan = EditPlan.of({"instruction": [whole], "edits": [edits]}, shared_once=generator.config.shared_rank)
    first_alone = EditPlan.of({"instruction": [whole], "edits": [edits[:1]]})

    @torch.no_grad()
    def trainer_chain(plan):
        lora = plan.chain(generator(plan.image_condition(adapter, src)))
        with lora_patched(adapter.denoiser, lora.to(adapter.device, adapter.dtype)):
            return E.to_uint8(adapter.sample(src, [whole], STEPS, seed=SEED, **_options(family)))

    ours, ours_first = trainer_chain(plan), trainer_chain(first_alone)
    wf = _graph(family, cfg, gen, image, whole, "runtime")
    first, apply = E.node_id(wf, "HYWUConditionEncode"), E.node_id(wf, "HYWUApplyGeneratedLoRA")
    wf[first]["inputs"]["instruction"] = edits[0]  # the Primitive (the whole instruction) still prompts the sampler
    wf["90"] = {"class_type": "HYWUConditionEncode", "inputs": {**wf[first]["inputs"], "instruction": edits[1]}}
    wf["91"] = {"class_type": "HYWUGenerateLoRA", "inputs": {"generator": wf[first]["inputs"]["generator"],
                                                             "hywu_cond": ["90", 0], "include_shared": False}}
    wf["92"] = {"class_type": "HYWUApplyGeneratedLoRA", "inputs": {**wf[apply]["inputs"], "model": [apply, 0], "lora": ["91", 0]}}
    E.set_inputs(wf, "KSampler", model=["92", 0])
    theirs = E.run_images(srv, wf, f"qwen_{family}_chained")
    p, p_first = E.psnr(theirs, ours), E.psnr(theirs, ours_first)
    print(f"{family}: two chained edits in ComfyUI vs the trainer's chained edit PSNR {p:.1f} dB, "
          f"vs the trainer's first edit alone {p_first:.1f} dB")
    assert p >= 40 and p >= p_first + 5, (family, p, p_first)  # and the second edit changed the picture


def test_edit_encode_twin_matches_the_core_nodes():
    """At the core nodes' own totals (1 MP; Plus: 384^2 for Qwen2.5-VL, 1 MP multiple of 8 for the reference) the test
    twin hands the CLIP and the VAE exactly what TextEncodeQwenImageEdit(Plus) hand them (recorded, not encoded)."""
    nodes = comfy_harness.load_comfy_nodes(comfy_harness.comfyui_path())
    from comfy_test_nodes.tiny_qwen_te import HYWUTestQwenEditEncode

    class Recorder:  # stands in for the CLIP and the VAE: keeps what a node passes them
        def __init__(self):
            self.calls = []

        def tokenize(self, text, **kw):
            self.calls.append(("tokenize", text, kw))
            return {"qwen25_7b": [[(0, 1.0)]]}

        def encode_from_tokens_scheduled(self, tokens):
            return [[torch.zeros(1, 1, 4), {}]]

        def encode(self, pixels):
            self.calls.append(("encode", pixels))
            return torch.zeros(1, 16, 1, 2, 2)

    def same(a, b):
        if isinstance(a, torch.Tensor):
            return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
        if isinstance(a, (list, tuple)):
            return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
        return a == b

    image = torch.rand(1, 48, 40, 3, generator=torch.Generator().manual_seed(0))
    for plus, core, vl in ((False, "TextEncodeQwenImageEdit", 1024 * 1024), (True, "TextEncodeQwenImageEditPlus", 384 * 384)):
        theirs, ours = Recorder(), Recorder()
        kw = {"image1": image} if plus else {"image": image}
        nodes[core].execute(theirs, "make it red", vae=theirs, **kw)
        HYWUTestQwenEditEncode().encode(ours, "make it red", ours, image, plus=plus, vl_pixels=vl, reference_pixels=1024 * 1024)
        assert [c[0] for c in theirs.calls] == ["tokenize", "encode"] or [c[0] for c in theirs.calls] == ["encode", "tokenize"]
        key = lambda c: c[0]  # noqa: E731  (the core Edit node encodes before it tokenizes)
        assert same(sorted(theirs.calls, key=key), sorted(ours.calls, key=key)), core


def test_sampler_schedule_is_comfyui_simple_on_auraflow():
    """The trainer's shifted schedule = ComfyUI's KSampler (simple) on ModelSamplingAuraFlow(shift 3), the templates'."""
    nodes = comfy_harness.load_comfy_nodes(comfy_harness.comfyui_path())
    import comfy.samplers
    from comfy_test_nodes.tiny_dit import tiny_dit_patcher

    from trainer.families.qwen_image_edit import flow_sigmas
    from trainer.tiny_bases import CACHE, build_tiny_base

    patcher = tiny_dit_patcher(build_tiny_base("qwen_image_edit", CACHE / "qwen_image_edit") / "transformer")
    out = nodes["ModelSamplingAuraFlow"]().patch_aura(patcher, SHIFT)[0]
    for steps in (1, 3, 20):
        theirs = comfy.samplers.calculate_sigmas(out.get_model_object("model_sampling"), "simple", steps)
        assert float((flow_sigmas(steps, SHIFT) - theirs).abs().max()) < 1e-6, steps
    assert np.isclose(float(flow_sigmas(3, SHIFT)[0]), 1.0)
