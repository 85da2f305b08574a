"""SD1.5 InstructPix2Pix: UNet2DConditionModel with 8 input channels (noisy latent + source
latent), the base scheduler's prediction type (epsilon / v) and noise schedule.

Conventions (diffusers' StableDiffusionInstructPix2PixPipeline and ComfyUI):
  * text = CLIP last_hidden_state (after the final norm) of the instruction, 77 tokens padded with EOS;
  * the diffusion latent and the generator's image condition are in the model's scaled space
    (AutoencoderKL: ``mode() * scaling_factor``; AutoencoderTiny/TAESD latents already are);
  * the concatenated source latent is the *unscaled* latent, model-space / 0.18215, which is
    what ComfyUI's InstructPixToPixConditioning feeds the UNet (for TAESD too, where diffusers'
    own pipeline does not divide: a generator trained that way would see another base in ComfyUI);
  * CFG dropout: text -> empty-prompt embedding, source latent -> zeros, independently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from hywu_nodes.core import Condition, patchify_latent, prompt_mask, standard_condition_spec

from .base import BaseParts, FamilyAdapter, freeze, randn_like_per_sample, repeat_draws, sample_generators

SD15_LATENT_SCALE = 0.18215  # SD1.5 latent format: model-space latent = raw VAE latent * this

TEXT_CACHE_SIZE = 2048  # instruction embeddings kept (77 x 768 fp32 = 236 KB each)

REQUIRED = {
    "unet": "UNet2DConditionModel with in_channels=8",
    "text_encoder": "transformers CLIPTextModel",
    "tokenizer": "CLIPTokenizer files",
    "vae": "AutoencoderKL or AutoencoderTiny",
    "scheduler": "DDPMScheduler config (prediction type and betas)",
}


def min_snr_weights(alphas_cumprod_t: torch.Tensor, gamma: float, v_prediction: bool = False) -> torch.Tensor:
    """min-SNR loss weights (Hang et al. 2023) at the samples' alpha-bar: min(SNR, gamma) / SNR for
    epsilon prediction, min(SNR, gamma) / (SNR + 1) for v prediction."""
    snr = alphas_cumprod_t / (1 - alphas_cumprod_t)
    return snr.clamp(max=gamma) / (snr + 1 if v_prediction else snr)


class SD15IP2P(FamilyAdapter):
    name = "sd15_ip2p"
    default_drop = (0.05, 0.05)  # InstructPix2Pix paper
    flow = False

    def __init__(self, cfg, device, dtype):
        super().__init__(cfg, device, dtype)
        from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DConditionModel
        from transformers import CLIPTextModel

        parts = BaseParts(cfg, self.name, REQUIRED)
        self.unet = parts.model("unet", UNet2DConditionModel, device, dtype)
        if self.unet.config.in_channels != 2 * self.unet.config.out_channels:
            raise ValueError(f"{cfg.base.path}/unet has in_channels={self.unet.config.in_channels}; an InstructPix2Pix UNet has "
                             f"2 x {self.unet.config.out_channels} (noisy latent + source latent)")
        self.text_encoder = parts.model("text_encoder", CLIPTextModel, device, dtype)
        self.tokenizer = parts.tokenizer("tokenizer", max_length=77)
        vae_cls = AutoencoderTiny if parts.class_name("vae") == "AutoencoderTiny" else AutoencoderKL
        self.vae = parts.model("vae", vae_cls, device, dtype)
        self.scheduler = parts.scheduler(DDPMScheduler)
        freeze(self.unet, self.text_encoder, self.vae)
        self.denoiser = self.unet
        self.latent_channels = self.unet.config.out_channels
        self.text_tokens = cfg.base.text_tokens or self.tokenizer.model_max_length
        self.scaling = float(getattr(self.vae.config, "scaling_factor", 1.0))
        self.condition_spec = standard_condition_spec(
            text_width=self.text_encoder.config.hidden_size, text_tokens=self.text_tokens,
            latent_channels=self.latent_channels, image_resolution=self.resolution, patch=2,
            text_layer=cfg.base.text_layer, text_mask=cfg.base.text_mask)
        self.text_source = self.condition_spec["text"]
        self.alphas_cumprod = self.scheduler.alphas_cumprod.to(device)
        self._empty = None
        self._text_cache: dict[str, torch.Tensor] = {}

    def frozen_modules(self):
        return {"unet": self.unet, "text_encoder": self.text_encoder, "vae": self.vae}

    # Encoders ---------------------------------------------------------------------------------
    @torch.no_grad()
    def _encoded(self, texts: list[str]) -> list[tuple]:
        """Per text: (the UNet's context = last layer after the final norm, the generator's text
        at the condition spec's layer, its prompt mask). As ComfyUI encodes: 77 ids padded with
        the end token, no attention mask. The text encoder is frozen, so an instruction's
        encoding never changes: edit datasets repeat instructions a lot, and CLIP is most of a
        CPU step otherwise."""
        missing = list(dict.fromkeys(t for t in texts if t not in self._text_cache))
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.text_tokens, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            layer = self.text_source.text_layer
            out = self.text_encoder(ids, output_hidden_states=layer != -1)
            gen = out.last_hidden_state if layer == -1 else self.text_encoder.final_layer_norm(out.hidden_states[layer])
            mask = prompt_mask(ids, self.tokenizer.eos_token_id)
            for i, t in enumerate(missing):
                if len(self._text_cache) >= TEXT_CACHE_SIZE:
                    self._text_cache.pop(next(iter(self._text_cache)))  # oldest first
                self._text_cache[t] = (out.last_hidden_state[i], gen[i], mask[i])
        return [self._text_cache[t] for t in texts]

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """The UNet's text context (B, 77, 768)."""
        return torch.stack([e[0] for e in self._encoded(texts)])

    def generator_text(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """The generator's text source: hidden states (B, T, W) float32 and the prompt mask (B, T)."""
        enc = self._encoded(texts)
        return torch.stack([e[1] for e in enc]).float(), torch.stack([e[2] for e in enc])

    def text_condition(self, texts: list[str], image_tokens: torch.Tensor) -> Condition:
        text, mask = self.generator_text(texts)
        masks = {"text": mask} if self.text_source.padding_mask else {}
        return Condition({"text": text, "image": image_tokens}, masks)

    @torch.no_grad()
    def vae_latent(self, images01: torch.Tensor) -> torch.Tensor:
        """Deterministic latent of images in [0, 1], in the space the denoiser works in."""
        x = (self.vae_pixels(images01).to(self.device, self.dtype) * 2 - 1)
        out = self.vae.encode(x)
        return out.latents if hasattr(out, "latents") else out.latent_dist.mode() * self.scaling

    @torch.no_grad()
    def encode_condition(self, source, instructions):
        lat = self.vae_latent(self.condition_image(source))
        return self.text_condition(instructions, patchify_latent(lat.float(), 2))

    def empty_text(self) -> torch.Tensor:
        if self._empty is None:
            self._empty = self.encode_text([""])
        return self._empty

    def training_text(self, texts: list[str]) -> tuple[torch.Tensor, ...]:
        """What the trainer keeps per instruction: (UNet context, prompt mask), plus the
        generator's text in between when it reads another layer than the last."""
        enc = self._encoded(texts)
        ctx, mask = torch.stack([e[0] for e in enc]), torch.stack([e[2] for e in enc])
        if self.text_source.text_layer == -1:
            return ctx, mask
        return ctx, torch.stack([e[1] for e in enc]), mask

    # Training ---------------------------------------------------------------------------------
    def latent(self, images01: torch.Tensor) -> torch.Tensor:
        return self.vae_latent(images01)

    @torch.no_grad()
    def encoded_condition(self, enc):
        ctx, *rest = enc["text"]
        gen_text, mask = (ctx, rest[0]) if len(rest) == 1 else rest
        masks = {"text": mask} if self.text_source.padding_mask else {}
        return Condition({"text": gen_text.float(), "image": patchify_latent(self.condition_latent(enc).float(), 2)}, masks)

    @torch.no_grad()
    def prepare_encoded(self, enc, step, keys):
        gens = sample_generators(self.cfg.train.seed, step, keys)
        b = len(keys)
        cond, ctx = self.encoded_condition(enc), enc["text"][0]
        text, src_model, x0 = repeat_draws(ctx, b), repeat_draws(enc["source"], b), repeat_draws(enc["target"], b)
        src = src_model / SD15_LATENT_SCALE  # the IP2P concat, as ComfyUI builds it
        drop_t, drop_i = self.drop_masks(gens)
        base_text = torch.where(drop_t[:, None, None], self.empty_text().expand(b, -1, -1), text)
        base_src = torch.where(drop_i[:, None, None, None], torch.zeros_like(src), src)
        noise = randn_like_per_sample(gens, x0.shape[1:]).to(self.device, x0.dtype)
        n_train = self.scheduler.config.num_train_timesteps
        t = torch.stack([torch.randint(0, n_train, (), generator=g) for g in gens]).to(self.device)
        noisy = self.scheduler.add_noise(x0, noise, t)
        ptype = self.scheduler.config.prediction_type
        if ptype == "epsilon":
            target = noise
        elif ptype == "v_prediction":
            target = self.scheduler.get_velocity(x0, noise, t)
        else:
            raise ValueError(f"scheduler prediction_type '{ptype}' is not supported (epsilon or v_prediction)")
        return {"condition": cond, "x": torch.cat([noisy, base_src], 1), "t": t, "text": base_text, "target": target}

    def loss_weights(self, prep):
        gamma = self.cfg.train.snr_gamma
        if gamma <= 0:
            return None
        ac = self.scheduler.alphas_cumprod.to(prep["t"].device)[prep["t"]].float()
        return min_snr_weights(ac, gamma, self.scheduler.config.prediction_type == "v_prediction")

    def loss(self, prep):
        pred = self.unet(prep["x"].to(self.dtype), prep["t"], encoder_hidden_states=prep["text"]).sample
        return F.mse_loss(pred.float(), prep["target"].float(), reduction="none").flatten(1).mean(1)

    # Validation -------------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, source, instructions, steps, seed=0, text_guidance=7.5, image_guidance=1.5):
        from diffusers import DDIMScheduler

        sched = DDIMScheduler.from_config(self.scheduler.config)
        sched.set_timesteps(steps, device=self.device)
        b = source.shape[0]
        text = self.encode_text(instructions)
        src = self.vae_latent(source) / SD15_LATENT_SCALE
        empty = self.empty_text().expand(b, -1, -1)
        # IP2P's three-way batch: [text + image, image only, neither]; the LoRA index is i % b.
        texts = torch.cat([text, empty, empty])
        srcs = torch.cat([src, src, torch.zeros_like(src)])
        g = torch.Generator().manual_seed(seed)
        lat = (torch.randn(src.shape, generator=g) * sched.init_noise_sigma).to(self.device, self.dtype)
        for t in sched.timesteps:
            x = torch.cat([sched.scale_model_input(torch.cat([lat] * 3), t), srcs], 1)
            c, i, u = self.unet(x, t, encoder_hidden_states=texts).sample.chunk(3)
            eps = u + text_guidance * (c - i) + image_guidance * (i - u)
            lat = sched.step(eps, t, lat).prev_sample
        out = self.vae.decode(lat / self.scaling).sample
        return ((out.float() + 1) / 2).clamp(0, 1).cpu()
