"""HY-WU Condition Encode: image + edit instruction -> HYWU_COND (+ the sampler's CONDITIONING).

The features follow the generator's condition spec exactly as the trainer extracts them
(``hywu_nodes.core.conditions``; parity is tested in tests/test_train_parity.py):

* ``text_hidden_states``: ``clip.encode_from_tokens(clip.tokenize(instruction))`` (the base's own
  text encoder; for SD1.5 CLIP-L after the final norm, 77 x 768) at the hidden layer the spec
  names (``clip.clip_layer``, as CLIP Set Last Layer counts; the sampler's conditioning keeps the
  CLIP as connected), truncated to the source's ``max_tokens`` (with a warning); with
  ``mask: padding`` the tokens after the prompt's end token are masked (``core.prompt_mask``).
  Qwen-Image-Edit(-Plus) generators (``vl_prompt`` option) read the instruction as the core
  TextEncodeQwenImageEdit(Plus) node encodes it, with the source image shown to Qwen2.5-VL
  (resized to ``vl_pixels``, area): ``clip.tokenize(prompt, images=[image], ...)``, and keep the
  hidden states after the image (``vl_tokens: after_image``), one padded row per edit with a mask.
* ``vae_latent_patches``: ``square_resize(image, resolution).clamp(0, 1)`` -> ``vae.encode`` -> the
  denoiser's latent space ``latent_format.process_in(latent)`` -> ``patchify_latent(patch)``.
* ``clip_vision_tokens``: ``clip_vision.encode_image(image)`` last (or penultimate) hidden state.
"""
from __future__ import annotations

import math
import time

import torch
from comfy_api.latest import io

from ..core import Condition, ConditionSpec, patchify_latent, prompt_mask, square_resize
from ..core.qwen_prompts import QWEN_EDIT_PLUS_TEMPLATE, QWEN_PICTURE
from .common import latent_format_for_family, log
from .types import CATEGORY, EncodedCondition, GeneratorHandle, HYWUCond, HYWUError, HYWUGenerator


# ---------------------------------------------------------------------------------------------
# Checks with messages that say what to do
# ---------------------------------------------------------------------------------------------
def check_images(images) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise HYWUError(f"HY-WU Condition Encode: expected an IMAGE batch (batch, height, width, 3), got {shape}. "
                        "Connect the IMAGE output of Load Image.")
    b, h, w, c = images.shape
    if b == 0:
        raise HYWUError("HY-WU Condition Encode: the image batch is empty. Connect a Load Image node with an image.")
    if c == 4:
        raise HYWUError(
            f"HY-WU Condition Encode: the image has an alpha channel ({h}x{w}, 4 channels, RGBA). HY-WU encodes RGB "
            "images like the base model's VAE: drop the alpha first (core 'Split Image with Alpha' -> its image "
            "output), or use the IMAGE output of Load Image, which is RGB.")
    if c == 1:
        raise HYWUError(
            f"HY-WU Condition Encode: the image has one channel ({h}x{w}, grayscale). HY-WU needs an RGB image "
            "(3 channels): load the picture with Load Image (it converts to RGB), or turn a mask into an "
            "image with core 'Convert Mask to Image'.")
    if c != 3:
        raise HYWUError(
            f"HY-WU Condition Encode: the image has {c} channels ({h}x{w}); HY-WU needs an RGB image (3 channels). "
            "Connect the IMAGE output of Load Image (always RGB), or check the node that made this image.")
    if min(h, w) < 8:
        raise HYWUError(f"HY-WU Condition Encode: the image is {h}x{w} pixels; use an image of at least 8x8 pixels "
                        "(e.g. enlarge it with 'Upscale Image').")
    if not bool(torch.isfinite(images).all()):
        raise HYWUError("HY-WU Condition Encode: the image holds NaN or infinite pixel values, which would give a "
                        "black result. The node that made the image failed: check it, or use Load Image.")
    return images


def check_instruction(instruction) -> str:
    if not isinstance(instruction, str) or not instruction.strip():
        raise HYWUError("HY-WU Condition Encode: the edit instruction is empty. Type what should change in the "
                        "image, e.g. 'make it a snowy winter scene'.")
    return instruction.strip()


def _family_text(family: str | None, generator_name: str | None) -> str:
    if generator_name:
        return f"the generator '{generator_name}' (trained for base family {family})"
    return f"a generator for base family {family}" if family else "the generator"


def encode_text(clip, instruction: str):
    """(text hidden states (1, T, W), CONDITIONING) from one CLIP encode of the instruction."""
    if clip is None:
        raise HYWUError("HY-WU Condition Encode: no CLIP connected. Connect the CLIP output of the checkpoint "
                        "loader (the base model's own text encoder).")
    tokens = clip.tokenize(instruction)
    if getattr(getattr(clip, "patcher", None), "forced_hooks", None) is not None:
        conditioning = clip.encode_from_tokens_scheduled(tokens)  # the sampler sees the hooked encode
        text = clip.encode_from_tokens(tokens)
    else:
        out = clip.encode_from_tokens(tokens, return_pooled=True, return_dict=True)
        text = out.pop("cond")
        conditioning = [[text, out]]  # what CLIPTextEncode returns: [[cond, {"pooled_output": ...}]]
    return text, conditioning


def _end_token(clip, key: str):
    tokenizer = clip.tokenizer
    for name in (getattr(tokenizer, "clip", None), f"clip_{key}", key):
        end = getattr(getattr(tokenizer, name, None), "end_token", None) if name else None
        if end is not None:
            return end
    return None


QWEN_VISION_END = 151653  # <|vision_end|> of Qwen2.5-VL's tokenizer


def qwen_vl_text(clip, instruction: str, image, source) -> torch.Tensor:
    """Hidden states (T, W) after the image of ``instruction`` with ``image`` (1, H, W, 3) shown to
    Qwen2.5-VL as TextEncodeQwenImageEdit(Plus) shows it (the source's ``vl_prompt``/``vl_pixels``)."""
    import comfy.utils

    if image is None:
        raise HYWUError("HY-WU Condition Encode: this Qwen-Image-Edit generator reads the instruction together with the "
                        "source image; connect the image.")
    opts = source.options
    samples = image[:1, :, :, :3].movedim(-1, 1)
    scale = math.sqrt(int(opts["vl_pixels"]) / (samples.shape[3] * samples.shape[2]))
    vl = comfy.utils.common_upscale(samples, round(samples.shape[3] * scale), round(samples.shape[2] * scale), "area",
                                    "disabled").movedim(1, -1)
    if opts["vl_prompt"] == "qwen_image_edit_plus":
        tokens = clip.tokenize(QWEN_PICTURE.format(1) + instruction, images=[vl], llama_template=QWEN_EDIT_PLUS_TEMPLATE)
    else:
        tokens = clip.tokenize(instruction, images=[vl])
    key = next(iter(tokens))
    row = tokens[key][0]
    images = [i for i, t in enumerate(row) if isinstance(t[0], dict)]
    if len(tokens) != 1 or len(tokens[key]) != 1 or len(images) != 1 or row[images[0] + 1][0] != QWEN_VISION_END:
        raise HYWUError("HY-WU Condition Encode: the generator was trained on Qwen-Image-Edit's Qwen2.5-VL, which sees the "
                        "image inside the prompt, but the connected CLIP does not tokenize an image. Connect the "
                        "qwen_image CLIP (Load CLIP, type qwen_image).")
    hidden = clip.encode_from_tokens(tokens)[0]
    after = len(row) - images[0] - 2  # tokens after <|vision_end|>; the output ends with them, as the row does
    return hidden[hidden.shape[0] - after:]


def _pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.bool)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
    return out, mask


def generator_text(clip, instruction: str, source, sampler_text: torch.Tensor | None = None, image=None):
    """(hidden states (1, T, W), padding mask (1, T) or None) of ``instruction`` as the text
    source ``source`` of a generator reads it: its own hidden layer, whatever CLIP Set Last Layer
    did to the connected CLIP (the sampler's conditioning keeps that). ``sampler_text`` is reused
    when it already is that layer. ``image``: the edit's source (1, H, W, 3), for Qwen-Image-Edit."""
    if "vl_prompt" in source.options:
        return generator_texts(clip, [instruction], source, None, image)
    layer = source.text_layer
    if sampler_text is not None and layer == -1 and getattr(clip, "layer_idx", None) is None:
        text, tokens = sampler_text, (clip.tokenize(instruction) if source.padding_mask else None)
    else:
        clip = clip.clone()
        clip.clip_layer(None if layer == -1 else layer)
        tokens = clip.tokenize(instruction)
        text = clip.encode_from_tokens(tokens)
    if not source.padding_mask:
        return text, None
    key = next(iter(tokens))
    end = _end_token(clip, key)
    if len(tokens) != 1 or end is None:
        raise HYWUError(f"HY-WU Condition Encode: the generator masks the padding of the prompt, which this node can "
                        f"only do for a single CLIP text encoder (this CLIP has {', '.join(tokens)}). Connect the "
                        "CLIP of the checkpoint the generator was trained for.")
    ids = torch.tensor([[t[0] for t in tokens[key][0]]])
    return text, prompt_mask(ids, end)[:, : text.shape[1]]


def generator_texts(clip, instructions: list[str], source, sampler_text: torch.Tensor | None = None, images=None):
    """:func:`generator_text` for each edit, one row per instruction: (hidden states (N, T, W),
    padding masks (N, T) or None). ``sampler_text`` rows are the edits' sampler features;
    ``images`` (N or 1, H, W, 3) the edits' sources (for Qwen-Image-Edit's image-aware text)."""
    if "vl_prompt" in source.options:  # padded to the longest edit with a mask, as the trainer batches them
        n = max(len(instructions), 1 if images is None else images.shape[0])  # one instruction edits every image
        return _pad_rows([qwen_vl_text(clip, instructions[min(i, len(instructions) - 1)],
                                       None if images is None else images[min(i, images.shape[0] - 1)][None], source)
                          for i in range(n)])
    parts = [generator_text(clip, t, source, None if sampler_text is None else sampler_text[i:i + 1])
             for i, t in enumerate(instructions)]
    n = min(p[0].shape[1] for p in parts)  # a long prompt's extra chunks are cut to the shortest anyway
    text = torch.cat([p[0][:, :n] for p in parts])
    return text, None if parts[0][1] is None else torch.cat([p[1][:, :n] for p in parts])


def split_instructions(instruction: str, one_edit_per_line: bool) -> list[str]:
    """The edits: the whole text, or each non-empty line."""
    instruction = check_instruction(instruction)
    if not one_edit_per_line:
        return [instruction]
    return [line.strip() for line in instruction.splitlines() if line.strip()]


def pair_images(images: torch.Tensor, n_edits: int) -> torch.Tensor:
    """The source image of each edit: one image serves every line, or line i edits image i (a
    single instruction edits every image of the batch, as before)."""
    b = images.shape[0]
    if n_edits == 1 or b == n_edits:
        return images
    if b == 1:
        return images.repeat(n_edits, 1, 1, 1)
    raise HYWUError(f"HY-WU Condition Encode: {n_edits} instructions (one per line) for {b} images. Give one image "
                    f"(every line edits it) or {n_edits} images (line i edits image i).")


def _batch_text(tensors: list[torch.Tensor], what: str) -> torch.Tensor:
    """Stack per-edit text features. Different lengths are repeated to their least common multiple,
    which ComfyUI itself does to batch conds (attention over repeated tokens is unchanged), within
    its limit of 4 repeats."""
    lengths = [t.shape[1] for t in tensors]
    if len(set(lengths)) == 1:
        return torch.cat(tensors)
    lcm = math.lcm(*lengths)
    if lcm // min(lengths) > 4:
        raise HYWUError(f"HY-WU Condition Encode: the lines encode to {what} of different lengths {lengths}, which "
                        "cannot share one sampler batch. Shorten the longest instructions, or give each edit its own "
                        "Condition Encode and sampler.")
    return torch.cat([t.repeat(1, lcm // t.shape[1], *([1] * (t.ndim - 2))) for t in tensors])


def _batch_conditioning(conditionings: list) -> list:
    """One CONDITIONING whose batch holds the edits in order (what the sampler batch needs)."""
    if len({len(c) for c in conditionings}) != 1:
        raise HYWUError("HY-WU Condition Encode: the lines encode to different conditioning schedules (CLIP hooks); "
                        "give each edit its own Condition Encode.")
    out = []
    for entries in zip(*conditionings):
        extras = {}
        for key, value in entries[0][1].items():
            values = [e[1].get(key) for e in entries]
            if isinstance(value, torch.Tensor):
                extras[key] = _batch_text(values, key) if value.ndim >= 2 else torch.cat(values)
            else:
                extras[key] = value
        out.append([_batch_text([e[0] for e in entries], "text features"), extras])
    return out


def encode_instructions(clip, instructions: list[str]):
    """(text hidden states (N, T, W), CONDITIONING with batch N): ``encode_text`` for each edit."""
    encoded = [encode_text(clip, text) for text in instructions]
    if len(encoded) == 1:
        return encoded[0]
    return _batch_text([e[0] for e in encoded], "text features"), _batch_conditioning([e[1] for e in encoded])


def _image_tokens_vae(source, images, vae, latent_format, family, generator_name):
    if vae is None:
        raise HYWUError(
            f"HY-WU Condition Encode: {_family_text(family, generator_name)} reads the source image through the "
            f"base model's VAE (condition '{source.name}'), but no VAE is connected. Connect the VAE output of "
            "the checkpoint loader to the 'vae' input.")
    opts = source.options
    resolution, patch = int(opts.get("resolution", 512)), int(opts.get("patch", 2))
    resized = square_resize(images.movedim(-1, 1), resolution).clamp(0, 1)  # as the trainer data pipeline
    pixels = resized.movedim(1, -1)
    if getattr(vae, "latent_dim", 2) == 3:  # a video VAE (Wan / Qwen-Image) takes a batch as frames: one image at a time
        latent = torch.cat([vae.encode(pixels[i:i + 1]) for i in range(pixels.shape[0])])
    else:
        latent = vae.encode(pixels)
    latent = latent_format.process_in(latent.float().cpu())
    if latent.ndim == 5:  # video VAEs (Wan / Qwen-Image) give (B, C, T, h, w); an image is one frame
        latent = latent[:, :, 0]
    tokens = patchify_latent(latent, patch)
    if tokens.shape[-1] != source.width:
        raise HYWUError(
            f"HY-WU Condition Encode: the connected VAE gives {latent.shape[1]}-channel latents ({tokens.shape[-1]} "
            f"values per {patch}x{patch} patch), but {_family_text(family, generator_name)} was trained on "
            f"{source.width}. Connect the VAE of the base the generator was trained for.")
    return tokens


def _image_tokens_clip_vision(source, images, clip_vision, family, generator_name):
    if clip_vision is None:
        raise HYWUError(
            f"HY-WU Condition Encode: {_family_text(family, generator_name)} reads the source image through a "
            f"CLIP vision encoder (condition '{source.name}', width {source.width}), but no CLIP_VISION is "
            "connected. Add a 'Load CLIP Vision' node with the encoder the generator was trained with.")
    out = clip_vision.encode_image(images, crop=bool(source.options.get("crop", True)))
    key = "penultimate_hidden_states" if source.options.get("layer") == "penultimate" else "last_hidden_state"
    tokens = out[key].float().cpu()
    if tokens.shape[-1] != source.width:
        raise HYWUError(
            f"HY-WU Condition Encode: the connected CLIP vision model gives width {tokens.shape[-1]}, but "
            f"{_family_text(family, generator_name)} was trained on width {source.width}. Load the CLIP vision "
            "model the generator was trained with.")
    return tokens


LARGE_IMAGE_FACTOR = 2  # per side: a source this many times the training resolution gets a warning


def large_image_warning(spec: ConditionSpec, images, generator_name: str | None = None) -> str | None:
    """Warn (and return the text) when the source is much larger than the generator's training
    resolution: the sampler runs at the source's size (minutes on CPU where the training size took
    seconds), and the generated LoRA was trained for the small size."""
    trained = [int(s.options["resolution"]) for s in spec.sources if s.options.get("resolution")]
    if not trained:
        return None
    h, w = int(images.shape[1]), int(images.shape[2])
    r = max(trained)
    if max(h, w) < LARGE_IMAGE_FACTOR * r:
        return None
    msg = (f"HY-WU Condition Encode: the source image is {w}x{h}, but the generator{f' {generator_name}' if generator_name else ''} "
           f"was trained at {r}x{r}. The sampler runs at the source's size (about {h * w / (r * r):.0f}x the pixels, "
           f"and as much slower), and the generated LoRA is not trained for it. Scale the image near {r} px first "
           "(e.g. ImageScale) to check the edit quickly.")
    log.warning(msg)
    return msg


@torch.no_grad()
def build_condition(spec: ConditionSpec, images, text, vae=None, clip_vision=None, latent_format=None,
                    family: str | None = None, generator_name: str | None = None) -> Condition:
    """Condition for ``spec`` from images and the instruction's text features: ``text(source)``
    gives (hidden states (1 or B rows), padding mask or None) for a text source (see
    :func:`generator_text`); a plain tensor is taken as the hidden states, without a mask."""
    images = check_images(images)
    large_image_warning(spec, images, generator_name)
    batch = images.shape[0]
    tokens, masks = {}, {}
    for source in spec.sources:
        if source.kind == "text_hidden_states":
            t, mask = text(source) if callable(text) else (text, None)
            t = t.float().cpu()
            if t.shape[-1] != source.width:
                raise HYWUError(
                    f"HY-WU Condition Encode: the connected CLIP gives text features of width {t.shape[-1]}, but "
                    f"{_family_text(family, generator_name)} needs width {source.width} (condition '{source.name}'). "
                    "Connect the text encoder of the checkpoint the generator was trained for, or pick a generator "
                    "trained for this checkpoint.")
            if t.shape[1] > source.max_tokens:
                log.warning("HY-WU: the instruction encodes to %d tokens; the generator reads at most %d, so it is "
                            "truncated to the first %d (the sampler still gets the whole instruction).",
                            t.shape[1], source.max_tokens, source.max_tokens)
                t = t[:, : source.max_tokens]
            if t.shape[0] == 1 and batch > 1:
                t = t.expand(batch, -1, -1)
            elif t.shape[0] != batch:
                raise HYWUError(f"HY-WU Condition Encode: {t.shape[0]} instructions for {batch} images; give one "
                                "instruction, or as many as there are images.")
            tokens[source.name] = t.contiguous()
            if mask is not None:
                masks[source.name] = mask[:, : t.shape[1]].expand(batch, -1).contiguous()
        elif source.kind == "vae_latent_patches":
            if latent_format is None:
                latent_format = latent_format_for_family(family, getattr(vae, "latent_channels", None))
            tokens[source.name] = _image_tokens_vae(source, images, vae, latent_format, family, generator_name)
        elif source.kind == "clip_vision_tokens":
            t = _image_tokens_clip_vision(source, images, clip_vision, family, generator_name)
            tokens[source.name] = t[:, : source.max_tokens].contiguous()
        else:  # pragma: no cover - ConditionSource validates kinds
            raise HYWUError(f"HY-WU Condition Encode: unknown condition kind '{source.kind}'; update the node pack.")
        if tokens[source.name].shape[1] > source.max_tokens:
            raise HYWUError(
                f"HY-WU Condition Encode: condition '{source.name}' has {tokens[source.name].shape[1]} tokens, the "
                f"generator reads at most {source.max_tokens}; the generator file's condition spec is inconsistent.")
    cond = Condition(tokens, masks)
    try:
        cond.validate(spec)
    except ValueError as e:
        problem = str(e)
    else:
        return cond
    raise HYWUError(f"HY-WU Condition Encode: {problem}")  # outside the except: one traceback in the log


@torch.no_grad()
def encode_condition(spec: ConditionSpec, images, instruction: str, clip, vae=None, clip_vision=None,
                     model_latent_format=None):
    """Encode ``images`` (B, H, W, 3 in [0, 1]) + ``instruction`` for a generator's ``spec``.

    Returns ``(core Condition, CONDITIONING)``; the CONDITIONING is what CLIPTextEncode gives for
    the instruction. ``model_latent_format`` is the denoiser's ``comfy.latent_formats`` instance
    (``model.model.latent_format``); None guesses SD1.5 for 4-channel and Flux for 16-channel VAEs.
    """
    instruction = check_instruction(instruction)
    images = check_images(images)
    text, conditioning = encode_text(clip, instruction)
    if isinstance(model_latent_format, type):
        model_latent_format = model_latent_format()
    cond = build_condition(spec, images, lambda source: generator_text(clip, instruction, source, text, images), vae=vae,
                           clip_vision=clip_vision, latent_format=model_latent_format)
    return cond, conditioning


def condition_for_generator(encoded: EncodedCondition, generator: GeneratorHandle) -> Condition:
    """The condition ``generator`` reads: the one already encoded when its spec and family match,
    else encoded again from the kept inputs."""
    if (encoded.condition is not None and encoded.spec is not None and encoded.family == generator.family
            and encoded.spec.to_json() == generator.condition_spec.to_json()):
        return encoded.condition
    instructions = encoded.instructions or [encoded.instruction]
    text = (lambda source: generator_texts(encoded.clip, instructions, source, encoded.text, encoded.images)) \
        if encoded.clip is not None else encoded.text
    return build_condition(generator.condition_spec, encoded.images, text, vae=encoded.vae,
                           clip_vision=encoded.clip_vision, family=generator.family, generator_name=generator.name)


class HYWUConditionEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="HYWUConditionEncode",
            display_name="HY-WU Condition Encode",
            category=CATEGORY,
            description="Encodes the source image and the edit instruction into the condition a HY-WU generator "
                        "reads, and the instruction into the sampler's CONDITIONING (type it once).",
            inputs=[
                io.Image.Input("image", tooltip="Source image to edit (RGB). A batch of N images gives N conditions "
                                                "(and N LoRAs) with the same instruction."),
                io.String.Input("instruction", multiline=True, dynamic_prompts=True, default="",
                                tooltip="Edit instruction, e.g. 'make it a snowy winter scene'. Used for the generator "
                                        "and, through the conditioning output, for the sampler."),
                io.Boolean.Input("one_edit_per_line", default=False,
                                 tooltip="On: each non-empty line of the instruction is its own edit. N lines give N "
                                         "conditions, N LoRAs and a sampler batch of N (one image: every line edits "
                                         "it; N images: line i edits image i). Off: the whole text is one "
                                         "instruction."),
                io.Clip.Input("clip", tooltip="The base checkpoint's own text encoder (CLIP output of the checkpoint "
                                              "loader). Must match what the generator was trained with."),
                io.Vae.Input("vae",
                             tooltip="The base checkpoint's VAE (VAE output of the checkpoint loader): every HY-WU "
                                     "generator reads the source image through it."),
                HYWUGenerator.Input("generator", optional=True,
                                    tooltip="Optional: the generator, so the encoders are checked against its condition "
                                            "spec here and the image is encoded at its resolution. Without it, "
                                            "Generate LoRA encodes for its generator's spec."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A CLIP vision encoder: needed only for generators trained on CLIP vision "
                                            "image tokens."),
            ],
            outputs=[
                HYWUCond.Output(display_name="hywu_cond",
                                tooltip="The generator's condition (one row per image). Connect to HY-WU Generate LoRA."),
                io.Conditioning.Output(display_name="conditioning",
                                       tooltip="The instruction encoded by the CLIP, as CLIP Text Encode gives it: the "
                                               "positive conditioning for the sampler (e.g. via "
                                               "InstructPixToPixConditioning or ReferenceLatent); batch N for N "
                                               "edits."),
                io.Image.Output(display_name="image",
                                tooltip="The source image of each edit, in the order of the edits (N images for N "
                                        "lines). Connect it where the sampler's latent is made "
                                        "(InstructPixToPixConditioning pixels, VAE Encode), so the sampler batch "
                                        "holds one latent per edit."),
            ],
        )

    @classmethod
    def execute(cls, image, instruction, clip, one_edit_per_line=False, generator=None, vae=None,
                clip_vision=None) -> io.NodeOutput:
        t0 = time.perf_counter()
        instructions = split_instructions(instruction, one_edit_per_line)
        images = pair_images(check_images(image), len(instructions))
        text, conditioning = encode_instructions(clip, instructions)
        if generator is not None:
            spec, family, name = generator.condition_spec, generator.family, generator.name
            cond = build_condition(spec, images, lambda source: generator_texts(clip, instructions, source, text, images),
                                   vae=vae, clip_vision=clip_vision, family=family, generator_name=name)
        else:  # encoded by Generate LoRA for its generator's spec (it knows the spec and the base family)
            spec, family, name, cond = None, None, None, None
            if vae is None and clip_vision is None:
                raise HYWUError("HY-WU Condition Encode: no image encoder connected. HY-WU generators read the source "
                                "image through the base model's VAE: connect the VAE output of the checkpoint loader "
                                "to the 'vae' input.")
        encoded = EncodedCondition(condition=cond, spec=spec, family=family,
                                   batch_size=images.shape[0], instruction=check_instruction(instruction),
                                   text=text.float().cpu(), images=images, vae=vae, clip_vision=clip_vision,
                                   generator_name=name, clip=clip, instructions=instructions)
        log.debug("HY-WU: encoded the condition (%d image(s), %d instruction(s), '%s') in %.3f s", images.shape[0],
                  len(instructions), instructions[0][:60], time.perf_counter() - t0)
        return io.NodeOutput(encoded, conditioning, images)
