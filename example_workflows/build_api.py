#!/usr/bin/env python
"""Write the API-format workflows (example_workflows/api/<id>.json): the graphs the tests run headless.

The UI-format twins (example_workflows/<title>.json, what a user drags into ComfyUI or opens
from the Templates dialog, where the file name is the title and <title>.jpg the thumbnail) are
made from these by ComfyUI's own frontend (``.venv/bin/python tests/test_workflows.py
--regenerate-ui``) and checked to agree with them in tests. Thumbnails and the example input
images come from scripts/make_examples.py.
"""
from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).resolve().parent
# What `make demo` writes (scripts/hywu_demo.py): the trained micro checkpoint and generator.
DEMO_CKPT = "hywu_demo_sd15_ip2p.safetensors"
DEMO_GENERATOR = "hywu_demo.safetensors"
DEMO_IMAGE = "hywu_demo_input.png"  # example_workflows/input/, copied into ComfyUI's input folder
DEMO_INSTRUCTION = "make it brighter"  # a task of the demo's synthetic edit world (scripts/hywu_demo.py COMFY_PAIR)
EXAMPLE_IMAGE = "hywu_example.png"
INSTRUCTION = "make it a snowy winter scene"


def sd15_ip2p(ckpt, generator, image, instruction=INSTRUCTION, steps=20, cfg=7.5, scheduler="normal", seed=0,
              prefix="hywu_edit", megapixels=None):
    """``megapixels``: an ImageScaleToTotalPixels (lanczos) between the source and Condition Encode, as the
    trainer's template buckets size sources (trainer/buckets.py); None: the source at its own size (the demo)."""
    wf = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt},
              "_meta": {"title": "Load Checkpoint (SD1.5 InstructPix2Pix)"}},
        "2": {"class_type": "LoadImage", "inputs": {"image": image}, "_meta": {"title": "Source image"}},
        "3": {"class_type": "HYWULoadGenerator", "inputs": {"generator_name": generator},
              "_meta": {"title": "HY-WU Load Generator"}},
        "4": {"class_type": "HYWUConditionEncode",
              "inputs": {"image": ["2", 0], "instruction": instruction, "one_edit_per_line": False, "clip": ["1", 1],
                         "generator": ["3", 0], "vae": ["1", 2]}, "_meta": {"title": "HY-WU Condition Encode"}},
        "5": {"class_type": "HYWUGenerateLoRA", "inputs": {"generator": ["3", 0], "hywu_cond": ["4", 0],
                                                        "include_shared": True},
              "_meta": {"title": "HY-WU Generate LoRA"}},
        "6": {"class_type": "HYWUApplyGeneratedLoRA",
              "inputs": {"model": ["1", 0], "lora": ["5", 0], "strength": 1.0, "batch_index": -1, "mode": "runtime"},
              "_meta": {"title": "HY-WU Apply Generated LoRA"}},
        "7": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]},
              "_meta": {"title": "Negative prompt"}},
        "8": {"class_type": "InstructPixToPixConditioning",
              "inputs": {"positive": ["4", 1], "negative": ["7", 0], "vae": ["1", 2], "pixels": ["4", 2]},
              "_meta": {"title": "InstructPixToPixConditioning"}},
        "9": {"class_type": "KSampler",
              "inputs": {"seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": scheduler,
                         "denoise": 1.0, "model": ["6", 0], "positive": ["8", 0], "negative": ["8", 1],
                         "latent_image": ["8", 2]}, "_meta": {"title": "KSampler"}},
        "10": {"class_type": "VAEDecode", "inputs": {"samples": ["9", 0], "vae": ["1", 2]},
               "_meta": {"title": "VAE Decode"}},
        "11": {"class_type": "SaveImage", "inputs": {"filename_prefix": prefix, "images": ["10", 0]},
               "_meta": {"title": "Save Image"}},
    }
    if megapixels is not None:
        wf["12"] = {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["2", 0], "upscale_method": "lanczos",
                                                                       "megapixels": megapixels, "resolution_steps": 1},
                    "_meta": {"title": "ImageScaleToTotalPixels"}}
        wf["4"]["inputs"]["image"] = ["12", 0]
    return wf


def two_edits_in_a_row(wf: dict, second: str, whole: str) -> dict:
    """An SD1.5 graph with a second HY-WU edit chained after the first (Condition Encode ->
    Generate LoRA -> Apply, the second Apply on the first one's MODEL: their LoRAs add up), and the
    sampler prompted with the whole instruction. Each generator call reads one edit of the two;
    the second leaves out the generator's shared part (trainer data.chain_shared: once)."""
    wf = json.loads(json.dumps(wf))
    wf["4"]["_meta"]["title"] = "HY-WU Condition Encode (first edit)"
    wf["12"] = {"class_type": "HYWUConditionEncode",
                "inputs": {**wf["4"]["inputs"], "instruction": second},
                "_meta": {"title": "HY-WU Condition Encode (second edit)"}}
    # include_shared off: the first edit's LoRA already carries the generator's shared part (counted once)
    wf["13"] = {"class_type": "HYWUGenerateLoRA", "inputs": {"generator": ["3", 0], "hywu_cond": ["12", 0],
                                                             "include_shared": False},
                "_meta": {"title": "HY-WU Generate LoRA (second edit)"}}
    wf["14"] = {"class_type": "HYWUApplyGeneratedLoRA", "inputs": {**wf["6"]["inputs"], "model": ["6", 0], "lora": ["13", 0]},
                "_meta": {"title": "HY-WU Apply Generated LoRA (second edit)"}}
    wf["15"] = {"class_type": "CLIPTextEncode", "inputs": {"text": whole, "clip": ["1", 1]},
                "_meta": {"title": "Whole instruction (the sampler's prompt)"}}
    wf["8"]["inputs"]["positive"] = ["15", 0]
    wf["9"]["inputs"]["model"] = ["14", 0]
    return wf


def flux_kontext(instruction="turn the car red", steps=20, seed=0):
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-kontext-dev.safetensors",
                                                      "weight_dtype": "default"}, "_meta": {"title": "Load Diffusion Model"}},
        "2": {"class_type": "DualCLIPLoader", "inputs": {"clip_name1": "clip_l.safetensors",
                                                          "clip_name2": "t5xxl_fp8_e4m3fn_scaled.safetensors",
                                                          "type": "flux", "device": "default"},
              "_meta": {"title": "DualCLIPLoader"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "ae.safetensors"}, "_meta": {"title": "Load VAE"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}, "_meta": {"title": "Source image"}},
        "5": {"class_type": "FluxKontextImageScale", "inputs": {"image": ["4", 0]},
              "_meta": {"title": "FluxKontextImageScale"}},
        "6": {"class_type": "HYWULoadGenerator", "inputs": {"generator_name": "hywu_flux_kontext.safetensors"},
              "_meta": {"title": "HY-WU Load Generator"}},
        "7": {"class_type": "HYWUConditionEncode",
              "inputs": {"image": ["5", 0], "instruction": instruction, "one_edit_per_line": False, "clip": ["2", 0],
                         "generator": ["6", 0], "vae": ["3", 0]}, "_meta": {"title": "HY-WU Condition Encode"}},
        "8": {"class_type": "HYWUGenerateLoRA", "inputs": {"generator": ["6", 0], "hywu_cond": ["7", 0],
                                                        "include_shared": True},
              "_meta": {"title": "HY-WU Generate LoRA"}},
        "9": {"class_type": "HYWUApplyGeneratedLoRA",
              "inputs": {"model": ["1", 0], "lora": ["8", 0], "strength": 1.0, "batch_index": -1, "mode": "runtime"},
              "_meta": {"title": "HY-WU Apply Generated LoRA"}},
        "10": {"class_type": "VAEEncode", "inputs": {"pixels": ["7", 2], "vae": ["3", 0]},
               "_meta": {"title": "VAE Encode"}},
        "11": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["7", 1], "latent": ["10", 0]},
               "_meta": {"title": "ReferenceLatent"}},
        "12": {"class_type": "FluxGuidance", "inputs": {"guidance": 2.5, "conditioning": ["11", 0]},
               "_meta": {"title": "FluxGuidance"}},
        "13": {"class_type": "ConditioningZeroOut", "inputs": {"conditioning": ["7", 1]},
               "_meta": {"title": "ConditioningZeroOut"}},
        "14": {"class_type": "KSampler",
               "inputs": {"seed": seed, "steps": steps, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple",
                          "denoise": 1.0, "model": ["9", 0], "positive": ["12", 0], "negative": ["13", 0],
                          "latent_image": ["10", 0]}, "_meta": {"title": "KSampler"}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["3", 0]},
               "_meta": {"title": "VAE Decode"}},
        "16": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hywu_kontext", "images": ["15", 0]},
               "_meta": {"title": "Save Image"}},
    }


def qwen_image_edit(instruction="replace the sky with a sunset", steps=20, seed=0):
    """Qwen-Image-Edit as in ComfyUI's own template (TextEncodeQwenImageEdit sees the image, cfg 2.5,
    AuraFlow shift 3); the instruction is typed once, in a String node read by both encoders."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "qwen_image_edit_fp8_e4m3fn.safetensors",
                                                      "weight_dtype": "default"}, "_meta": {"title": "Load Diffusion Model"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                                                      "type": "qwen_image", "device": "default"},
              "_meta": {"title": "Load CLIP"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "qwen_image_vae.safetensors"},
              "_meta": {"title": "Load VAE"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}, "_meta": {"title": "Source image"}},
        "5": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["4", 0], "upscale_method": "lanczos",
                                                                  "megapixels": 1.0, "resolution_steps": 1},
              "_meta": {"title": "ImageScaleToTotalPixels"}},
        "6": {"class_type": "PrimitiveStringMultiline", "inputs": {"value": instruction},
              "_meta": {"title": "Instruction"}},
        "7": {"class_type": "HYWULoadGenerator", "inputs": {"generator_name": "hywu_qwen_image_edit.safetensors"},
              "_meta": {"title": "HY-WU Load Generator"}},
        "8": {"class_type": "HYWUConditionEncode",
              "inputs": {"image": ["5", 0], "instruction": ["6", 0], "one_edit_per_line": False, "clip": ["2", 0],
                         "generator": ["7", 0], "vae": ["3", 0]}, "_meta": {"title": "HY-WU Condition Encode"}},
        "9": {"class_type": "HYWUGenerateLoRA", "inputs": {"generator": ["7", 0], "hywu_cond": ["8", 0],
                                                        "include_shared": True},
              "_meta": {"title": "HY-WU Generate LoRA"}},
        "10": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0},
               "_meta": {"title": "ModelSamplingAuraFlow"}},
        "11": {"class_type": "HYWUApplyGeneratedLoRA",
               "inputs": {"model": ["10", 0], "lora": ["9", 0], "strength": 1.0, "batch_index": -1, "mode": "runtime"},
               "_meta": {"title": "HY-WU Apply Generated LoRA"}},
        "12": {"class_type": "TextEncodeQwenImageEdit",
               "inputs": {"clip": ["2", 0], "prompt": ["6", 0], "vae": ["3", 0], "image": ["8", 2]},
               "_meta": {"title": "TextEncodeQwenImageEdit (positive)"}},
        "13": {"class_type": "TextEncodeQwenImageEdit", "inputs": {"clip": ["2", 0], "prompt": "", "vae": ["3", 0],
                                                                   "image": ["8", 2]},
               "_meta": {"title": "TextEncodeQwenImageEdit (negative)"}},
        "14": {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 2], "vae": ["3", 0]},
               "_meta": {"title": "VAE Encode"}},
        "15": {"class_type": "KSampler",
               "inputs": {"seed": seed, "steps": steps, "cfg": 2.5, "sampler_name": "euler", "scheduler": "simple",
                          "denoise": 1.0, "model": ["11", 0], "positive": ["12", 0], "negative": ["13", 0],
                          "latent_image": ["14", 0]}, "_meta": {"title": "KSampler"}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["3", 0]},
               "_meta": {"title": "VAE Decode"}},
        "17": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hywu_qwen_edit", "images": ["16", 0]},
               "_meta": {"title": "Save Image"}},
    }


def qwen_image_edit_plus(instruction="replace the sky with a sunset", steps=20, seed=0):
    """Qwen-Image-Edit-2509 / 2511 as in ComfyUI's own 2509 template: TextEncodeQwenImageEditPlus (image1 is the
    source; "Picture 1:" prompt, 384 px-area image for Qwen2.5-VL, 1 MP reference), AuraFlow shift 3, CFGNorm,
    cfg 2.5; the instruction is typed once, in a String node read by both encoders."""
    wf = qwen_image_edit(instruction, steps, seed)
    wf["1"]["inputs"]["unet_name"] = "qwen_image_edit_2509_fp8_e4m3fn.safetensors"
    wf["7"]["inputs"]["generator_name"] = "hywu_qwen_image_edit_plus.safetensors"
    for k, sign in (("12", "positive"), ("13", "negative")):
        inputs = wf[k]["inputs"]
        wf[k] = {"class_type": "TextEncodeQwenImageEditPlus",
                 "inputs": {"clip": inputs["clip"], "prompt": inputs["prompt"], "vae": inputs["vae"], "image1": inputs["image"]},
                 "_meta": {"title": f"TextEncodeQwenImageEditPlus ({sign})"}}
    wf["18"] = {"class_type": "CFGNorm", "inputs": {"model": ["11", 0], "strength": 1.0, "pre_cfg": False},
                "_meta": {"title": "CFGNorm"}}
    wf["15"]["inputs"]["model"] = ["18", 0]
    wf["17"]["inputs"]["filename_prefix"] = "hywu_qwen_edit_plus"
    return wf


def flux2_klein(instruction=INSTRUCTION, steps=20, seed=0):
    """FLUX.2 [klein] 4B base as in ComfyUI's own klein edit template (source scaled to 1 MP, ReferenceLatent on the
    positive and on the empty negative, Flux2Scheduler for the image's size, CFGGuider cfg 5, euler). The latent's
    batch follows Condition Encode's images, so one edit per line gives one image per line. For 9B: the 9B file
    and qwen_3_8b; for the distilled models: their file, 4 steps, cfg 1."""
    return {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "flux-2-klein-base-4b-fp8.safetensors",
                                                      "weight_dtype": "default"}, "_meta": {"title": "Load Diffusion Model"}},
        "2": {"class_type": "CLIPLoader", "inputs": {"clip_name": "qwen_3_4b.safetensors", "type": "flux2",
                                                      "device": "default"}, "_meta": {"title": "Load CLIP"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": "full_encoder_small_decoder.safetensors"},
              "_meta": {"title": "Load VAE"}},
        "4": {"class_type": "LoadImage", "inputs": {"image": EXAMPLE_IMAGE}, "_meta": {"title": "Source image"}},
        "5": {"class_type": "ImageScaleToTotalPixels", "inputs": {"image": ["4", 0], "upscale_method": "nearest-exact",
                                                                  "megapixels": 1.0, "resolution_steps": 1},
              "_meta": {"title": "ImageScaleToTotalPixels"}},
        "7": {"class_type": "HYWULoadGenerator", "inputs": {"generator_name": "hywu_flux2_klein.safetensors"},
              "_meta": {"title": "HY-WU Load Generator"}},
        "8": {"class_type": "HYWUConditionEncode",
              "inputs": {"image": ["5", 0], "instruction": instruction, "one_edit_per_line": False, "clip": ["2", 0],
                         "generator": ["7", 0], "vae": ["3", 0]}, "_meta": {"title": "HY-WU Condition Encode"}},
        "9": {"class_type": "HYWUGenerateLoRA", "inputs": {"generator": ["7", 0], "hywu_cond": ["8", 0],
                                                        "include_shared": True},
              "_meta": {"title": "HY-WU Generate LoRA"}},
        "10": {"class_type": "HYWUApplyGeneratedLoRA",
               "inputs": {"model": ["1", 0], "lora": ["9", 0], "strength": 1.0, "batch_index": -1, "mode": "runtime"},
               "_meta": {"title": "HY-WU Apply Generated LoRA"}},
        "11": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["2", 0]}, "_meta": {"title": "Negative prompt"}},
        "12": {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 2], "vae": ["3", 0]}, "_meta": {"title": "VAE Encode"}},
        "13": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["8", 1], "latent": ["12", 0]},
               "_meta": {"title": "ReferenceLatent (positive)"}},
        "14": {"class_type": "ReferenceLatent", "inputs": {"conditioning": ["11", 0], "latent": ["12", 0]},
               "_meta": {"title": "ReferenceLatent (negative)"}},
        "15": {"class_type": "GetImageSize", "inputs": {"image": ["8", 2]}, "_meta": {"title": "Get Image Size"}},
        "16": {"class_type": "EmptyFlux2LatentImage", "inputs": {"width": ["15", 0], "height": ["15", 1],
                                                                 "batch_size": ["15", 2]},
               "_meta": {"title": "Empty Flux 2 Latent"}},
        "17": {"class_type": "Flux2Scheduler", "inputs": {"steps": steps, "width": ["15", 0], "height": ["15", 1]},
               "_meta": {"title": "Flux2Scheduler"}},
        "18": {"class_type": "CFGGuider", "inputs": {"model": ["10", 0], "positive": ["13", 0], "negative": ["14", 0],
                                                     "cfg": 5.0}, "_meta": {"title": "CFGGuider"}},
        "19": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}, "_meta": {"title": "KSamplerSelect"}},
        "20": {"class_type": "RandomNoise", "inputs": {"noise_seed": seed}, "_meta": {"title": "RandomNoise"}},
        "21": {"class_type": "SamplerCustomAdvanced",
               "inputs": {"noise": ["20", 0], "guider": ["18", 0], "sampler": ["19", 0], "sigmas": ["17", 0],
                          "latent_image": ["16", 0]}, "_meta": {"title": "SamplerCustomAdvanced"}},
        "22": {"class_type": "VAEDecode", "inputs": {"samples": ["21", 0], "vae": ["3", 0]}, "_meta": {"title": "VAE Decode"}},
        "23": {"class_type": "SaveImage", "inputs": {"filename_prefix": "hywu_flux2_klein", "images": ["22", 0]},
               "_meta": {"title": "Save Image"}},
    }


WORKFLOWS = {
    # Real use: an SD1.5 InstructPix2Pix checkpoint (timbrooks/instruct-pix2pix) + a user-trained generator.
    # The source scaled to 0.25 MP (512 x 512 for a square), the size InstructPix2Pix was fine-tuned at.
    "hywu_edit_sd15_ip2p": sd15_ip2p("instruct-pix2pix-00-22000.safetensors", "hywu_sd15_ip2p.safetensors",
                                     EXAMPLE_IMAGE, megapixels=0.25),
    # DiT editing: FLUX.1 Kontext [dev] with ReferenceLatent.
    "hywu_edit_flux_kontext": flux_kontext(),
    # Qwen-Image-Edit: the sampler's conditioning from ComfyUI's TextEncodeQwenImageEdit (it sees the image).
    "hywu_edit_qwen_image_edit": qwen_image_edit(),
    # Qwen-Image-Edit-2509 / 2511: TextEncodeQwenImageEditPlus (the image named "Picture 1" in the prompt) + CFGNorm.
    "hywu_edit_qwen_image_edit_plus": qwen_image_edit_plus(),
    # FLUX.2 [klein] 4B base: ReferenceLatent on both CFG branches, Flux2Scheduler, CFGGuider (ComfyUI 0.30+ only).
    "hywu_edit_flux2_klein": flux2_klein(),
    # The same SD1.5 graph on the checkpoint and generator `make demo` trains (runs on a CPU in seconds).
    # Its sampler settings are the demo's (scripts/hywu_demo.py: 8 euler steps, simple schedule, cfg 1).
    "hywu_demo": sd15_ip2p(DEMO_CKPT, DEMO_GENERATOR, DEMO_IMAGE, instruction=DEMO_INSTRUCTION, steps=8, cfg=1.0,
                           scheduler="simple", prefix="hywu_demo"),
}
# Two edits in one request on the demo files: the first and second edit chained (bench/compose.py's
# "HY-WU per part, summed", docs/demo.md "Composition").
WORKFLOWS["hywu_demo_two_edits"] = two_edits_in_a_row(WORKFLOWS["hywu_demo"], "shift the image left",
                                                      "make it brighter and shift the image left")
# The UI twin of workflow <id> is example_workflows/<title>.json: ComfyUI's Templates dialog
# shows the file name as the title and <title>.jpg as the thumbnail.
TITLES = {
    "hywu_edit_sd15_ip2p": "HY-WU edit - SD1.5 InstructPix2Pix",
    "hywu_edit_flux_kontext": "HY-WU edit - FLUX.1 Kontext dev",
    "hywu_edit_qwen_image_edit": "HY-WU edit - Qwen-Image-Edit",
    "hywu_edit_qwen_image_edit_plus": "HY-WU edit - Qwen-Image-Edit-2509 and 2511",
    "hywu_edit_flux2_klein": "HY-WU edit - FLUX.2 klein 4B",
    "hywu_demo": "HY-WU demo - micro SD1.5 (run make demo first)",
    "hywu_demo_two_edits": "HY-WU two edits in a row - micro SD1.5 (run make demo first)",
}
# Workflows whose models exist in the test environment (the tests queue them through /prompt,
# with the demo's file names swapped for the seeded test pair: tests/hywu_graphs.py).
# the templates' (and core loaders') model-file inputs -> the ComfyUI model folder they list
MODEL_FILE_FOLDERS = {"ckpt_name": "checkpoints", "unet_name": "diffusion_models", "clip_name": "text_encoders",
                      "clip_name1": "text_encoders", "clip_name2": "text_encoders", "vae_name": "vae",
                      "lora_name": "loras", "generator_name": "hywu"}
RUNNABLE = ("hywu_demo", "hywu_demo_two_edits")


def main():
    for name, wf in WORKFLOWS.items():
        (HERE / "api" / f"{name}.json").write_text(json.dumps(wf, indent=2) + "\n")
        print(HERE / "api" / f"{name}.json")


if __name__ == "__main__":
    main()
