"""World building and evaluation of the miniature HY-WU world (``make demo``, bench/conflict.py, tests).

The adapters compared here (one shared LoRA, one LoRA per task, the HY-WU generator) are trained
by ``python -m trainer.train`` (trainer/configs/demo.yaml). This module builds the frozen base they
adapt and scores what they do:

* :func:`build_world` turns the seeded micro SD1.5-InstructPix2Pix base (scripts/build_micro_base.py)
  into a small but real editor of the synthetic world (trainer/synthetic.py), then it is frozen:
  - **VAE** (TAESD-shaped, what ComfyUI loads for the micro checkpoint): starts as an exact 8x8
    average pool plus colour whitening (encoder) and a bilinear upsampler (decoder), then is
    fine-tuned as an autoencoder on the world's images. The world's images are smooth, so the
    4x4x4 latent grid of a 32x32 image carries them (the "VAE ceiling" row).
  - **text encoder** (CLIP-L-shaped, the only text encoder ComfyUI loads for SD1.5): its layers
    2-12 are exact pass-throughs (zero output projections) and the first layer's attention, the
    word embeddings and the final norm are trained so that paraphrases of one edit land together
    (contrastive over every task's training sentences, with random unknown words mixed in so that
    a sentence frame it never saw matters little). It knows every task's words, like a real CLIP
    knows words its UNet was never trained to act on.
  - **UNet**: an ordinary InstructPix2Pix fine-tune on :data:`synthetic.BASE_TASKS` only. The
    conflicting pairs are new to it: that is what the adapters learn.
* :class:`World` loads a built base and samples edits the way ComfyUI's KSampler does
  (``euler`` / ``simple``); :func:`evaluate` scores the methods' edits (PSNR / SSIM to the exact
  targets), :func:`task_separation` tells whether the LoRAs depend on the request (eta^2),
  :func:`gradient_cosines` how the shared LoRA's gradients for two tasks align.

Conventions are the trainer's and ComfyUI's: AutoencoderTiny latents are the UNet's scaled space
(ComfyUI LATENT * 0.18215); the IP2P image channels get the unscaled latent (latent / 0.18215);
text is the CLIP's hidden states of 77 ids padded with the end token.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from hywu_nodes.core import (Condition, GeneratedLoRA, from_lora_state_dict, load_generator,  # noqa: E402
                             lora_patched, patchify_latent, prompt_mask)
from trainer import synthetic  # noqa: E402
from trainer.families.sd15_ip2p import min_snr_weights  # noqa: E402

DEMO_TASKS = synthetic.ADAPTER_TASKS
METHODS = ("base", "shared_lora", "per_task_lora", "hywu")
METHOD_NAMES = {"base": "base alone", "shared_lora": "shared LoRA", "per_task_lora": "per-task LoRA*",
                "hywu": "HY-WU", "vae_ceiling": "(VAE ceiling)", "identity": "(no edit)"}
SPLITS = ("val", "heldout_phrasing")
SD15_LATENT_SCALE = 0.18215
IP2P_CONCAT_SCALE = 1 / SD15_LATENT_SCALE  # the IP2P image channels get the unscaled latent (ComfyUI)


def log(msg: str) -> None:
    print(msg, flush=True)


def progress(iterable=None, total=None, desc=None, enabled=True, every_s: float = 30.0):
    """A tqdm bar on a terminal; elsewhere (a log file, a pipe) no bar frames, only a plain line
    with steps done, elapsed time and ETA every ``every_s`` seconds (when ``enabled``)."""
    if enabled and sys.stdout.isatty():
        from tqdm.auto import tqdm

        return tqdm(iterable, total=total, desc=desc, dynamic_ncols=True, mininterval=2.0, file=sys.stdout)
    return _eta_lines(iterable, total, desc, enabled, every_s)


def _eta_lines(iterable, total, desc, enabled, every_s):
    total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
    t0 = last = time.time()
    for done, item in enumerate(iterable, 1):
        yield item
        now = time.time()
        if enabled and now - last >= every_s and total and done < total:
            last = now
            log(f"   {desc}: {done}/{total}, {now - t0:.0f}s elapsed, ETA {(now - t0) / done * (total - done):.0f}s")


@dataclass(frozen=True)
class WorldSettings:
    """Every knob of the frozen demo base; the built base is cached under a hash of them."""

    resolution: int = 32
    seed: int = 0
    vae_images: int = 700          # training images for the VAE (sources and targets of every task)
    vae_steps: int = 300
    vae_batch: int = 16
    vae_lr: float = 2e-3
    text_steps: int = 100
    text_lr: float = 2e-3
    text_temperature: float = 0.1
    text_noise_words: int = 3      # up to this many random unknown words per training sentence
    text_sparse: bool = True       # word table: sparse gradients + lazy Adam (21 s; dense AdamW: 50 s, same quality)
    base_n_train: int = 1000       # IP2P pretraining examples (BASE_TASKS)
    base_steps: int = 600
    base_batch: int = 32
    base_lr: float = 1e-3
    base_drop_text: float = 0.1    # CFG dropout of the instruction while pretraining the base
    base_drop_image: float = 0.05  # ... and of the source image
    base_snr_gamma: float = 5.0    # min-SNR loss weighting (Hang et al. 2023); 0 = plain epsilon MSE

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def with_overrides(self, sets) -> "WorldSettings":
        """A copy with ``KEY=VALUE`` overrides (``--set``), typed like the field; booleans read true/false."""
        out = self
        for kv in sets:
            k, _, v = kv.partition("=")
            if k not in asdict(self):
                raise SystemExit(f"--set {kv}: unknown world setting '{k}'; known: {', '.join(asdict(self))}")
            kind = type(getattr(self, k))
            if kind is bool:
                if v.lower() not in ("true", "false", "1", "0"):
                    raise SystemExit(f"--set {kv}: '{k}' is true or false")
                value = v.lower() in ("true", "1")
            else:
                value = kind(v)
            out = replace(out, **{k: value})
        return out


def _cosine_lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def _round_fp16_(module: torch.nn.Module) -> torch.nn.Module:
    """ComfyUI keeps the checkpoint in fp16: make every weight exactly representable there."""
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(p.to(torch.float16).to(p.dtype))
    return module


def _images(split: str, n: int, s: WorldSettings, tasks) -> tuple[list, np.ndarray, np.ndarray]:
    ex = synthetic.make_examples(split, n, seed=s.seed, resolution=s.resolution, tasks=tasks)
    return ex, np.stack([np.asarray(e.source) for e in ex]), np.stack([np.asarray(e.target) for e in ex])


def _to_vae_input(images_u8: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images_u8).permute(0, 3, 1, 2).float() / 127.5 - 1


# ------------------------------------------------------------------------------ VAE

@torch.no_grad()
def analytic_taesd_(vae, rgb_mean: np.ndarray, rgb_whiten: np.ndarray, latent_scale: float = 0.6):
    """Set a diffusers AutoencoderTiny (TAESD layout) to a linear autoencoder of smooth images.

    Encoder: 2x2 averages at each of its three stride-2 convolutions (an 8x8 average pool of RGB),
    then ``latent[:3] = latent_scale * W (rgb - mean)`` with the whitening ``W``; latent channel 3
    starts at zero. Decoder: the inverse colour map split into positive and negative parts around
    grey (ReLU-safe, and zero padding fades to grey, not black), and each nearest 2x upsample
    followed by a [1 2 1]/4 blur per axis, which is bilinear interpolation. Every residual block
    starts as the identity (its last convolution at zero).
    """
    enc, dec = vae.encoder.layers, vae.decoder.layers
    for m in list(enc.modules()) + list(dec.modules()):
        if isinstance(m, torch.nn.Conv2d):
            m.weight.zero_()
            if m.bias is not None:
                m.bias.zero_()
    for c in range(3):
        enc[0].weight[c, c, 1, 1] = 1.0
    for i in (2, 6, 10):  # the stride-2 convolutions
        for c in range(3):
            enc[i].weight[c, c, 1:3, 1:3] = 0.25
    w = torch.as_tensor(rgb_whiten, dtype=torch.float32) * latent_scale
    mu = torch.as_tensor(rgb_mean, dtype=torch.float32)
    enc[14].weight[:3, :3, 1, 1] = w
    enc[14].bias[:3] = -(w @ mu)
    w_inv = torch.linalg.inv(w)
    for c in range(3):
        dec[0].weight[2 * c, :3, 1, 1] = w_inv[c]
        dec[0].bias[2 * c] = mu[c] - 0.5
        dec[0].weight[2 * c + 1, :3, 1, 1] = -w_inv[c]
        dec[0].bias[2 * c + 1] = 0.5 - mu[c]
        dec[18].weight[c, 2 * c, 1, 1], dec[18].weight[c, 2 * c + 1, 1, 1] = 1.0, -1.0
        dec[18].bias[c] = 0.5
    blur = torch.tensor([1.0, 2.0, 1.0])
    blur = blur[:, None] * blur[None] / 16
    for i in (6, 11, 16):  # the convolutions after each 2x upsample
        for c in range(6):
            dec[i].weight[c, c] = blur
    return vae


def train_vae(vae, s: WorldSettings, show: bool = True) -> float:
    """Analytic start, then autoencoder fine-tuning (L1 + MSE) on the world's images; returns the
    PSNR of decode(encode(x)) on validation images."""
    _, src, tgt = _images("train", s.vae_images, s, synthetic.TASKS)
    pool = np.concatenate([src, tgt])
    px = pool.reshape(-1, 3).astype(np.float64) / 255
    eigval, eigvec = np.linalg.eigh(np.cov(px.T))
    analytic_taesd_(vae, px.mean(0), (eigvec / np.sqrt(eigval)).T)
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=s.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 101)
    for step in progress(range(s.vae_steps), desc="VAE", enabled=show):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, s.vae_steps, s.vae_lr)
        x = _to_vae_input(pool[torch.randint(len(pool), (s.vae_batch,), generator=gen).numpy()])
        y = vae.decoder(vae.encoder(x))
        loss = (y - x).abs().mean() + (y - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
    vae.requires_grad_(False).eval()
    _round_fp16_(vae)
    _, vsrc, vtgt = _images("val", 64, s, synthetic.TASKS)
    val = np.concatenate([vsrc, vtgt])
    with torch.no_grad():
        rec = ((vae.decoder(vae.encoder(_to_vae_input(val))).clamp(-1, 1) + 1) * 127.5).round().byte()
    return float(psnr(rec.permute(0, 2, 3, 1).numpy(), val).mean())


# ------------------------------------------------------------------------------ text encoder

def pass_through_(text_encoder) -> None:
    """Make layers 2-12 of a CLIPTextModel exact identities (zero attention output projection and
    second MLP layer: each residual adds 0) and the first layer attention-only."""
    with torch.no_grad():
        for i, layer in enumerate(text_encoder.encoder.layers):
            if i > 0:
                layer.self_attn.out_proj.weight.zero_()
                layer.self_attn.out_proj.bias.zero_()
            layer.mlp.fc2.weight.zero_()
            layer.mlp.fc2.bias.zero_()


def short_text_encoder(text_encoder):
    """A 1-layer CLIPTextModel sharing the weights of a :func:`pass_through_` one: the same
    outputs at every hidden layer but the embeddings, for 1/12 of the compute."""
    from transformers import CLIPTextModel

    cfg = text_encoder.config.__class__(**{**text_encoder.config.to_dict(), "num_hidden_layers": 1})
    short = CLIPTextModel(cfg)
    short.embeddings = text_encoder.embeddings
    short.encoder.layers[0] = text_encoder.encoder.layers[0]
    short.final_layer_norm = text_encoder.final_layer_norm
    return short.eval()


def _noisy_ids(tokenizer, sentences, length, rng, noise_pool, max_noise):
    """Token ids padded with the end token; 0..max_noise random unknown words inserted per sentence."""
    rows, masks = [], []
    for text in sentences:
        ids = tokenizer(text).input_ids  # [BOS, words..., EOS]
        body = ids[1:-1]
        for _ in range(int(rng.integers(0, max_noise + 1))):
            body.insert(int(rng.integers(0, len(body) + 1)), int(rng.choice(noise_pool)))
        ids = ([ids[0]] + body + [ids[-1]])[:length]
        masks.append([1] * len(ids) + [0] * (length - len(ids)))
        rows.append(ids + [tokenizer.eos_token_id] * (length - len(ids)))
    return torch.tensor(rows), torch.tensor(masks)


def train_text_encoder(text_encoder, tokenizer, s: WorldSettings, show: bool = True, per_task: int = 3,
                       length: int = 24) -> None:
    """Supervised-contrastive training on every task's training sentences (positives: other
    sentences of the same task), on the masked mean of the final hidden states."""
    pass_through_(text_encoder)
    short = short_text_encoder(text_encoder)
    layer0 = text_encoder.encoder.layers[0]
    words = text_encoder.embeddings.token_embedding
    params = ([] if s.text_sparse else [words.weight]) + [text_encoder.embeddings.position_embedding.weight, *layer0.self_attn.parameters(),
              *layer0.layer_norm1.parameters(), *text_encoder.final_layer_norm.parameters()]
    text_encoder.requires_grad_(False)
    for p in params + [words.weight]:
        p.requires_grad_(True)
    short.train()
    opt = torch.optim.AdamW(params, lr=s.text_lr, weight_decay=0.0)
    # A step touches ~100 of the 49,408 word rows; text_sparse updates only those (sparse gradients,
    # lazy Adam): 2.4x faster, the same demo figures within one seed's noise (docs/demo.md).
    words.sparse = s.text_sparse
    word_opt = torch.optim.SparseAdam([words.weight], lr=s.text_lr) if s.text_sparse else None
    rng = np.random.default_rng(s.seed + 7)
    tasks = list(synthetic.TASKS)
    world_ids = {i for t in tasks for k in ("train", "heldout", "dev") for x in synthetic.PHRASINGS[t][k]
                 for i in tokenizer(x).input_ids}
    noise_pool = np.array(sorted(set(range(300, tokenizer.vocab_size - 10)) - world_ids))
    eye = None
    for _ in progress(range(s.text_steps), desc="text encoder", enabled=show):
        sentences, labels = [], []
        for i, t in enumerate(tasks):
            for x in rng.choice(synthetic.PHRASINGS[t]["train"], per_task, replace=False):
                sentences.append(str(x))
                labels.append(i)
        ids, mask = _noisy_ids(tokenizer, sentences, length, rng, noise_pool, s.text_noise_words)
        h = short(ids).last_hidden_state
        m = mask.unsqueeze(-1).float()
        z = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
        lab = torch.tensor(labels)
        eye = torch.eye(len(lab), dtype=torch.bool) if eye is None else eye
        sim = (z @ z.t() / s.text_temperature).masked_fill(eye, -1e9)
        pos = (lab[:, None] == lab[None]) & ~eye
        loss = (-(sim.log_softmax(-1) * pos).sum(1) / pos.sum(1)).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if word_opt is not None:
            word_opt.step()
            word_opt.zero_grad(set_to_none=True)
    words.sparse = False
    text_encoder.requires_grad_(False).eval()
    _round_fp16_(text_encoder)


# ------------------------------------------------------------------------------ the frozen world

class World:
    """A built demo base folder: UNet, VAE, text encoder (encoded through its exact 1-layer
    equivalent) and the noise schedule, frozen, with helpers to encode, sample and decode."""

    def __init__(self, base_dir: str | os.PathLike, device: torch.device | str = "cpu"):
        from diffusers import AutoencoderTiny, UNet2DConditionModel
        from transformers import CLIPTextModel, CLIPTokenizer

        self.base_dir, self.device = Path(base_dir), torch.device(device)
        self.unet = UNet2DConditionModel.from_pretrained(self.base_dir, subfolder="unet").to(self.device)
        self.vae = AutoencoderTiny.from_pretrained(self.base_dir, subfolder="vae").to(self.device)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.base_dir / "tokenizer")
        self.text_encoder = CLIPTextModel.from_pretrained(self.base_dir, subfolder="text_encoder").to(self.device)
        for m in (self.unet, self.vae, self.text_encoder):
            m.requires_grad_(False).eval()
        self.short_text = short_text_encoder(self.text_encoder)
        sched = json.loads((self.base_dir / "scheduler" / "scheduler_config.json").read_text())
        betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, sched["num_train_timesteps"],
                               dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()
        self._text: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def encode_text(self, prompts: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(hidden states (B, 77, 768) after the final norm, prompt mask (B, 77)); cached."""
        todo = list(dict.fromkeys(p for p in prompts if p not in self._text))
        for i in range(0, len(todo), batch):
            chunk = todo[i:i + batch]
            ids = self.tokenizer(chunk, padding="max_length", max_length=77, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
            hidden = self.short_text(ids).last_hidden_state.float()
            for p, h, m in zip(chunk, hidden, prompt_mask(ids, self.tokenizer.eos_token_id)):
                self._text[p] = (h, m)
        return torch.stack([self._text[p][0] for p in prompts]), torch.stack([self._text[p][1] for p in prompts])

    def check_short_text_encoder(self, prompts: list[str]) -> float:
        """Max |difference| between the full 12-layer CLIP and its 1-layer equivalent."""
        ids = self.tokenizer(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
        with torch.no_grad():
            full = self.text_encoder(ids.to(self.device)).last_hidden_state
        return float((full - self.encode_text(prompts)[0]).abs().max())

    @torch.no_grad()
    def encode_images(self, images_u8: np.ndarray, batch: int = 128) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 4, H/8, W/8) latents in the UNet's (scaled) space."""
        return torch.cat([self.vae.encode(_to_vae_input(images_u8[i:i + batch]).to(self.device)).latents.float()
                          for i in range(0, len(images_u8), batch)])

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 128) -> np.ndarray:
        out = []
        for i in range(0, len(latents), batch):
            x = self.vae.decode(latents[i:i + batch].to(self.device)).sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    def diffusion_loss(self, batch: dict, per_sample: bool = False, snr_gamma: float = 0.0) -> torch.Tensor:
        """IP2P epsilon loss: unet(cat[z_t, unscaled source latent], t, text) vs the noise; with
        ``snr_gamma`` > 0 each sample is weighted min(SNR, gamma) / SNR (min-SNR weighting)."""
        ac = self.alphas_cumprod.to(self.device)[batch["t"]].view(-1, 1, 1, 1)
        z_t = ac.sqrt() * batch["tgt_lat"] + (1 - ac).sqrt() * batch["noise"]
        pred = self.unet(torch.cat([z_t, batch["src_lat"] * IP2P_CONCAT_SCALE], 1), batch["t"], batch["ctx"]).sample
        err = (pred.float() - batch["noise"]).pow(2).flatten(1).mean(1)
        if snr_gamma > 0:
            err = err * min_snr_weights(ac.flatten(), snr_gamma)
        return err if per_sample else err.mean()

    @torch.no_grad()
    def sample(self, src_lat: torch.Tensor, text: torch.Tensor, seeds: list[int], steps: int, cfg: float = 1.0,
               lora: GeneratedLoRA | None = None) -> torch.Tensor:
        """ComfyUI's KSampler (euler, simple, ``steps``, ``cfg``) on an IP2P model, in diffusers
        terms: x = sigma_max-scaled noise; eps = uncond + cfg * (cond - uncond) with the source
        latent in both; x <- x + (sigma_next - sigma) * eps. ``lora`` (one per sample) is in both
        CFG passes, as HY-WU Apply puts it."""
        ac = self.alphas_cumprod
        ts = sampler_timesteps(steps)
        sigmas = [((1 - ac[t]) / ac[t]).sqrt().item() for t in ts] + [0.0]
        b = src_lat.shape[0]
        concat = src_lat * IP2P_CONCAT_SCALE
        noise = torch.stack([torch.randn(src_lat.shape[1:], generator=torch.Generator().manual_seed(int(s)))
                             for s in seeds]).to(self.device)
        x = noise * math.sqrt(1 + sigmas[0] ** 2)
        empty = self.encode_text([""])[0].expand(b, -1, -1)
        for i, t in enumerate(ts):
            x_in = x / math.sqrt(1 + sigmas[i] ** 2)
            tt = torch.full((b,), t, device=self.device)
            if cfg != 1.0:
                with _patched(self.unet, lora, None if lora is None else torch.arange(2 * b) % lora.batch_size):
                    eps = self.unet(torch.cat([torch.cat([x_in, concat], 1)] * 2), torch.cat([tt, tt]),
                                    torch.cat([text, empty])).sample
                eps_c, eps_u = eps.chunk(2)
                eps = eps_u + cfg * (eps_c - eps_u)
            else:
                with _patched(self.unet, lora, None):
                    eps = self.unet(torch.cat([x_in, concat], 1), tt, text).sample
            x = x + (sigmas[i + 1] - sigmas[i]) * eps
        return x


def _patched(model, lora, sample_to_lora):
    return lora_patched(model, lora, sample_to_lora=sample_to_lora) if lora is not None else contextlib.nullcontext()


def sampler_timesteps(steps: int) -> list[int]:
    """Timesteps of ComfyUI's "simple" scheduler for an SD1.5 (1000-step) model."""
    ss = 1000 / steps
    return [999 - int(i * ss) for i in range(steps)]


# ------------------------------------------------------------------------------ data

@dataclass
class Split:
    """One split of the synthetic world, encoded once: images, latents, text, labels."""

    name: str
    src: np.ndarray          # (N, H, W, 3) uint8 source images
    tgt: np.ndarray          # (N, H, W, 3) uint8 exact targets
    instructions: list
    tasks: list
    task_idx: torch.Tensor   # (N,) index into the task list
    src_lat: torch.Tensor
    tgt_lat: torch.Tensor
    text: torch.Tensor       # (N, 77, 768)
    mask: torch.Tensor       # (N, 77) prompt mask
    edits: list = None       # per example, a composed task's separate edits (synthetic.EditExample.edits)

    def __len__(self):
        return len(self.tasks)


def make_split(world: World, split: str, n: int, tasks, seed: int = 0, resolution: int = 32) -> Split:
    ex = synthetic.make_examples(split, n, seed=seed, resolution=resolution, tasks=tasks)
    src = np.stack([np.asarray(e.source) for e in ex])
    tgt = np.stack([np.asarray(e.target) for e in ex])
    text, mask = world.encode_text([e.instruction for e in ex])
    return Split(split, src, tgt, [e.instruction for e in ex], [e.task for e in ex],
                 torch.tensor([list(tasks).index(e.task) for e in ex]), world.encode_images(src),
                 world.encode_images(tgt), text, mask, [e.edits for e in ex])


# ------------------------------------------------------------------------------ base pretraining

def pretrain_unet(world: World, data: Split, s: WorldSettings, show: bool = True) -> list[float]:
    """Ordinary InstructPix2Pix fine-tune of the whole UNet (epsilon loss, CFG dropout)."""
    unet = world.unet
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=s.base_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(s.seed + 202)
    empty = world.encode_text([""])[0]
    losses = []
    for step in progress(range(s.base_steps), desc="base UNet (IP2P)", enabled=show):
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, s.base_steps, s.base_lr)
        idx = torch.randint(len(data), (s.base_batch,), generator=gen)
        n = len(idx)
        t = torch.randint(0, 1000, (n,), generator=gen)
        noise = torch.randn(data.tgt_lat[idx].shape, generator=gen)
        drop_t = torch.rand(n, generator=gen) < s.base_drop_text
        drop_i = torch.rand(n, generator=gen) < s.base_drop_image
        batch = {"t": t.to(world.device), "noise": noise.to(world.device), "tgt_lat": data.tgt_lat[idx],
                 "src_lat": torch.where(drop_i[:, None, None, None], 0.0, data.src_lat[idx]),
                 "ctx": torch.where(drop_t[:, None, None], empty.expand(n, -1, -1), data.text[idx])}
        loss = world.diffusion_loss(batch, snr_gamma=s.base_snr_gamma)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    unet.requires_grad_(False).eval()
    _round_fp16_(unet)
    return losses


def build_world(micro_dir: Path, out_dir: Path, s: WorldSettings, show: bool = True) -> dict:
    """Copy the seeded micro base to ``out_dir`` and make it the demo's frozen editor (see the
    module docstring). Writes ``hywu_demo_base.json`` with the settings key and what was measured."""
    from diffusers import AutoencoderTiny
    from transformers import CLIPTextModel, CLIPTokenizer

    t0 = time.time()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(micro_dir, tmp)
    torch.manual_seed(s.seed)
    seconds = {}
    vae = AutoencoderTiny.from_pretrained(tmp, subfolder="vae")
    vae_psnr = train_vae(vae, s, show)
    vae.save_pretrained(tmp / "vae", safe_serialization=True)
    seconds["vae"] = round(time.time() - t0, 1)
    te = CLIPTextModel.from_pretrained(tmp, subfolder="text_encoder")
    train_text_encoder(te, CLIPTokenizer.from_pretrained(tmp / "tokenizer"), s, show)
    te.save_pretrained(tmp / "text_encoder", safe_serialization=True)
    seconds["text_encoder"] = round(time.time() - t0 - sum(seconds.values()), 1)
    world = World(tmp)
    data = make_split(world, "train", s.base_n_train, synthetic.BASE_TASKS, s.seed, s.resolution)
    losses = pretrain_unet(world, data, s, show)
    world.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    seconds["unet"] = round(time.time() - t0 - sum(seconds.values()), 1)
    info = {"builder": "scripts/hywu_demo_core.py build_world", "from": str(micro_dir), "settings_key": s.key(),
            "settings": asdict(s), "vae_ceiling_psnr_val": vae_psnr, "unet_final_loss": float(np.mean(losses[-50:])),
            "short_text_encoder_max_abs_diff": World(tmp).check_short_text_encoder(
                [synthetic.PHRASINGS[t]["heldout"][0] for t in synthetic.TASKS] + [""]),
            "seconds": seconds}
    (tmp / "hywu_demo_base.json").write_text(json.dumps(info, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info


def base_dir_for(models: Path, s: WorldSettings) -> Path:
    """Where the frozen base of settings ``s`` lives: models/demo/base for `make demo`'s own
    settings (trainer/configs/demo.yaml reads it there), models/demo/base-<settings key> for any
    other (--quick, --set): a quick or reduced run never replaces the base a full run built."""
    return models / "demo" / ("base" if s.key() == WorldSettings().key() else f"base-{s.key()}")


def world_is_current(out_dir: Path, s: WorldSettings) -> bool:
    f = out_dir / "hywu_demo_base.json"
    try:
        return json.loads(f.read_text()).get("settings_key") == s.key()
    except (OSError, ValueError):
        return False


# ------------------------------------------------------------------------------ the methods' LoRAs

class Method:
    """How a method gets its LoRA for a batch: static files (shared, per task) or the generator."""

    def __init__(self, name: str, lora: GeneratedLoRA | None = None, generator=None):
        self.name, self.lora, self.generator = name, lora, generator

    @torch.no_grad()
    def lora_for(self, data: Split, index) -> GeneratedLoRA | None:
        if self.name == "base":
            return None
        if self.name == "shared_lora":
            return self.lora
        if self.name == "per_task_lora":  # an oracle: it is told the task
            return GeneratedLoRA({k: (a[data.task_idx[index]], b[data.task_idx[index]])
                                  for k, (a, b) in self.lora.weights.items()}, self.lora.scale)
        return self.generator(condition(self.generator.condition_spec, data, index))


def condition(spec, data: Split, index) -> Condition:
    """The generator's condition for rows ``index`` of a split: the instruction's hidden states
    (and prompt mask when the spec asks for one) and the source latent in 2x2 patches."""
    text = spec["text"]
    masks = {"text": data.mask[index]} if text.padding_mask else {}
    patch = int(spec["image"].options.get("patch", 2))
    return Condition({"text": data.text[index], "image": patchify_latent(data.src_lat[index], patch)}, masks)


def load_methods(world: World, files: dict, tasks) -> dict[str, Method]:
    """Methods from the files the trainer wrote: ``files`` maps shared_lora -> one LoRA file,
    per_task_lora -> {task: LoRA file}, hywu -> the generator file."""
    from safetensors.torch import load_file

    from hywu_nodes.core import build_target_spec

    spec = build_target_spec(world.unet, "sd15_ip2p")
    methods = {"base": Method("base")}
    if "shared_lora" in files:
        methods["shared_lora"] = Method("shared_lora", from_lora_state_dict(load_file(str(files["shared_lora"])),
                                                                            "sd15_ip2p", spec).to(world.device))
    if "per_task_lora" in files:
        loras = [from_lora_state_dict(load_file(str(files["per_task_lora"][t])), "sd15_ip2p", spec) for t in tasks]
        stacked = {k: (torch.cat([lo.weights[k][0] for lo in loras]), torch.cat([lo.weights[k][1] for lo in loras]))
                   for k in loras[0].weights}
        methods["per_task_lora"] = Method("per_task_lora", GeneratedLoRA(stacked, loras[0].scale).to(world.device))
    if "hywu" in files:
        generator, _ = load_generator(files["hywu"], device=world.device)
        methods["hywu"] = Method("hywu", generator=generator)
    return methods


# ------------------------------------------------------------------------------ metrics

def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image PSNR (dB) of uint8 batches (N, H, W, 3); identical images count as 100 dB."""
    mse = ((a.astype(np.float64) - b.astype(np.float64)) ** 2).reshape(len(a), -1).mean(1)
    return np.where(mse == 0, 100.0, 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-12)))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image SSIM (Gaussian window 7, sigma 1.5, on each RGB channel, averaged)."""
    x = torch.from_numpy(np.array(a)).permute(0, 3, 1, 2).double()
    y = torch.from_numpy(np.array(b)).permute(0, 3, 1, 2).double()
    k = torch.exp(-0.5 * ((torch.arange(7) - 3) / 1.5) ** 2).double()
    k = k / k.sum()
    w = (k[:, None] * k[None, :]).expand(3, 1, 7, 7)
    f = lambda z: F.conv2d(z, w, groups=3)  # noqa: E731  (valid window)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.mean((1, 2, 3)).numpy()


def pair_accuracy(pred: np.ndarray, data) -> dict[str, float]:
    """Did the edit go the right way, whatever the blur? Per conflicting pair "a|b" present in
    ``data`` (anything with ``src``, ``tgt``, ``tasks``), over its images of tasks a and b: the share
    of outputs closer (PSNR) to their own target than to the partner task's target on the same
    source. A tie (the output as close to both) counts as wrong."""
    tasks = np.asarray(data.tasks, dtype=object)
    out = {}
    for a, b in synthetic.CONFLICT_PAIRS:
        idx = np.flatnonzero((tasks == a) | (tasks == b))
        if not len(idx):
            continue
        partner = np.stack([synthetic.apply_task(synthetic.CONFLICT_PARTNER[data.tasks[i]], data.src[i]) for i in idx])
        out[f"{a}|{b}"] = float(np.mean(psnr(pred[idx], data.tgt[idx]) > psnr(pred[idx], partner)))
    return out


def summarise(pred: np.ndarray, data: Split, tasks) -> dict:
    """PSNR / SSIM per task, on the conflicting tasks, on the others, and overall; the pair
    accuracy of each conflicting pair present (:func:`pair_accuracy`) and its minimum."""
    p, s = psnr(pred, data.tgt), ssim(pred, data.tgt)
    groups = {"conflicting": np.array([x in synthetic.CONFLICT_PARTNER for x in data.tasks])}
    groups["non_conflicting"] = ~groups["conflicting"]
    groups["overall"] = np.ones(len(p), dtype=bool)
    out = {"per_task": {}}
    for t in tasks:
        m = np.array([x == t for x in data.tasks])
        if m.any():
            out["per_task"][t] = {"psnr": float(p[m].mean()), "ssim": float(s[m].mean()), "n": int(m.sum())}
    for name, m in groups.items():
        if m.any():
            out[name] = {"psnr": float(p[m].mean()), "ssim": float(s[m].mean()), "n": int(m.sum())}
    out["pair_accuracy"] = pair_accuracy(pred, data)
    out["pair_accuracy_min"] = min(out["pair_accuracy"].values()) if out["pair_accuracy"] else None
    return out


@torch.no_grad()
def predict(world: World, data: Split, method: Method, steps: int, cfg: float, seed: int = 0,
            batch: int = 128) -> np.ndarray:
    """Sampled edits (N, H, W, 3) uint8; example i always uses noise seed seed * 100003 + i."""
    outs = []
    for i in range(0, len(data), batch):
        sl = slice(i, min(i + batch, len(data)))
        lora = method.lora_for(data, sl)
        seeds = [seed * 100003 + j for j in range(sl.start, sl.stop)]
        outs.append(world.decode(world.sample(data.src_lat[sl], data.text[sl], seeds, steps, cfg, lora)))
    return np.concatenate(outs)


def evaluate(world: World, splits: dict[str, Split], methods: dict[str, Method], tasks, steps: int, cfg: float,
             seed: int = 0, show: bool = True) -> tuple[dict, dict]:
    """metrics[split][method] (plus the "vae_ceiling" and "identity" rows) and the predictions."""
    metrics, preds = {}, {}
    for split, name in progress([(s, m) for s in splits for m in methods], desc="evaluate", enabled=show):
        data = splits[split]
        preds.setdefault(split, {})[name] = predict(world, data, methods[name], steps, cfg, seed)
        metrics.setdefault(split, {})[name] = summarise(preds[split][name], data, tasks)
    for split, data in splits.items():
        metrics[split]["vae_ceiling"] = summarise(world.decode(data.tgt_lat), data, tasks)  # decode(encode(target))
        metrics[split]["identity"] = summarise(data.src, data, tasks)  # "do nothing": the source itself
    return metrics, preds


def base_editor(world: World, n_per_task: int, steps: int, cfg: float, resolution: int = 32) -> dict:
    """Is the frozen base a real editor? The base alone on the tasks it was pretrained on
    (val images, train phrasings) against "no edit" and the VAE ceiling: PSNR dB (``overall``,
    ``per_task``) and SSIM (``ssim``, ``ssim_per_task``)."""
    tasks = list(synthetic.BASE_TASKS)
    data = {"val": make_split(world, "val", n_per_task * len(tasks), tasks, 0, resolution)}
    metrics, _ = evaluate(world, data, {"base": Method("base")}, tasks, steps, cfg, show=False)
    m = metrics["val"]
    return {"tasks": tasks, "n": len(data["val"]),
            **{k: {"overall": m[k]["overall"]["psnr"], "per_task": {t: v["psnr"] for t, v in m[k]["per_task"].items()},
                   "ssim": m[k]["overall"]["ssim"], "ssim_per_task": {t: v["ssim"] for t, v in m[k]["per_task"].items()}}
               for k in ("base", "identity", "vae_ceiling")}}


@torch.no_grad()
def task_separation(data: Split, method: Method, probes: int = 8, seed: int = 0) -> dict:
    """Does a method's LoRA depend on the request? Sketch each example's update dW = s B A of every
    layer by dW P (P: a fixed random d_in x ``probes`` matrix); eta^2 is the share of the sketches'
    variance the task label explains (0: one LoRA for all, 1: one per task), ``relative_spread``
    the size of the request-dependent part next to the mean update."""
    g = torch.Generator().manual_seed(seed)
    lora = method.lora_for(data, slice(0, len(data)))
    parts = []
    for a, b in lora.weights.values():
        if a.shape[0] == 1:
            a, b = a.expand(len(data), -1, -1), b.expand(len(data), -1, -1)
        p = torch.randn(a.shape[2], probes, generator=g).to(a) / math.sqrt(probes)
        parts.append((lora.scale * b @ (a @ p)).flatten(1))
    v = torch.cat(parts, 1).double()
    mean, total = v.mean(0), (v - v.mean(0)).pow(2).sum()
    labels = data.task_idx.tolist()
    between = sum(((v[[i for i, t in enumerate(labels) if t == k]].mean(0) - mean).pow(2).sum() * labels.count(k))
                  for k in set(labels))
    return {"eta2": float(between / total) if total > 0 else 0.0,
            "relative_spread": float((total / len(v)).sqrt() / mean.norm().clamp_min(1e-12))}


def text_clustering(world: World, tasks=synthetic.TASKS) -> dict:
    """How the base's text encoder groups instructions: each held-out sentence (masked mean of its
    hidden states) against the centroids of every task's training sentences. ``accuracy``: the
    share nearest to its own task; ``margin``: cosine to its own centroid minus the nearest other;
    ``pair_cosine``: cosine of the whole 77x768 condition of the first training sentences of a
    conflicting pair (what the frozen UNet and an unnormalised generator see)."""
    def embed(sentences):
        h, m = world.encode_text(sentences)
        m = m.float().unsqueeze(-1)
        return F.normalize((h * m).sum(1) / m.sum(1), dim=-1)

    centroids = F.normalize(torch.stack([embed(synthetic.PHRASINGS[t]["train"]).mean(0) for t in tasks]), dim=-1)
    hits, margins = [], []
    for i, t in enumerate(tasks):
        sims = embed(synthetic.PHRASINGS[t]["heldout"]) @ centroids.t()
        hits += (sims.argmax(1) == i).tolist()
        others = sims.clone()
        others[:, i] = -2
        margins += (sims[:, i] - others.max(1).values).tolist()
    pair = {}
    for a, b in synthetic.CONFLICT_PAIRS:
        ha = world.encode_text([synthetic.PHRASINGS[a]["train"][0]])[0]
        hb = world.encode_text([synthetic.PHRASINGS[b]["train"][0]])[0]
        pair[f"{a}|{b}"] = float(F.cosine_similarity(ha.flatten(), hb.flatten(), dim=0))
    return {"heldout_accuracy": float(np.mean(hits)), "heldout_margin": float(np.mean(margins)),
            "n_heldout": len(hits), "pair_cosine": pair}


def gradient_cosines(world: World, data: Split, shared: GeneratedLoRA, tasks, n: int = 32, seed: int = 0) -> dict:
    """Cosine between the shared LoRA's loss gradients for two tasks, per pair.

    Both gradients use the same n source images, noise and timesteps; only the task (target and
    instruction) differs, so the cosine isolates what the two tasks ask of one shared update.
    ``centred``: the same after removing the mean gradient over all tasks (the part every task
    shares, such as plain denoising)."""
    gen = torch.Generator().manual_seed(seed + 404)
    params = [p.detach().clone().requires_grad_(True) for ab in shared.weights.values() for p in ab]
    names = list(shared.weights)
    lora = GeneratedLoRA({k: (params[2 * i], params[2 * i + 1]) for i, k in enumerate(names)}, shared.scale)
    n = min(n, len(data))
    srcs = data.src[:n]
    src_lat = world.encode_images(srcs)
    t = torch.randint(0, 1000, (n,), generator=gen).to(world.device)
    noise = torch.randn(src_lat.shape, generator=gen).to(world.device)
    rng = np.random.default_rng(seed)
    grads = {}
    for task in tasks:
        tgt = np.stack([synthetic.apply_task(task, x) for x in srcs])
        text, _ = world.encode_text([synthetic.instruction_for(task, "train", rng) for _ in range(n)])
        batch = {"t": t, "noise": noise, "src_lat": src_lat, "tgt_lat": world.encode_images(tgt), "ctx": text}
        with torch.enable_grad(), lora_patched(world.unet, lora):
            g = torch.autograd.grad(world.diffusion_loss(batch), params)
        grads[task] = torch.cat([x.flatten() for x in g])
    mean = torch.stack(list(grads.values())).mean(0)
    out = {}
    for kind, g in (("raw", grads), ("centred", {k: v - mean for k, v in grads.items()})):
        pairs = {f"{a}|{b}": float(F.cosine_similarity(g[a], g[b], dim=0)) for i, a in enumerate(tasks) for b in tasks[i + 1:]}
        conflicting = {k: v for k, v in pairs.items() if synthetic.CONFLICT_PARTNER.get(k.split("|")[0]) == k.split("|")[1]}
        other = [v for k, v in pairs.items() if k not in conflicting]
        out[kind] = {"conflicting_pairs": conflicting, "mean_conflicting": float(np.mean(list(conflicting.values()))),
                     "mean_other_pairs": float(np.mean(other)) if other else None}
    return out


# ------------------------------------------------------------------------------ output

def grid_png(path: Path, data: Split, preds: dict, rows: list[int],
             columns=("base", "shared_lora", "per_task_lora", "hywu"), scale: int = 3) -> None:
    """Rows of: source | target | one column per method (labelled), upscaled for viewing."""
    from PIL import Image, ImageDraw

    r = data.src.shape[1] * scale
    labels = ["source", "target"] + [METHOD_NAMES.get(c, c).rstrip("*") for c in columns]
    head, left = 14, 190
    img = Image.new("RGB", (left + r * len(labels), head + r * len(rows)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for j, lab in enumerate(labels):
        d.text((left + j * r + 3, 2), lab, fill=(0, 0, 0))
    for i, k in enumerate(rows):
        y = head + i * r
        d.text((3, y + 3), data.tasks[k], fill=(0, 0, 0))
        line, yy = "", y + 16
        for w in data.instructions[k].split():  # wrap the instruction
            if len(line) + len(w) > 28:
                d.text((3, yy), line, fill=(90, 90, 90))
                line, yy = "", yy + 11
            line = (line + " " + w).strip()
        d.text((3, yy), line, fill=(90, 90, 90))
        for j, a in enumerate([data.src[k], data.tgt[k]] + [preds[c][k] for c in columns]):
            img.paste(Image.fromarray(a).resize((r, r), Image.NEAREST), (left + j * r, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def _short(c: str) -> str:
    return (c.replace("shift_", "sh_").replace("brighten", "bright").replace("grayscale", "gray")
            .replace("hue_forward", "hue_fw").replace("hue_backward", "hue_bw").replace("non_conflicting", "other")
            .replace("conflicting", "conflict"))


def _pair_label(pair: str) -> str:
    """"shift_left|shift_right" -> "sh_left/right": the second name without the shared prefix."""
    a, b = (_short(x) for x in pair.split("|"))
    prefix = a.split("_")[0] + "_"
    return f"{a}/{b[len(prefix):]}" if "_" in a and b.startswith(prefix) else f"{a}/{b}"


def format_table(metrics: dict, tasks, methods=METHODS, splits=SPLITS) -> str:
    """Per split: the PSNR table (per task, conflicting, other, overall), then per method the pair
    accuracy of each conflicting pair and its minimum, and SSIM on conflicting / other / overall."""
    lines = []
    for split, per in metrics.items():
        if split not in splits:
            continue
        cols = list(tasks) + ["conflicting", "non_conflicting", "overall"]
        short = {c: _short(c) for c in cols}
        lines.append(f"PSNR dB to the exact target -- split '{split}' ({per['base']['overall']['n']} images)")
        lines.append(f"{'method':16s}" + "".join(f"{short[c]:>9s}" for c in cols))
        for m in list(methods) + ["vae_ceiling", "identity"]:
            if m not in per:
                continue
            row = per[m]
            cells = [row["per_task"].get(c) or row.get(c) for c in cols]
            lines.append(f"{METHOD_NAMES.get(m, m):16s}" + "".join(f"{v['psnr']:9.2f}" if v else f"{'-':>9s}" for v in cells))
        lines.append("")
        pairs = [f"{a}|{b}" for a, b in synthetic.CONFLICT_PAIRS if f"{a}|{b}" in per["base"].get("pair_accuracy", {})]
        if pairs:
            lines.append(f"Pair accuracy (% of the pair's edits closer to their own target than to the partner's) "
                         f"and SSIM to the target -- split '{split}'")
            lines.append(f"{'method':16s}" + "".join(f"{_pair_label(q):>14s}" for q in pairs) + f"{'min':>6s}"
                         + "  | SSIM" + "".join(f"{x:>9s}" for x in ("conflict", "other", "overall")))
            for m in list(methods) + ["vae_ceiling", "identity"]:
                if m not in per:
                    continue
                row = per[m]
                acc = row.get("pair_accuracy", {})
                lines.append(f"{METHOD_NAMES.get(m, m):16s}"
                             + "".join(f"{100 * acc[q]:13.0f}%" if q in acc else f"{'-':>14s}" for q in pairs)
                             + (f"{100 * row['pair_accuracy_min']:5.0f}%" if acc else f"{'-':>6s}") + "  |     "
                             + "".join(f"{row[g]['ssim']:9.3f}" if g in row else f"{'-':>9s}"
                                       for g in ("conflicting", "non_conflicting", "overall")))
            lines.append("")
    lines.append("* per-task LoRA is an oracle: it is told the task label; HY-WU and the shared LoRA are not.")
    return "\n".join(lines)


def format_cosines(gc: dict) -> str:
    out = ["Gradient cosine of the shared LoRA between tasks (same images and noise, only the task differs):"]
    for when, g in gc.items():
        for kind in ("raw", "centred"):
            blk = g[kind]
            pairs = ", ".join(f"{k.replace('|', '/')} {v:+.2f}" for k, v in blk["conflicting_pairs"].items())
            out.append(f"  {when:>7s} {kind:>7s}: conflicting pairs {blk['mean_conflicting']:+.3f} ({pairs}); "
                       f"other pairs {blk['mean_other_pairs']:+.3f}")
    return "\n".join(out)
