"""FLUX.2 [klein] 4B / 9B: Flux2Transformer2DModel on the FLUX.2 VAE's 128-channel latents (one token per latent
pixel); the reference image's latent tokens follow the noisy tokens with time index 10, flow-matching loss
(target noise - x0). The same code serves 4B (Qwen3-4B) and 9B (Qwen3-8B): the widths come from the base folder.

Trained the way ComfyUI's klein edit template runs it (CLIPLoader type ``flux2``, comfy/text_encoders/flux.py;
diffusers' ``Flux2KleinPipeline`` does the same up to prompt truncation and image resampling):

* the instruction, in Qwen3's chat template with thinking turned off, is padded with ``<|endoftext|>`` to 512
  tokens (masked in the encoder); the text condition is the hidden states entering layers 9, 18 and 27,
  concatenated per token (3 x the encoder width, no final norm), all 512 tokens, no pooled output;
* latents: the VAE mean, 2 x 2 patches folded into channels, normalised by the VAE's batch-norm statistics
  (ComfyUI's Flux2 VAE does this inside VAEEncode; its latent format is the identity);
* the reference latent gets position ids (10, row, col, 0), the output (0, row, col, 0), text (0, 0, 0, l)
  (ComfyUI's ``ref_latents_method`` "index", diffusers' ``_prepare_image_ids``);
* the negative (CFG 5 in the base template, 10% text dropout in training) is the empty instruction with the
  same reference; the schedule is Flux2Scheduler's (the image-size and step-count dependent shift);
* no guidance embedding (klein has none).

The generator reads all 512 text tokens (the padding's hidden states depend on the prompt: Qwen3 is causal)
and the VAE tokens of the source, as HY-WU Condition Encode computes them from the same CLIP and VAE.
Prompts are cut at 512 tokens, as diffusers cuts them (ComfyUI does not: an instruction of more than about
490 tokens gives the base a longer text there).
"""
from __future__ import annotations

import math

import torch

from hywu_nodes.core import Condition, ConditionSource, ConditionSpec, patchify_latent, standard_condition_spec

from .base import BaseParts, FlowMatchingFamily, freeze, repeat_draws, sample_generators, unpatchify_latent

REQUIRED = {
    "transformer": "Flux2Transformer2DModel",
    "text_encoder": "Qwen3ForCausalLM (Qwen3-4B for klein 4B, Qwen3-8B for klein 9B)",
    "tokenizer": "its tokenizer files",
    "vae": "AutoencoderKLFlux2",
}
KLEIN_TEMPLATE = "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"  # ComfyUI's KleinTokenizer
KLEIN_TEXT_TOKENS = 512  # ComfyUI's Qwen3Tokenizer min_length (diffusers' max_sequence_length)
KLEIN_LAYERS = (9, 18, 27)  # hidden states entering these layers (ComfyUI's Qwen3_4BModel layer=[9, 18, 27])
KLEIN_CFG = 5.0  # CFGGuider of ComfyUI's klein base edit template
REFERENCE_INDEX = 10.0  # time index of the first reference image (ComfyUI's ref_index_scale)


def flux2_sigmas(steps: int, width: int, height: int) -> torch.Tensor:
    """ComfyUI's Flux2Scheduler for an image of ``width`` x ``height`` pixels: ``steps`` + 1 sigmas, 1 -> 0,
    time-shifted by the empirical mu of diffusers' Flux2 pipelines (its float32 arithmetic, so equal to the node)."""
    seq_len = round(width * height / (16 * 16))
    a1, b1, a2, b2 = 8.73809524e-05, 1.89833333, 0.00016927, 0.45666666
    if seq_len > 4300:
        mu = a2 * seq_len + b2
    else:
        m200, m10 = a2 * seq_len + b2, a1 * seq_len + b1
        a = (m200 - m10) / 190.0
        mu = a * steps + (m200 - 200.0 * a)
    t = torch.linspace(1, 0, steps + 1)
    return math.exp(mu) / (math.exp(mu) + (1 / t - 1) ** 1.0)


def position_ids(h: int, w: int, index: float = 0.0) -> torch.Tensor:
    """(h*w, 4) rotary ids (index, row, col, 0) of a latent's tokens, row-major."""
    ids = torch.zeros(h, w, 4)
    ids[..., 0] = index
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(-1, 4)


class Flux2Klein(FlowMatchingFamily):
    name = "flux2_klein"
    default_drop = (0.1, 0.0)  # the base template samples with CFG against the empty instruction

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
        from transformers import Qwen3Model

        parts = BaseParts(cfg, self.name, REQUIRED)
        self.transformer = parts.model("transformer", Flux2Transformer2DModel, device, dtype)
        self.text_encoder = parts.model("text_encoder", Qwen3Model, device, dtype)
        deepest = max(KLEIN_LAYERS) + 1
        if len(self.text_encoder.layers) > deepest:  # layers after the last tap never reach the condition
            del self.text_encoder.layers[deepest:]
            self.text_encoder.config.num_hidden_layers = deepest
        self.tokenizer = parts.tokenizer("tokenizer", max_length=KLEIN_TEXT_TOKENS)
        if parts.synthetic:  # the byte tokenizer of synthetic bases has no chat tokens: ComfyUI's Qwen files
            from transformers import AutoTokenizer

            from trainer.tiny_bases import comfyui_checkout

            self.tokenizer = AutoTokenizer.from_pretrained(comfyui_checkout() / "comfy" / "text_encoders" / "qwen25_tokenizer")
        self.tokenizer.pad_token, self.tokenizer.padding_side = "<|endoftext|>", "right"
        self.vae = parts.model("vae", AutoencoderKLFlux2, device, dtype)
        freeze(self.transformer, self.text_encoder, self.vae)
        self.denoiser = self.transformer
        self.latent_channels = self.vae.config.latent_channels * 4
        if self.resolution % 16:
            raise ValueError(f"base.resolution {self.resolution} must be a multiple of 16 for {self.name}")
        self.text_tokens = cfg.base.text_tokens or KLEIN_TEXT_TOKENS
        spec = standard_condition_spec(
            text_width=self.text_encoder.config.hidden_size * len(KLEIN_LAYERS), text_tokens=self.text_tokens,
            latent_channels=self.latent_channels, image_resolution=self.resolution, patch=1, vae_scale=16)
        text = spec.sources[0]  # the CLIP's own output (three taps, no final norm), as the sampler gets it
        self.condition_spec = ConditionSpec((ConditionSource(text.name, text.kind, text.width, text.max_tokens,
                                                             {**text.options, "final_norm": False}), *spec.sources[1:]))
        bn = self.vae.bn
        self.bn_mean = bn.running_mean.view(1, -1, 1, 1).to(device, torch.float32)
        self.bn_std = torch.sqrt(bn.running_var.view(1, -1, 1, 1).to(device, torch.float32) + bn.eps)
        self._empty = None

    def frozen_modules(self):
        return {"transformer": self.transformer, "text_encoder": self.text_encoder, "vae": self.vae}

    # --- encoders ---------------------------------------------------------------------------------
    def token_ids(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, attention mask), (B, 512): the chat template, right-padded with <|endoftext|>."""
        enc = self.tokenizer([KLEIN_TEMPLATE.format(t) for t in texts], padding="max_length", max_length=KLEIN_TEXT_TOKENS,
                             truncation=True, add_special_tokens=False, return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def encode_text(self, texts):
        ids, mask = self.token_ids(texts)
        out = self.text_encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=True,
                                use_cache=False)
        return torch.cat([out.hidden_states[k] for k in KLEIN_LAYERS], -1)

    @torch.no_grad()
    def latent(self, images01):
        """(B, 3, H, W) in [0, 1] -> (B, 128, H//16, W//16) (sides cropped to multiples of 16): what VAEEncode gives ComfyUI's
        Flux2 model (mean, 2x2 patches into channels c*4 + i*2 + j, batch-norm statistics)."""
        x = self.vae_pixels(images01).to(self.device, self.dtype) * 2 - 1
        z = self.vae.encode(x).latent_dist.mode().float()
        b, c, h, w = z.shape
        z = z.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)
        return ((z - self.bn_mean) / self.bn_std).to(self.dtype)

    def decode_latent(self, lat):
        z = lat.float() * self.bn_std + self.bn_mean
        b, c, h, w = z.shape
        z = z.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)
        return self.vae.decode(z.to(self.dtype)).sample

    @torch.no_grad()
    def encode_condition(self, source, instructions):
        return self.encoded_condition({"text": self.encode_text(instructions), "source": self.latent(self.condition_image(source))})

    @torch.no_grad()
    def encoded_condition(self, enc):
        return Condition({"text": enc["text"][:, : self.text_tokens].float(), "image": patchify_latent(self.condition_latent(enc), 1).float()})

    def empty_text(self):
        if self._empty is None:
            self._empty = self.encode_text([""])
        return self._empty

    # --- denoiser -----------------------------------------------------------------------------------
    def _forward(self, noisy_tokens, ref_tokens, t, text, h, w, rh=None, rw=None):
        n = noisy_tokens.shape[1]
        img_ids = torch.cat([position_ids(h, w), position_ids(rh or h, rw or w, REFERENCE_INDEX)]).to(self.device)
        txt_ids = torch.zeros(text.shape[1], 4, device=self.device)
        txt_ids[:, 3] = torch.arange(text.shape[1], device=self.device)
        out = self.transformer(hidden_states=torch.cat([noisy_tokens, ref_tokens], 1).to(self.dtype),
                               encoder_hidden_states=text.to(self.dtype), timestep=t.to(self.dtype), img_ids=img_ids,
                               txt_ids=txt_ids, guidance=None).sample
        return out[:, :n]

    @torch.no_grad()
    def prepare_encoded(self, enc, step, keys):
        gens = sample_generators(self.cfg.train.seed, step, keys)
        cond = self.encoded_condition(enc)
        text, src, x0 = (repeat_draws(enc[k], len(keys)) for k in ("text", "source", "target"))
        drop_t, drop_i = self.drop_masks(gens)
        text = torch.where(drop_t[:, None, None], self.empty_text().to(text.dtype).expand_as(text), text)
        ref = patchify_latent(src, 1)
        ref = torch.where(drop_i[:, None, None], torch.zeros_like(ref), ref)
        noisy, t, target = self.flow_noisy(x0, gens)
        h, w = x0.shape[-2:]
        return {"condition": cond, "noisy": patchify_latent(noisy, 1), "ref": ref, "t": t, "text": text,
                "target": patchify_latent(target, 1), "hw": (h, w, *src.shape[-2:])}

    @torch.no_grad()
    def sample(self, source, instructions, steps, seed=0, cfg=KLEIN_CFG):
        """Edit ``source`` (B, 3, H, W) in [0, 1] as the klein edit template does with that image: the output latent
        has the source's size (EmptyFlux2LatentImage from its size), Flux2Scheduler's sigmas for it, euler, CFG
        ``cfg`` against the empty instruction with the same reference (cfg 1: the distilled template, one pass)."""
        text = self.encode_text(instructions)
        src = self.latent(source)
        h, w = src.shape[-2:]
        ref = patchify_latent(src, 1)
        g = torch.Generator().manual_seed(seed)
        x = patchify_latent(torch.randn(src.shape, generator=g), 1).to(self.device, torch.float32)
        empty = self.empty_text().expand_as(text) if cfg != 1.0 else None
        sigmas = flux2_sigmas(steps, source.shape[-1], source.shape[-2])
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):  # Euler on the flow ODE
            t = torch.full((x.shape[0],), float(s), device=self.device)
            v = self._forward(x, ref, t, text, h, w).float()
            if empty is not None:
                vu = self._forward(x, ref, t, empty, h, w).float()
                v = vu + cfg * (v - vu)
            x = x + (s_next - s) * v
        lat = unpatchify_latent(x, self.latent_channels, h, w, patch=1)
        return ((self.decode_latent(lat).float() + 1) / 2).clamp(0, 1).cpu()
