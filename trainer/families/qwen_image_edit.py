"""Qwen-Image-Edit: QwenImageTransformer2DModel; the reference image's packed latent tokens follow the
noisy tokens (``img_shapes`` lists both), flow-matching loss (target noise - x0).

Trained the way ComfyUI's template runs it (``TextEncodeQwenImageEdit``, comfy_extras/nodes_qwen.py;
diffusers' ``QwenImageEditPipeline`` does the same up to its image resampling):

* the source image, resized to ``vl_pixels`` (1024^2, area), is shown to Qwen2.5-VL inside the chat
  template (``<|vision_start|><|image_pad|><|vision_end|>`` then the instruction); its patches are
  cut as ComfyUI's ``process_qwen2vl_images`` cuts them (multiples of 28, bilinear, CLIP mean/std);
* the template's system prefix is dropped as ComfyUI drops it (up to the second ``<|im_start|>`` and
  its ``user\\n``), the rest (image tokens + instruction) is the DiT's text condition, unpadded;
* the reference latent is the source resized to ``reference_pixels`` (1024^2, area);
* the negative (true CFG, 10% text dropout in training) is the empty instruction with the same image;
* text RoPE positions start after the *output* latent, as ComfyUI's Qwen-Image model does (diffusers
  starts them after the largest image; the two agree when the reference is the output's size).

The generator reads the hidden states of the tokens after the image (the instruction and the
template's end, each of which attended to the image) plus the VAE patches of the source. The
``qwen_image_edit_plus`` adapter (2509/2511) differs only in its prompt, template and sizes.
"""
from __future__ import annotations

import math
import types

import torch
import torch.nn.functional as F

from hywu_nodes.core import Condition, ConditionSource, ConditionSpec, patchify_latent, standard_condition_spec
from hywu_nodes.core.qwen_prompts import QWEN_EDIT_SYSTEM, QWEN_IMAGE_TOKENS

from .base import BaseFolderError, BaseParts, FlowMatchingFamily, freeze, repeat_draws, sample_generators, unpatchify_latent

REQUIRED = {
    "transformer": "QwenImageTransformer2DModel",
    "text_encoder": "Qwen2_5_VLForConditionalGeneration (Qwen2.5-VL with its vision tower)",
    "tokenizer": "its tokenizer files",
    "vae": "AutoencoderKLQwenImage",
}
# Qwen2-VL image processing constants (the model's preprocessor; ComfyUI's process_qwen2vl_images defaults)
VL_PATCH, VL_MERGE, VL_TEMPORAL = 14, 2, 2
VL_MIN_PIXELS, VL_MAX_PIXELS = 3136, 12845056
VL_MEAN, VL_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


def area_resize(images: torch.Tensor, total: int, multiple: int = 1) -> torch.Tensor:
    """(B, C, H, W) -> about ``total`` pixels, aspect kept, area interpolation: what
    TextEncodeQwenImageEdit(Plus) does (sides rounded, or rounded to ``multiple``)."""
    h, w = images.shape[-2:]
    s = math.sqrt(total / (w * h))
    if multiple == 1:
        nw, nh = round(w * s), round(h * s)
    else:
        nw, nh = round(w * s / multiple) * multiple, round(h * s / multiple) * multiple
    return F.interpolate(images.float(), size=(nh, nw), mode="area")


def vl_patches(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(3, H, W) in [0, 1] -> (pixel_values (gh*gw, 3*2*14*14), grid_thw (1, 3)) in Qwen2-VL's patch
    layout, sized and normalised as ComfyUI's process_qwen2vl_images does (it is what the base sees)."""
    c, h, w = image.shape
    f = VL_PATCH * VL_MERGE
    hb, wb = round(h / f) * f, round(w / f) * f
    if hb * wb > VL_MAX_PIXELS:
        beta = math.sqrt(h * w / VL_MAX_PIXELS)
        hb, wb = max(f, math.floor(h / beta / f) * f), max(f, math.floor(w / beta / f) * f)
    elif hb * wb < VL_MIN_PIXELS:
        beta = math.sqrt(VL_MIN_PIXELS / (h * w))
        hb, wb = math.ceil(h * beta / f) * f, math.ceil(w * beta / f) * f
    x = F.interpolate(image[None].float(), size=(hb, wb), mode="bilinear", align_corners=False)[0]
    x = (x - torch.tensor(VL_MEAN).view(3, 1, 1)) / torch.tensor(VL_STD).view(3, 1, 1)
    gh, gw = hb // VL_PATCH, wb // VL_PATCH
    x = x[None].expand(VL_TEMPORAL, c, hb, wb)  # a still image is two identical frames
    x = x.reshape(1, VL_TEMPORAL, c, gh // VL_MERGE, VL_MERGE, VL_PATCH, gw // VL_MERGE, VL_MERGE, VL_PATCH)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8).reshape(gh * gw, c * VL_TEMPORAL * VL_PATCH * VL_PATCH)
    return x, torch.tensor([[1, gh, gw]])


def _pad_rows(rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (T_i, W) rows to (B, T, W) with a (B, T) mask."""
    n = max(r.shape[0] for r in rows)
    out = rows[0].new_zeros(len(rows), n, rows[0].shape[-1])
    mask = torch.zeros(len(rows), n, dtype=torch.bool, device=rows[0].device)
    for i, r in enumerate(rows):
        out[i, : r.shape[0]], mask[i, : r.shape[0]] = r, True
    return out, mask


def _rope_as_comfyui(pos_embed) -> None:
    """Make diffusers' QwenEmbedRope place tokens as ComfyUI's Qwen-Image model does: the text positions start
    after the first image (the output latent), not after the largest one; and an odd number of patches along a
    side is centred with the extra one after the centre (positions -(n//2) .. n-1-n//2; diffusers puts it before).
    Even sizes are unchanged."""
    inner = pos_embed.forward

    def forward(self, video_fhw, *args, **kwargs):  # any diffusers signature: the text length is what it returns
        vid, txt = inner(video_fhw, *args, **kwargs)
        shapes = video_fhw[0] if isinstance(video_fhw, list) else video_fhw
        _, h, w = shapes[0] if isinstance(shapes, list) else shapes
        start = max(h // 2, w // 2) if self.scale_rope else max(h, w)
        return vid, self.pos_freqs.to(txt.device)[start : start + txt.shape[0]]

    def video_freqs(self, frame, height, width, idx=0, device=None):
        pos, neg = self.pos_freqs.to(device), self.neg_freqs.to(device)
        split = [x // 2 for x in self.axes_dim]
        pos, neg = pos.split(split, dim=1), neg.split(split, dim=1)

        def centred(axis, n):  # neg's last row is position -1
            return torch.cat([neg[axis][len(neg[axis]) - n // 2:], pos[axis][: n - n // 2]]) if self.scale_rope else pos[axis][:n]

        f = pos[0][idx: idx + frame].view(frame, 1, 1, -1).expand(frame, height, width, -1)
        fh = centred(1, height).view(1, height, 1, -1).expand(frame, height, width, -1)
        fw = centred(2, width).view(1, 1, width, -1).expand(frame, height, width, -1)
        return torch.cat([f, fh, fw], dim=-1).reshape(frame * height * width, -1).contiguous()

    pos_embed.forward = types.MethodType(forward, pos_embed)
    pos_embed._compute_video_freqs = types.MethodType(video_freqs, pos_embed)


class QwenImageEdit(FlowMatchingFamily):
    name = "qwen_image_edit"
    default_drop = (0.1, 0.0)
    text_sees_image = True  # Qwen2.5-VL sees the source: text features per row (trainer/encoded.py)
    # What TextEncodeQwenImageEdit does: its template with the image, 1 MP for Qwen2.5-VL and the reference.
    TEMPLATE = QWEN_EDIT_SYSTEM + "<|im_start|>user\n" + QWEN_IMAGE_TOKENS + "{}<|im_end|>\n<|im_start|>assistant\n"
    VL_PIXELS = 1024 * 1024
    REFERENCE_PIXELS = 1024 * 1024
    REFERENCE_MULTIPLE = 1

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import Qwen2_5_VLForConditionalGeneration

        parts = BaseParts(cfg, self.name, REQUIRED)
        self.transformer = parts.model("transformer", QwenImageTransformer2DModel, device, dtype)
        vl = parts.model("text_encoder", Qwen2_5_VLForConditionalGeneration, device, dtype)
        self.text_encoder = getattr(vl, "model", vl)  # Qwen2_5_VLModel: vision tower + language model, no LM head
        if not hasattr(self.text_encoder, "visual"):
            raise BaseFolderError(f"{cfg.base.path}/text_encoder is not Qwen2.5-VL with its vision tower (got "
                                  f"{type(vl).__name__}); {self.name} shows the source image to it. A tiny base built by an "
                                  "older HY-WU (Qwen2 text only): delete the folder and it is built again.")
        if parts.synthetic:  # the byte tokenizer of synthetic bases has no image tokens: ComfyUI's qwen25 files
            from transformers import AutoTokenizer

            from trainer.tiny_bases import comfyui_checkout

            self.tokenizer = AutoTokenizer.from_pretrained(comfyui_checkout() / "comfy" / "text_encoders" / "qwen25_tokenizer")
        else:
            self.tokenizer = parts.tokenizer("tokenizer", max_length=1 << 17)
        self.vae = parts.model("vae", AutoencoderKLQwenImage, device, dtype)
        freeze(self.transformer, self.text_encoder, self.vae)
        _rope_as_comfyui(self.transformer.pos_embed)
        self.denoiser = self.transformer
        self.latent_channels = self.vae.config.z_dim
        self.vl_pixels = cfg.base.vl_pixels or self.VL_PIXELS
        self.reference_pixels = cfg.base.reference_pixels or self.REFERENCE_PIXELS
        tok = self.tokenizer.convert_tokens_to_ids
        self.ids = {k: tok(v) for k, v in (("im_start", "<|im_start|>"), ("image", "<|image_pad|>"), ("vision_end", "<|vision_end|>"))}
        self.ids["user"], self.ids["newline"] = (self.tokenizer("user\n", add_special_tokens=False).input_ids + [None, None])[:2]
        self.text_tokens = cfg.base.text_tokens or 1024
        text_cfg = getattr(self.text_encoder.config, "text_config", self.text_encoder.config)
        spec = standard_condition_spec(text_width=text_cfg.hidden_size, text_tokens=self.text_tokens,
                                       latent_channels=self.latent_channels, image_resolution=self.resolution, patch=2)
        text = spec.sources[0]
        # Condition Encode shows the image to the CLIP the same way (hywu_nodes/nodes/encode.py)
        options = {**text.options, "mask": "padding", "vl_prompt": self.name, "vl_pixels": self.vl_pixels, "vl_tokens": "after_image"}
        self.condition_spec = ConditionSpec((ConditionSource(text.name, text.kind, text.width, text.max_tokens, options),
                                             *spec.sources[1:]))
        mean, std = self.vae.config.latents_mean, self.vae.config.latents_std
        self.lat_mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.lat_std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def frozen_modules(self):
        return {"transformer": self.transformer, "text_encoder": self.text_encoder, "vae": self.vae}

    def file_extra(self) -> dict:
        return {"reference_pixels": self.reference_pixels}

    # --- the prompt (what differs between Qwen-Image-Edit and -Edit-Plus) -----------------------
    def prompt(self, instruction: str) -> str:
        return self.TEMPLATE.format(instruction)

    def vl_image(self, image01: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> the image Qwen2.5-VL sees."""
        return area_resize(image01, self.vl_pixels)

    def reference_image(self, image01: torch.Tensor) -> torch.Tensor:
        return area_resize(image01, self.reference_pixels, self.REFERENCE_MULTIPLE)

    # --- encoders ---------------------------------------------------------------------------------
    def template_end(self, ids: list[int]) -> int:
        """Where ComfyUI's QwenImageTEModel cuts the template off: at the second <|im_start|>, past
        its ``user\\n`` (the 64 tokens diffusers drops for Qwen2.5-VL's tokenizer)."""
        starts = [i for i, t in enumerate(ids) if t == self.ids["im_start"]][:2]
        end = starts[-1] if starts else 0
        if len(ids) > end + 3 and ids[end + 1] == self.ids["user"] and ids[end + 2] == self.ids["newline"]:
            end += 3
        return end

    def token_ids(self, instruction: str, image_tokens: int) -> tuple[list[int], int]:
        """Token ids of the prompt with the image placeholder expanded to ``image_tokens``, and where
        the template's prefix ends (ComfyUI keeps one placeholder and splices the vision embeddings in)."""
        ids = self.tokenizer(self.prompt(instruction), add_special_tokens=False).input_ids
        end = self.template_end(ids)
        k = ids.index(self.ids["image"])
        return ids[:k] + [self.ids["image"]] * image_tokens + ids[k + 1:], end

    @torch.no_grad()
    def vl_hidden(self, instruction: str, vl_image: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Qwen2.5-VL's last hidden states (T, W) of one prompt with its (3, H, W) image, the template's
        prefix dropped; and the index of the first token after the image."""
        pixels, grid = vl_patches(vl_image.float().cpu())
        ids, end = self.token_ids(instruction, int(grid.prod()) // VL_MERGE ** 2)
        ids_t = torch.tensor([ids], device=self.device)
        # mm_token_type_ids (1 = image) makes transformers use the 3D M-RoPE positions; without it, 1D ones
        kinds = (ids_t == self.ids["image"]).int()
        out = self.text_encoder(input_ids=ids_t, attention_mask=torch.ones_like(ids_t), pixel_values=pixels.to(self.device, self.dtype),
                                image_grid_thw=grid.to(self.device), mm_token_type_ids=kinds, use_cache=False)
        after = len(ids) - ids[::-1].index(self.ids["vision_end"])
        return out.last_hidden_state[0, end:], after - end

    @torch.no_grad()
    def training_text(self, texts, images01=None):
        """Per edit (the text sees its image): (hidden states, first token after the image, the empty
        instruction's hidden states with the same image (the negative), reference latent)."""
        ref = self.latent(self.reference_image(images01))
        # model dtype: bf16 rows cache at half size
        return [(*item, self.vl_hidden("", image)[0], r)
                for item, image, r in zip(self.generator_text_items(texts, images01), self.vl_image(images01), ref)]

    @torch.no_grad()
    def generator_text_items(self, texts, images01=None):
        """(hidden states, first token after the image) per text, the first and second of
        :meth:`training_text`'s: one Qwen2.5-VL pass per text; the empty instruction (the base's
        negative) and the reference latent, which only the base reads, are left out."""
        return [(hidden, torch.tensor([start], device=self.device))
                for hidden, start in (self.vl_hidden(t, image) for t, image in zip(texts, self.vl_image(images01)))]

    def generator_item(self, item):
        return item[:2]

    def stack_generator_text(self, items):
        """The first three of :meth:`stack_text`'s (hidden states, mask, first token after the image)."""
        hidden, mask = _pad_rows([it[0] for it in items])
        return hidden, mask, torch.cat([it[1] for it in items])

    def text_items(self, text):
        return list(text)

    def stack_text(self, items):
        hidden, mask, start = self.stack_generator_text(items)
        empty, emask = _pad_rows([it[2] for it in items])
        return hidden, mask, start, empty, emask, torch.stack([it[3] for it in items])

    def generator_text(self, hidden, mask, start):
        """What the generator reads: the tokens after the image, at most ``text_tokens``, padded + mask."""
        if hidden.is_meta:  # memory plans (bench/memory_plan.py): sizes only
            return hidden[:, : self.text_tokens], mask[:, : self.text_tokens]
        rows = [h[int(s): int(m.sum())][: self.text_tokens] for h, m, s in zip(hidden, mask, start)]
        return _pad_rows(rows)

    @torch.no_grad()
    def latent(self, images01):
        x = (self.vae_pixels(images01).to(self.device, self.dtype) * 2 - 1)[:, :, None]  # (B, C, 1, H, W): one frame
        lat = self.vae.encode(x).latent_dist.mode()[:, :, 0]
        return (lat - self.lat_mean.to(lat.dtype)) / self.lat_std.to(lat.dtype)

    def source_latents(self, images01):
        """Only the generator reads a source latent (the base reads the reference, kept with the text)."""
        return {"source": self.latent(self.condition_image(images01))}

    @torch.no_grad()
    def encode(self, batch):
        return {**self.source_latents(batch["source"]), "target": self.latent(batch["target"]),
                "text": self.stack_text(self.training_text(batch["instruction"], batch["source"]))}

    @torch.no_grad()
    def encode_condition(self, source, instructions):
        hidden, mask, start, *_ = self.stack_text(self.training_text(instructions, source))
        text, tmask = self.generator_text(hidden, mask, start)
        image = patchify_latent(self.latent(self.condition_image(source)).float(), 2)
        return Condition({"text": text.float(), "image": image}, {"text": tmask})

    # --- denoiser -----------------------------------------------------------------------------------
    def _forward(self, noisy_tokens, ref_tokens, t, text, h, w, rh=None, rw=None):
        text, mask = text
        n, b = noisy_tokens.shape[1], noisy_tokens.shape[0]
        shapes = [[(1, h // 2, w // 2), (1, (rh or h) // 2, (rw or w) // 2)]] * b
        out = self.transformer(hidden_states=torch.cat([noisy_tokens, ref_tokens], 1).to(self.dtype), encoder_hidden_states=text.to(self.dtype),
                               encoder_hidden_states_mask=mask, timestep=t.to(self.dtype), img_shapes=shapes).sample
        return out[:, :n]

    def _velocity(self, x, ref_tokens, t, text, rh, rw):
        """The denoiser's velocity for latents ``x`` (B, C, h, w) of any size: padded to whole 2x2 patches
        (circular, ComfyUI's pad_to_patch_size) for the forward, cropped back after it."""
        h, w = x.shape[-2:]
        xp = pad_even(x)
        out = self._forward(patchify_latent(xp, 2), ref_tokens, t, text, *xp.shape[-2:], rh, rw)
        return unpatchify_latent(out, self.latent_channels, *xp.shape[-2:])[..., :h, :w]

    def loss(self, prep):
        if "crop" not in prep:
            return super().loss(prep)
        h, w, rh, rw = prep["hw"]
        pred = self._forward(prep["noisy"], prep["ref"], prep["t"], prep["text"], h, w, rh, rw)
        pred = unpatchify_latent(pred, self.latent_channels, h, w)[..., : prep["crop"][0], : prep["crop"][1]]
        return F.mse_loss(pred.float(), prep["target"].float(), reduction="none").flatten(1).mean(1)

    @torch.no_grad()
    def encoded_condition(self, enc):
        hidden, mask, start, *_ = enc["text"]
        gtext, gmask = self.generator_text(hidden, mask, start)
        return Condition({"text": gtext.float(), "image": patchify_latent(enc["source"], 2).float()}, {"text": gmask})

    @torch.no_grad()
    def prepare_encoded(self, enc, step, keys):
        gens = sample_generators(self.cfg.train.seed, step, keys)
        cond = self.encoded_condition(enc)
        (hidden, mask, _, empty, emask, ref), x0 = repeat_draws(enc["text"], len(keys)), repeat_draws(enc["target"], len(keys))
        drop_t, drop_i = self.drop_masks(gens)
        n = max(hidden.shape[1], empty.shape[1])
        hidden, mask, empty, emask = (F.pad(x, (0, 0, 0, n - x.shape[1])) if x.ndim == 3 else F.pad(x, (0, n - x.shape[1]))
                                      for x in (hidden, mask, empty, emask))
        base_text = torch.where(drop_t[:, None, None], empty, hidden)
        base_mask = torch.where(drop_t[:, None], emask, mask)
        ref = pad_even(ref)
        rh, rw = ref.shape[-2:]
        ref = patchify_latent(ref, 2)
        ref = torch.where(drop_i[:, None, None], torch.zeros_like(ref), ref)
        noisy, t, target = self.flow_noisy(x0, gens)
        h, w = x0.shape[-2:]
        prep = {"condition": cond, "t": t, "text": (base_text, base_mask), "ref": ref}
        if h % 2 or w % 2:  # a bucket with odd latent sides: the forward pads as ComfyUI's model does, the loss is on the crop
            noisy = pad_even(noisy)
            return {**prep, "noisy": patchify_latent(noisy, 2), "target": target, "hw": (*noisy.shape[-2:], rh, rw), "crop": (h, w)}
        return {**prep, "noisy": patchify_latent(noisy, 2), "target": patchify_latent(target, 2), "hw": (h, w, rh, rw)}

    @torch.no_grad()
    def sample(self, source, instructions, steps, seed=0, cfg=1.0, shift=None, cfg_norm=None):
        """Edit ``source`` (B, 3, H, W) in [0, 1]: the output has the source's size (the graph's VAE
        Encode latent). ``cfg`` > 1: true CFG against the empty instruction with the same image (the
        template's negative). ``shift``: ComfyUI's euler + simple schedule on ModelSamplingAuraFlow(shift)
        (the template's 3.0); None: a linear 1 -> 0 schedule. ``cfg_norm``: ComfyUI's CFGNorm of that strength
        (the 2509 template's 1.0): the CFG prediction's per-pixel channel norm capped at the conditional one's."""
        hidden, mask, _, empty, emask, ref = self.stack_text(self.training_text(instructions, source))
        src = self.latent(source)
        ref = pad_even(ref)
        rh, rw = ref.shape[-2:]
        ref = patchify_latent(ref, 2)
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(src.shape, generator=g).to(self.device, torch.float32)
        sigmas = flow_sigmas(steps, shift)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):  # Euler on the flow ODE
            t = torch.full((x.shape[0],), float(s), device=self.device)
            v = self._velocity(x, ref, t, (hidden, mask), rh, rw).float()
            if cfg != 1.0:
                vu = self._velocity(x, ref, t, (empty, emask), rh, rw).float()
                v_cond, v = v, vu + cfg * (v - vu)
                if cfg_norm is not None:  # on the denoised prediction x - s v, as CFGNorm's post-CFG function
                    den_c, den = x - s * v_cond, x - s * v
                    scale = (den_c.norm(dim=1, keepdim=True) / (den.norm(dim=1, keepdim=True) + 1e-8)).clamp(0, 1)
                    v = (x - den * scale * cfg_norm) / s
            x = x + (s_next - s) * v
        return ((self.decode_latent(x.to(self.dtype)).float() + 1) / 2).clamp(0, 1).cpu()

    def decode_latent(self, lat):
        lat = lat * self.lat_std.to(lat.dtype) + self.lat_mean.to(lat.dtype)
        return self.vae.decode(lat[:, :, None]).sample[:, :, 0]  # the Qwen VAE has a frame axis


def pad_even(lat: torch.Tensor) -> torch.Tensor:
    """Latents (B, C, h, w) padded to even sides, circularly: ComfyUI's pad_to_patch_size before Qwen-Image's
    2x2 patches (a bucket whose VAE crop leaves an odd latent side)."""
    h, w = lat.shape[-2:]
    return F.pad(lat, (0, w % 2, 0, h % 2), mode="circular") if h % 2 or w % 2 else lat


def flow_sigmas(steps: int, shift: float | None = None) -> torch.Tensor:
    """``steps`` + 1 sigmas from 1 to 0: linear, or ComfyUI's "simple" scheduler over the 1000
    discrete sigmas of a shifted flow (ModelSamplingAuraFlow / SD3: shift * t / (1 + (shift - 1) * t))."""
    if shift is None:
        return torch.linspace(1, 0, steps + 1)
    t = torch.arange(1, 1001, dtype=torch.float32) / 1000
    table = shift * t / (1 + (shift - 1) * t)
    stride = len(table) / steps
    return torch.tensor([float(table[-(1 + int(i * stride))]) for i in range(steps)] + [0.0])
