"""FLUX.1 Kontext: FluxTransformer2DModel; the reference image's packed latent tokens are appended
to the noisy tokens (position ids with first axis 1), flow-matching loss (target noise - x0).

Conventions (diffusers' FluxKontextPipeline, and ComfyUI's graph where they differ): T5
last_hidden_state padded to ``text_tokens`` is the sequence condition (default 256, the length
ComfyUI's FluxTokenizer pads to; T5 sees no mask, so the padding length changes the features),
CLIP's pooled output the pooled one; latents are ``(mode - shift_factor) * scaling_factor``
(ComfyUI's Flux ``latent_format.process_in``); timestep = sigma in [0, 1]; guidance-distilled
bases get the embedded guidance ``base.guidance`` (default 2.5, the shipped template's
FluxGuidance; the generator file records it) and no CFG dropout by default.
"""
from __future__ import annotations

import math

import torch

from hywu_nodes.core import Condition, patchify_latent, standard_condition_spec

from .base import BaseParts, FlowMatchingFamily, freeze, repeat_draws, sample_generators

REQUIRED = {
    "transformer": "FluxTransformer2DModel",
    "text_encoder": "CLIPTextModel (pooled prompt)",
    "tokenizer": "CLIPTokenizer files",
    "text_encoder_2": "T5EncoderModel (sequence prompt)",
    "tokenizer_2": "T5 tokenizer files",
    "vae": "AutoencoderKL (16 latent channels for real FLUX)",
}
FLUX_GUIDANCE = 2.5  # FluxGuidance of ComfyUI's Kontext template (and of example_workflows/)
COMFY_T5_TOKENS = 256  # ComfyUI's FluxTokenizer: T5 min_length
COMFY_FLUX_SHIFT = 1.15  # ComfyUI's ModelSamplingFlux default (no ModelSamplingFlux node in the template)


class FluxKontext(FlowMatchingFamily):
    name = "flux_kontext"
    default_drop = (0.0, 0.0)

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        from diffusers import AutoencoderKL, FluxTransformer2DModel
        from transformers import CLIPTextModel, T5EncoderModel

        parts = BaseParts(cfg, self.name, REQUIRED)
        self.transformer = parts.model("transformer", FluxTransformer2DModel, device, dtype)
        self.clip = parts.model("text_encoder", CLIPTextModel, device, dtype)
        self.clip_tok = parts.tokenizer("tokenizer", max_length=77)
        self.t5 = parts.model("text_encoder_2", T5EncoderModel, device, dtype)
        self.t5_tok = parts.tokenizer("tokenizer_2", max_length=512)
        self.vae = parts.model("vae", AutoencoderKL, device, dtype)
        freeze(self.transformer, self.clip, self.t5, self.vae)
        self.denoiser = self.transformer
        self.latent_channels = self.vae.config.latent_channels
        self.text_tokens = cfg.base.text_tokens or min(COMFY_T5_TOKENS, self.t5_tok.model_max_length)
        self.guidance = FLUX_GUIDANCE if cfg.base.guidance is None else float(cfg.base.guidance)
        self.condition_spec = standard_condition_spec(
            text_width=self.t5.config.d_model, text_tokens=self.text_tokens,
            latent_channels=self.latent_channels, image_resolution=self.resolution, patch=2)
        self._empty = None

    def frozen_modules(self):
        return {"transformer": self.transformer, "text_encoder": self.clip, "text_encoder_2": self.t5, "vae": self.vae}

    def file_extra(self):
        return {"flux_guidance": self.guidance} if self.transformer.config.guidance_embeds else {}

    @torch.no_grad()
    def encode_text(self, texts):
        ids = self.t5_tok(texts, padding="max_length", max_length=self.text_tokens, truncation=True, return_tensors="pt").input_ids
        seq = self.t5(ids.to(self.device)).last_hidden_state
        cids = self.clip_tok(texts, padding="max_length", max_length=self.clip_tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        pooled = self.clip(cids.to(self.device)).pooler_output
        return seq, pooled

    @torch.no_grad()
    def latent(self, images01):
        x = self.vae_pixels(images01).to(self.device, self.dtype) * 2 - 1
        lat = self.vae.encode(x).latent_dist.mode()
        return (lat - self.vae.config.shift_factor) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_condition(self, source, instructions):
        return Condition({"text": self.encode_text(instructions)[0].float(), "image": patchify_latent(self.latent(self.condition_image(source)).float(), 2)})

    def _ids(self, h, w, first):
        ids = torch.zeros(h // 2, w // 2, 3)
        ids[..., 0] = first
        ids[..., 1] = torch.arange(h // 2)[:, None]
        ids[..., 2] = torch.arange(w // 2)[None, :]
        return ids.reshape(-1, 3)

    def _forward(self, noisy_tokens, ref_tokens, t, text, h, w):
        seq, pooled = text
        n = noisy_tokens.shape[1]
        img_ids = torch.cat([self._ids(h, w, 0), self._ids(h, w, 1)]).to(self.device, self.dtype)
        txt_ids = torch.zeros(seq.shape[1], 3, device=self.device, dtype=self.dtype)
        guidance = None
        if self.transformer.config.guidance_embeds:
            guidance = torch.full((noisy_tokens.shape[0],), self.guidance, device=self.device, dtype=torch.float32)
        out = self.transformer(hidden_states=torch.cat([noisy_tokens, ref_tokens], 1).to(self.dtype), encoder_hidden_states=seq,
                               pooled_projections=pooled, timestep=t.to(self.dtype), img_ids=img_ids, txt_ids=txt_ids,
                               guidance=guidance).sample
        return out[:, :n]

    def sample_sigmas(self, steps):
        """ComfyUI's KSampler "simple" schedule on FLUX: t = 1 - k/steps through ModelSamplingFlux's time
        shift exp(mu) / (exp(mu) + 1/t - 1), mu = 1.15 (diffusers' FluxKontextPipeline reaches the same mu at
        4096 image tokens, i.e. 1024 px; below that it shifts less)."""
        t = torch.linspace(1, 0, steps + 1)[:-1].double()
        mu = math.exp(COMFY_FLUX_SHIFT)
        return torch.cat([mu / (mu + (1 / t - 1)), torch.zeros(1, dtype=torch.float64)]).float()

    def empty_text(self):
        if self._empty is None:
            self._empty = self.encode_text([""])
        return self._empty

    @torch.no_grad()
    def encoded_condition(self, enc):
        return Condition({"text": enc["text"][0].float(), "image": patchify_latent(self.condition_latent(enc), 2).float()})

    @torch.no_grad()
    def prepare_encoded(self, enc, step, keys):
        gens = sample_generators(self.cfg.train.seed, step, keys)
        cond = self.encoded_condition(enc)
        (seq, pooled), src, x0 = (repeat_draws(enc[k], len(keys)) for k in ("text", "source", "target"))
        ref = patchify_latent(src, 2)
        drop_t, drop_i = self.drop_masks(gens)
        eseq, epool = self.empty_text()
        seq = torch.where(drop_t[:, None, None], eseq.expand_as(seq), seq)
        pooled = torch.where(drop_t[:, None], epool.expand_as(pooled), pooled)
        ref = torch.where(drop_i[:, None, None], torch.zeros_like(ref), ref)
        noisy, t, target = self.flow_noisy(x0, gens)
        h, w = x0.shape[-2:]
        return {"condition": cond, "noisy": patchify_latent(noisy, 2), "ref": ref, "t": t, "text": (seq, pooled),
                "target": patchify_latent(target, 2), "hw": (h, w)}

    def decode_latent(self, lat):
        return self.vae.decode(lat / self.vae.config.scaling_factor + self.vae.config.shift_factor).sample
