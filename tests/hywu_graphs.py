"""API-format graphs for the HY-WU node tests (built from example_workflows/api/hywu_demo.json).
Not a test module.

The shipped demo workflow loads what `make demo` trains; the tests run it on the seeded test
pair instead (the micro checkpoint and scripts/build_test_generator.py's generator) by
substituting the file names (:data:`TEST_FILES`)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / "example_workflows"
API_DIR = WORKFLOWS / "api"
NODE_IDS = ("HYWULoadGenerator", "HYWUConditionEncode", "HYWUGenerateLoRA", "HYWUApplyGeneratedLoRA")
# shipped file name -> the seeded test file that stands in for it
TEST_FILES = {
    "hywu_demo_sd15_ip2p.safetensors": "hywu_micro_sd15_ip2p.safetensors",
    "hywu_demo.safetensors": "hywu_micro_seeded.safetensors",
}


def load_api(name: str) -> dict:
    return json.loads((API_DIR / f"{name}.json").read_text())


def with_test_files(wf):
    """A copy of a workflow (API or UI format) with the demo's model files swapped for the test pair."""
    text = json.dumps(wf)
    for shipped, test in TEST_FILES.items():
        text = text.replace(json.dumps(shipped), json.dumps(test))
    return json.loads(text)


def demo(instruction=None, strength=None, seed=None, steps=2, generator=None, image=None, prefix="hywu_test",
         batch_index=None, mode=None, cfg=None) -> dict:
    """The demo graph on the seeded test pair, with overrides; 2 sampler steps. A list of
    instructions turns on one_edit_per_line (one edit per line, one sampler batch)."""
    wf = with_test_files(load_api("hywu_demo"))
    if isinstance(instruction, (list, tuple)):
        wf["4"]["inputs"]["one_edit_per_line"] = True
        instruction = "\n".join(instruction)
    if instruction is not None:
        wf["4"]["inputs"]["instruction"] = instruction
    if mode is not None:
        wf["6"]["inputs"]["mode"] = mode
    if cfg is not None:
        wf["9"]["inputs"]["cfg"] = cfg
    if strength is not None:
        wf["6"]["inputs"]["strength"] = strength
    if batch_index is not None:
        wf["6"]["inputs"]["batch_index"] = batch_index
    if seed is not None:
        wf["9"]["inputs"]["seed"] = seed
    if generator is not None:
        wf["3"]["inputs"]["generator_name"] = generator
    if image is not None:
        wf["2"]["inputs"]["image"] = image
    wf["9"]["inputs"]["steps"] = steps
    wf["11"]["inputs"]["filename_prefix"] = prefix
    return wf


def plain(instruction=None, seed=None, steps=2, image=None, prefix="hywu_plain", cfg=None) -> dict:
    """The same graph without HY-WU: CLIPTextEncode(instruction) -> InstructPixToPix -> KSampler."""
    wf = demo(instruction=instruction, seed=seed, steps=steps, image=image, prefix=prefix, cfg=cfg)
    text = wf["4"]["inputs"]["instruction"]
    for k in ("3", "4", "5", "6"):
        del wf[k]
    wf["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}}
    wf["8"]["inputs"]["positive"] = ["12", 0]
    wf["8"]["inputs"]["pixels"] = ["2", 0]
    wf["9"]["inputs"]["model"] = ["1", 0]
    return wf


def with_core_lora_loader(wf: dict, strength=1.0, save_prefix=None) -> dict:
    """Replace HY-WU Apply by core 'Load LoRA Model' (LoraModelLoader); optionally also save the
    generated LoRA with core 'Save LoRA Weights' (SaveLoRA)."""
    wf = copy.deepcopy(wf)
    wf["6"] = {"class_type": "LoraModelLoader", "inputs": {"model": ["1", 0], "lora": ["5", 0],
                                                           "strength_model": strength, "bypass": False}}
    if save_prefix:
        wf["13"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["5", 0], "prefix": save_prefix}}
    return wf


def with_static_lora(wf_plain: dict, lora_name: str, strength=1.0) -> dict:
    """The plain graph with a LoRA file through core LoraLoaderModelOnly."""
    wf = copy.deepcopy(wf_plain)
    wf["13"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0], "lora_name": lora_name,
                                                                "strength_model": strength}}
    wf["9"]["inputs"]["model"] = ["13", 0]
    return wf


def lora_only(instruction, prefix, generator=None, image=None) -> dict:
    """Load Generator -> Condition Encode -> Generate LoRA -> Save LoRA Weights (no sampling)."""
    wf = demo(instruction=instruction, generator=generator, image=image)
    keep = {k: wf[k] for k in ("1", "2", "3", "4", "5")}
    keep["13"] = {"class_type": "SaveLoRA", "inputs": {"lora": ["5", 0], "prefix": prefix}}
    return keep


def with_saved_latent(wf: dict, prefix: str) -> dict:
    """Also save the sampler's latent (core SaveLatent: output/latents/<prefix>_*.latent, safetensors)."""
    wf = copy.deepcopy(wf)
    wf["14"] = {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": f"latents/{prefix}"}}
    return wf


def as_sample_of_batch(wf: dict, index: int, count: int) -> dict:
    """Sample the graph's one latent as sample ``index`` of a batch of ``count`` (core Repeat Latent
    Batch -> Latent From Batch): the sampler then draws that sample's noise from the seed, so the
    run equals sample ``index`` of a batched run."""
    wf = copy.deepcopy(wf)
    wf["15"] = {"class_type": "RepeatLatentBatch", "inputs": {"samples": ["8", 2], "amount": count}}
    wf["16"] = {"class_type": "LatentFromBatch", "inputs": {"samples": ["15", 0], "batch_index": index, "length": 1}}
    wf["9"]["inputs"]["latent_image"] = ["16", 0]
    return wf


def make_test_image(seed: int, size: int = 64):
    """A seeded RGB test picture (gradient + noise), size x size."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([x, y, 1 - x * y], -1) * 200 + rng.normal(0, 20, (size, size, 3))
    return Image.fromarray(base.clip(0, 255).astype("uint8"), "RGB")


def image_array(path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
