"""Qwen-Image-Edit: QwenImageTransformer2DModel; the source image's packed latent tokens follow the
noisy tokens (``img_shapes`` lists both), flow-matching loss (target noise - x0).

Conventions (diffusers' QwenImageEditPipeline): the instruction goes through the base's own
text encoder inside the chat template; the template's system prefix is dropped from the hidden
states; latents are the VAE mode normalised with ``latents_mean``/``latents_std``; timestep =
sigma in [0, 1]; true CFG with an empty prompt, so the text condition is dropped 10% by default.
Limitation: the real pipeline also shows the source image to Qwen2.5-VL inside the prompt; this
adapter encodes the instruction text only (the image reaches the base as reference latents and
the generator as VAE tokens).
"""
from __future__ import annotations

import torch

from hywu_nodes.core import Condition, patchify_latent, standard_condition_spec

from .base import BaseParts, FlowMatchingFamily, freeze, repeat_draws, sample_generators

REQUIRED = {
    "transformer": "QwenImageTransformer2DModel",
    "text_encoder": "Qwen2.5-VL (or any transformers model AutoModel loads)",
    "tokenizer": "its tokenizer files",
    "vae": "AutoencoderKLQwenImage",
}
TEMPLATE = ("<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), "
            "then explain how the user's text instruction should alter or modify the image. Generate a new image that meets the "
            "user's requirements while maintaining consistency with the original input where appropriate.<|im_end|>\n"
            "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n")


class QwenImageEdit(FlowMatchingFamily):
    name = "qwen_image_edit"
    default_drop = (0.1, 0.0)

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        from diffusers import AutoencoderKLQwenImage, QwenImageTransformer2DModel
        from transformers import AutoModel

        parts = BaseParts(cfg, self.name, REQUIRED)
        self.transformer = parts.model("transformer", QwenImageTransformer2DModel, device, dtype)
        self.text_encoder = parts.model("text_encoder", AutoModel, device, dtype)
        self.tokenizer = parts.tokenizer("tokenizer", max_length=1024)
        self.vae = parts.model("vae", AutoencoderKLQwenImage, device, dtype)
        freeze(self.transformer, self.text_encoder, self.vae)
        self.denoiser = self.transformer
        self.latent_channels = self.vae.config.z_dim
        # Template tokens to drop: counted with this tokenizer rather than hard-coded (64 for Qwen2.5-VL).
        self.drop_idx = len(self.tokenizer(TEMPLATE.split("{}")[0], add_special_tokens=False).input_ids)
        self.text_tokens = cfg.base.text_tokens or 1024
        width = getattr(self.text_encoder.config, "hidden_size", None) or self.text_encoder.config.text_config.hidden_size
        self.condition_spec = standard_condition_spec(
            text_width=width, text_tokens=self.text_tokens, latent_channels=self.latent_channels,
            image_resolution=self.resolution, patch=2)
        mean, std = self.vae.config.latents_mean, self.vae.config.latents_std
        self.lat_mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.lat_std = torch.tensor(std, device=device).view(1, -1, 1, 1)
        self._empty = None

    def frozen_modules(self):
        return {"transformer": self.transformer, "text_encoder": self.text_encoder, "vae": self.vae}

    @torch.no_grad()
    def encode_text(self, texts):
        """(hidden (B, T, W), mask (B, T)) with the template prefix removed, right-padded."""
        enc = self.tokenizer([TEMPLATE.format(t) for t in texts], padding=True, add_special_tokens=False, return_tensors="pt")
        ids, mask = enc.input_ids.to(self.device), enc.attention_mask.to(self.device)
        hidden = self.text_encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = [h[m.bool()][self.drop_idx :][: self.text_tokens] for h, m in zip(hidden, mask)]
        n = max(r.shape[0] for r in rows)
        out = hidden.new_zeros(len(rows), n, hidden.shape[-1])
        out_mask = torch.zeros(len(rows), n, dtype=torch.bool, device=self.device)
        for i, r in enumerate(rows):
            out[i, : r.shape[0]], out_mask[i, : r.shape[0]] = r, True
        return out, out_mask

    @torch.no_grad()
    def latent(self, images01):
        x = (images01.to(self.device, self.dtype) * 2 - 1)[:, :, None]  # (B, C, 1, H, W): one frame
        lat = self.vae.encode(x).latent_dist.mode()[:, :, 0]
        return (lat - self.lat_mean.to(lat.dtype)) / self.lat_std.to(lat.dtype)

    @torch.no_grad()
    def encode_condition(self, source, instructions):
        text, mask = self.encode_text(instructions)
        return Condition({"text": text.float(), "image": patchify_latent(self.latent(source).float(), 2)}, {"text": mask})

    def _forward(self, noisy_tokens, ref_tokens, t, text, h, w):
        text, mask = text
        n, b = noisy_tokens.shape[1], noisy_tokens.shape[0]
        shapes = [[(1, h // 2, w // 2), (1, h // 2, w // 2)]] * b
        out = self.transformer(hidden_states=torch.cat([noisy_tokens, ref_tokens], 1).to(self.dtype), encoder_hidden_states=text,
                               encoder_hidden_states_mask=mask, timestep=t.to(self.dtype), img_shapes=shapes).sample
        return out[:, :n]

    def _empty_text(self, n):
        if self._empty is None:
            self._empty = self.encode_text([""])
        e, m = self._empty
        pad = n - e.shape[1]
        if pad > 0:
            e = torch.cat([e, e.new_zeros(1, pad, e.shape[-1])], 1)
            m = torch.cat([m, m.new_zeros(1, pad)], 1)
        return e[:, :n], m[:, :n]

    def text_items(self, text):
        """Per instruction: its hidden states without padding (lengths differ)."""
        hidden, mask = text
        return [h[: int(m.sum())] for h, m in zip(hidden, mask)]

    def stack_text(self, items):
        """Right-pad to the longest instruction of the batch, as :meth:`encode_text` does."""
        n = max(h.shape[0] for h in items)
        out = items[0].new_zeros(len(items), n, items[0].shape[-1])
        mask = torch.zeros(len(items), n, dtype=torch.bool, device=items[0].device)
        for i, h in enumerate(items):
            out[i, : h.shape[0]], mask[i, : h.shape[0]] = h, True
        return out, mask

    @torch.no_grad()
    def prepare_encoded(self, enc, step, keys):
        gens = sample_generators(self.cfg.train.seed, step, keys)
        cond = Condition({"text": enc["text"][0].float(), "image": patchify_latent(enc["source"], 2).float()}, {"text": enc["text"][1]})
        (text, mask), src, x0 = (repeat_draws(enc[k], len(keys)) for k in ("text", "source", "target"))
        ref = patchify_latent(src, 2)
        drop_t, drop_i = self.drop_masks(gens)
        etext, emask = self._empty_text(text.shape[1])
        base_text = torch.where(drop_t[:, None, None], etext.expand_as(text), text)
        base_mask = torch.where(drop_t[:, None], emask.expand_as(mask), mask)
        ref = torch.where(drop_i[:, None, None], torch.zeros_like(ref), ref)
        noisy, t, target = self.flow_noisy(x0, gens)
        h, w = x0.shape[-2:]
        return {"condition": cond, "noisy": patchify_latent(noisy, 2), "ref": ref, "t": t, "text": (base_text, base_mask),
                "target": patchify_latent(target, 2), "hw": (h, w)}

    def decode_latent(self, lat):
        lat = lat * self.lat_std.to(lat.dtype) + self.lat_mean.to(lat.dtype)
        return self.vae.decode(lat[:, :, None]).sample[:, :, 0]  # the Qwen VAE has a frame axis
