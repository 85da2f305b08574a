"""Machinery of the miniature HY-WU world, shared by ``scripts/demo.py`` (``make demo``),
``bench/conflict.py`` and ``tests/test_demo.py``.

Everything runs on the micro SD1.5-InstructPix2Pix base (scripts/build_micro_base.py) at a small
resolution on a CPU in minutes:

* :func:`pretrain_base` turns the seeded random micro base into a usable but imperfect editor of
  the synthetic world (trainer/synthetic.py): the TAESD-shaped VAE is trained as an
  autoencoder on the world's images, then the UNet as an ordinary InstructPix2Pix model on all
  demo tasks (CLIP stays at its seeded random weights: it only has to tell words apart).
  After this the base is frozen.
* :func:`train_method` fits one of three adapters on the frozen base with the same budget (same
  steps, batch, data stream, noise, targets, LoRA rank and layers):
  ``shared_lora`` (one LoRA for every request), ``per_task_lora`` (one LoRA per task; an oracle
  that is told the task label) and ``hywu`` (the generator writes a LoRA per request from the
  instruction and source image).
* :func:`evaluate` samples edits with a fixed few-step sampler that is the one ComfyUI's
  KSampler runs for ``euler`` / ``simple`` (text CFG as ComfyUI applies it to IP2P models) and
  scores PSNR / SSIM against the exact targets, per task and overall.
* :func:`gradient_cosines` measures how the shared LoRA's gradients for conflicting tasks align.

Conventions are those of the core and the infra notes: diffusers AutoencoderTiny latents are
what the UNet sees (ComfyUI latent * 0.18215), images are [-1, 1] for the VAE, the text
condition is CLIP's last hidden state on ids padded to 77 with the end token, the generator's
image condition is the source latent cut into 2x2 patches.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "scripts")):
    if _p not in sys.path:
        sys.path.insert(0, _p)

from hywu_nodes.core import (Condition, GeneratedLoRA, GeneratorConfig, HYWUGenerator,  # noqa: E402
                             build_target_spec, lora_patched, patchify_latent, save_generator,
                             standard_condition_spec)
from trainer import synthetic  # noqa: E402

# Three conflicting pairs that a 4x4-latent micro model can express, plus one task without a
# partner. (bench/conflict.py can run any subset of synthetic.TASKS.)
DEMO_TASKS = ("brighten", "darken", "shift_left", "shift_right", "red_to_blue", "blue_to_red", "grayscale")
METHODS = ("base", "shared_lora", "per_task_lora", "hywu")
SPLITS = ("val", "heldout_phrasing")


def log(msg: str) -> None:
    print(msg, flush=True)


def progress(iterable=None, total=None, desc=None, enabled=True):
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, dynamic_ncols=True,
                mininterval=1.0, file=sys.stdout)


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass
class DemoSettings:
    """Every knob of the miniature world; stages are cached under a hash of the knobs they read."""

    resolution: int = 32
    tasks: tuple = DEMO_TASKS
    seed: int = 0
    n_train: int = 1050                 # training examples (tasks cycle through them)
    # base pretraining (VAE autoencoder, then IP2P UNet)
    vae_steps: int = 500
    vae_batch: int = 8
    vae_lr: float = 2e-3
    base_steps: int = 500
    base_batch: int = 16
    base_lr: float = 5e-4
    # adapters (same budget for all three methods)
    steps: int = 250
    batch: int = 16
    lr: float = 1e-3
    rank: int = 8
    alpha: float = 8.0
    generator_preset: str = "tiny"
    token_width: int = 64               # generator token width (preset tiny has 16: 4x the tokens)
    drop_text: float = 0.1              # CFG dropout of the base's text condition in training
    focus_timesteps: float = 0.8        # share of training steps on the sampler's own timesteps
    # sampling / evaluation
    sample_steps: int = 4
    cfg: float = 1.0
    n_eval_per_task: int = 8
    device: str = "auto"
    ip2p_concat: str = "unscaled"       # convention of the IP2P image channels (see IP2P_CONCAT_SCALE)

    def key(self, *names: str) -> str:
        d = asdict(self)
        d = {k: d[k] for k in names} if names else d
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=list).encode()).hexdigest()[:12]

    VAE_KEYS = ("resolution", "tasks", "seed", "n_train", "vae_steps", "vae_batch", "vae_lr")
    BASE_KEYS = VAE_KEYS + ("ip2p_concat", "base_steps", "base_batch", "base_lr", "drop_text", "focus_timesteps", "sample_steps")
    METHOD_KEYS = BASE_KEYS + ("steps", "batch", "lr", "rank", "alpha")
    GENERATOR_KEYS = METHOD_KEYS + ("generator_preset", "token_width")

    def method_key(self, method: str) -> str:
        return self.key(*(self.GENERATOR_KEYS if method == "hywu" else self.METHOD_KEYS))


# ------------------------------------------------------------------------------ the micro world

class MicroWorld:
    """The frozen pieces of a micro IP2P base folder plus helpers (text / image encoding, decoding)."""

    def __init__(self, base_dir: str | os.PathLike, device: torch.device, load_text_encoder: bool = True):
        from diffusers import AutoencoderTiny, UNet2DConditionModel
        from transformers import CLIPTokenizer

        self.base_dir = Path(base_dir)
        self.device = device
        self.unet = UNet2DConditionModel.from_pretrained(self.base_dir, subfolder="unet").to(device)
        self.vae = AutoencoderTiny.from_pretrained(self.base_dir, subfolder="vae").to(device)
        self.tokenizer = CLIPTokenizer.from_pretrained(self.base_dir / "tokenizer")
        self.text_encoder = None
        self._text_cache: dict[str, torch.Tensor] = {}
        if load_text_encoder:
            self._load_text_encoder()
        for m in (self.unet, self.vae):
            m.requires_grad_(False).eval()
        sched = json.loads((self.base_dir / "scheduler" / "scheduler_config.json").read_text())
        betas = torch.linspace(sched["beta_start"] ** 0.5, sched["beta_end"] ** 0.5, sched["num_train_timesteps"],
                               dtype=torch.float64) ** 2
        self.alphas_cumprod = torch.cumprod(1 - betas, 0).float()  # (1000,)

    def _load_text_encoder(self):
        from transformers import CLIPTextModel

        if self.text_encoder is None:
            self.text_encoder = CLIPTextModel.from_pretrained(self.base_dir, subfolder="text_encoder").to(self.device)
            self.text_encoder.requires_grad_(False).eval()

    @torch.no_grad()
    def encode_text(self, prompts: list[str], batch: int = 32) -> torch.Tensor:
        """(B, 77, 768) last hidden states (after final norm), ids padded to 77 with EOS like ComfyUI."""
        todo = sorted({p for p in prompts if p not in self._text_cache})
        if todo:
            self._load_text_encoder()
            for i in range(0, len(todo), batch):
                chunk = todo[i:i + batch]
                ids = self.tokenizer(chunk, padding="max_length", max_length=77, truncation=True,
                                     return_tensors="pt").input_ids.to(self.device)
                hs = self.text_encoder(ids).last_hidden_state.float()
                for p, h in zip(chunk, hs):
                    self._text_cache[p] = h
        return torch.stack([self._text_cache[p] for p in prompts])

    def text_cache_state(self) -> dict:
        return {k: v.cpu() for k, v in self._text_cache.items()}

    def load_text_cache(self, state: dict) -> None:
        self._text_cache.update({k: v.to(self.device) for k, v in state.items()})

    @torch.no_grad()
    def encode_images(self, images_u8: np.ndarray, batch: int = 64) -> torch.Tensor:
        """(N, H, W, 3) uint8 -> (N, 4, H/8, W/8) latents in the UNet's space."""
        out = []
        for i in range(0, len(images_u8), batch):
            x = torch.from_numpy(images_u8[i:i + batch]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
            out.append(self.vae.encode(x).latents.float())
        return torch.cat(out)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 64) -> np.ndarray:
        """Latents -> (N, H, W, 3) uint8."""
        out = []
        for i in range(0, len(latents), batch):
            x = self.vae.decode(latents[i:i + batch].to(self.device)).sample
            out.append(((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy())
        return np.concatenate(out)

    def target_spec(self):
        return build_target_spec(self.unet, "sd15_ip2p")

    def condition_spec(self, resolution: int):
        return standard_condition_spec(768, 77, 4, resolution, patch=2)

    def condition(self, text_emb: torch.Tensor, src_latents: torch.Tensor) -> Condition:
        return Condition({"text": text_emb, "image": patchify_latent(src_latents, 2)})


# ------------------------------------------------------------------------------ data

@dataclass
class EncodedSplit:
    """One split of the synthetic world, encoded once: latents, text embeddings, labels."""

    name: str
    src: np.ndarray          # (N, H, W, 3) uint8 source images
    tgt: np.ndarray          # (N, H, W, 3) uint8 exact targets
    instructions: list
    tasks: list
    task_idx: torch.Tensor   # (N,) index into settings.tasks
    src_lat: torch.Tensor | None = None
    tgt_lat: torch.Tensor | None = None
    text: torch.Tensor | None = None   # (N, 77, 768)

    def __len__(self):
        return len(self.tasks)


def make_split(split: str, n: int, settings: DemoSettings) -> EncodedSplit:
    ex = synthetic.make_examples(split, n, seed=settings.seed, resolution=settings.resolution, tasks=settings.tasks)
    return EncodedSplit(
        name=split,
        src=np.stack([np.asarray(e.source) for e in ex]),
        tgt=np.stack([np.asarray(e.target) for e in ex]),
        instructions=[e.instruction for e in ex],
        tasks=[e.task for e in ex],
        task_idx=torch.tensor([settings.tasks.index(e.task) for e in ex]),
    )


def encode_split(world: MicroWorld, data: EncodedSplit) -> EncodedSplit:
    data.src_lat = world.encode_images(data.src)
    data.tgt_lat = world.encode_images(data.tgt)
    data.text = world.encode_text(data.instructions)
    return data


# ------------------------------------------------------------------------------ diffusion

# The InstructPix2Pix image channels get the *unscaled* source latent (diffusers' IP2P pipeline
# uses vae.encode(image) without the scaling factor; ComfyUI 0.3.75 feeds SD15_instructpix2pix
# the raw VAE latent, no process_in). The micro base's VAE latents are already in the UNet's
# scaled space (ComfyUI latent * 0.18215), so the unscaled latent is latent / 0.18215.
IP2P_CONCAT_SCALE = 1 / 0.18215


def sampler_timesteps(steps: int) -> list[int]:
    """Timesteps of ComfyUI's "simple" scheduler for an SD1.5 (1000-step) model."""
    ss = 1000 / steps
    return [999 - int(i * ss) for i in range(steps)]


def sample_timesteps(n: int, settings: DemoSettings, gen: torch.Generator) -> torch.Tensor:
    focus = torch.tensor(sampler_timesteps(settings.sample_steps))
    t_focus = focus[torch.randint(len(focus), (n,), generator=gen)]
    t_unif = torch.randint(0, 1000, (n,), generator=gen)
    use = torch.rand(n, generator=gen) < settings.focus_timesteps
    return torch.where(use, t_focus, t_unif)


def diffusion_loss(world: MicroWorld, unet: nn.Module, batch: dict, per_sample: bool = False) -> torch.Tensor:
    """IP2P epsilon loss: unet(cat[z_t, source latent], t, text) vs the noise."""
    ac = world.alphas_cumprod.to(batch["tgt_lat"].device)[batch["t"]].view(-1, 1, 1, 1)
    z_t = ac.sqrt() * batch["tgt_lat"] + (1 - ac).sqrt() * batch["noise"]
    pred = unet(torch.cat([z_t, batch["src_lat"] * IP2P_CONCAT_SCALE], 1), batch["t"], batch["ctx"]).sample
    err = (pred.float() - batch["noise"]).pow(2)
    return err.flatten(1).mean(1) if per_sample else err.mean()


class BatchMaker:
    """Deterministic random batches from an encoded split (same stream for every method)."""

    def __init__(self, data: EncodedSplit, world: MicroWorld, settings: DemoSettings, batch: int, seed: int):
        self.data, self.world, self.s, self.batch = data, world, settings, batch
        self.gen = torch.Generator().manual_seed(seed)
        self.empty = world.encode_text([""])[0]

    def __call__(self) -> dict:
        d, dev = self.data, self.world.device
        idx = torch.randint(len(d), (self.batch,), generator=self.gen)
        t = sample_timesteps(self.batch, self.s, self.gen)
        noise = torch.randn(d.tgt_lat[idx].shape, generator=self.gen)
        drop = torch.rand(self.batch, generator=self.gen) < self.s.drop_text
        text = d.text[idx]
        ctx = torch.where(drop.view(-1, 1, 1).to(text.device), self.empty.expand_as(text), text)
        return {"idx": idx, "t": t.to(dev), "noise": noise.to(dev), "src_lat": d.src_lat[idx],
                "tgt_lat": d.tgt_lat[idx], "ctx": ctx, "text": text, "task_idx": d.task_idx[idx].to(dev)}


@torch.no_grad()
def sample(world: MicroWorld, src_lat: torch.Tensor, text: torch.Tensor, seeds: list[int], settings: DemoSettings,
           lora: GeneratedLoRA | None = None) -> torch.Tensor:
    """ComfyUI KSampler(euler, simple, steps, cfg) on an IP2P model, in diffusers terms.

    x = sigma_max-scaled noise; for each sigma: eps = uncond + cfg * (cond - uncond) with the
    source latent concatenated to both; x <- x + (sigma_next - sigma) * eps. ``lora`` (one per
    sample) patches both CFG passes, as HY-WU Apply does in ComfyUI.
    """
    dev = world.device
    ac = world.alphas_cumprod
    ts = sampler_timesteps(settings.sample_steps)
    sigmas = [((1 - ac[t]) / ac[t]).sqrt().item() for t in ts] + [0.0]
    b = src_lat.shape[0]
    concat = src_lat * IP2P_CONCAT_SCALE
    noise = torch.stack([torch.randn(src_lat.shape[1:], generator=torch.Generator().manual_seed(int(s))) for s in seeds]).to(dev)
    x = noise * math.sqrt(1 + sigmas[0] ** 2)
    use_cfg = settings.cfg != 1.0
    empty = world.encode_text([""]).expand(b, -1, -1)
    for i, t in enumerate(ts):
        sig = sigmas[i]
        x_in = x / math.sqrt(1 + sig ** 2)
        tt = torch.full((b,), t, device=dev)
        if use_cfg:
            model_in = torch.cat([torch.cat([x_in, concat], 1)] * 2)
            ctx = torch.cat([text, empty])
            sample_to_lora = None if lora is None else torch.arange(2 * b, device=dev) % b
            with _maybe_lora(world.unet, lora, sample_to_lora):
                eps = world.unet(model_in, torch.cat([tt, tt]), ctx).sample
            eps_c, eps_u = eps.chunk(2)
            eps = eps_u + settings.cfg * (eps_c - eps_u)
        else:
            with _maybe_lora(world.unet, lora, None):
                eps = world.unet(torch.cat([x_in, concat], 1), tt, text).sample
        x = x + (sigmas[i + 1] - sig) * eps
    return x


class _maybe_lora:
    def __init__(self, model, lora, sample_to_lora):
        self.cm = lora_patched(model, lora, sample_to_lora=sample_to_lora) if lora is not None else None

    def __enter__(self):
        return self.cm.__enter__() if self.cm is not None else None

    def __exit__(self, *exc):
        return self.cm.__exit__(*exc) if self.cm is not None else False


# ------------------------------------------------------------------------------ base pretraining

def _cosine_lr(step: int, total: int, base: float, warmup: int = 20) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    p = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))


def train_vae(world: MicroWorld, images_u8: np.ndarray, settings: DemoSettings, show=True) -> list[float]:
    """Autoencoder training of the TAESD-shaped VAE on the world's images (L1 + MSE, with a
    penalty keeping the latent per-channel mean ~0 and std ~1, the scale the UNet expects)."""
    vae, dev = world.vae, world.device
    vae.requires_grad_(True).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=settings.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(settings.seed + 101)
    losses = []
    bar = progress(range(settings.vae_steps), desc="VAE (autoencoder)", enabled=show)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, settings.vae_steps, settings.vae_lr)
        idx = torch.randint(len(images_u8), (settings.vae_batch,), generator=gen).numpy()
        x = torch.from_numpy(images_u8[idx]).to(dev).permute(0, 3, 1, 2).float() / 127.5 - 1
        z = vae.encoder(x)
        y = vae.decoder(z)
        rec = (y - x).abs().mean() + (y - x).pow(2).mean()
        zm, zs = z.mean((0, 2, 3)), z.std((0, 2, 3))
        reg = zm.pow(2).mean() + (zs - 1).pow(2).mean()
        loss = rec + 0.1 * reg
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        losses.append(rec.item())
        if step % 10 == 0:
            bar.set_postfix(rec=f"{np.mean(losses[-10:]):.4f}", zstd=f"{zs.mean().item():.2f}")
    vae.requires_grad_(False).eval()
    return losses


def train_base_unet(world: MicroWorld, data: EncodedSplit, settings: DemoSettings, show=True) -> list[float]:
    """Ordinary InstructPix2Pix fine-tune of the whole UNet on every demo task."""
    unet = world.unet
    unet.requires_grad_(True).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=settings.base_lr, weight_decay=0.0)
    batches = BatchMaker(data, world, settings, settings.base_batch, settings.seed + 202)
    losses = []
    bar = progress(range(settings.base_steps), desc="base UNet (IP2P pretrain)", enabled=show)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, settings.base_steps, settings.base_lr)
        loss = diffusion_loss(world, unet, batches())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    unet.requires_grad_(False).eval()
    return losses


def pretrain_base(micro_dir: Path, out_dir: Path, settings: DemoSettings, show=True) -> dict:
    """Copy the seeded micro base to ``out_dir`` and train its VAE and UNet on the world."""
    dev = pick_device(settings.device)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(micro_dir, tmp)
    world = MicroWorld(tmp, dev)
    t0 = time.time()
    train = make_split("train", settings.n_train, settings)
    pool = np.concatenate([train.src, train.tgt])
    vae_losses = train_vae(world, pool, settings, show)
    t_vae = time.time() - t0
    world.vae.save_pretrained(tmp / "vae", safe_serialization=True)
    # every phrasing of the demo tasks (train and held-out) and the empty prompt, once
    world.encode_text([""] + [p for t in settings.tasks for k in ("train", "heldout")
                              for p in synthetic.PHRASINGS[t][k]])
    encode_split(world, train)
    save_file({"src_lat": train.src_lat.cpu().contiguous(), "tgt_lat": train.tgt_lat.cpu().contiguous(),
               "text": train.text.cpu().contiguous()}, str(tmp / "train_encoded.safetensors"))
    base_losses = train_base_unet(world, train, settings, show)
    world.unet.save_pretrained(tmp / "unet", safe_serialization=True)
    info = {
        "builder": "scripts/demo.py (demo_core.pretrain_base)",
        "from": str(micro_dir),
        "settings_key": settings.key(*DemoSettings.BASE_KEYS),
        "settings": {k: getattr(settings, k) for k in DemoSettings.BASE_KEYS},
        "vae_final_loss": float(np.mean(vae_losses[-20:])),
        "unet_final_loss": float(np.mean(base_losses[-20:])),
        "seconds": {"vae": round(t_vae, 1), "unet": round(time.time() - t0 - t_vae, 1)},
    }
    (tmp / "hywu_demo_base.json").write_text(json.dumps(info, indent=2, default=list))
    save_file({k: v.contiguous() for k, v in world.text_cache_state().items()}, str(tmp / "text_cache.safetensors"))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return info


def base_is_current(out_dir: Path, settings: DemoSettings) -> bool:
    f = out_dir / "hywu_demo_base.json"
    if not f.is_file() or not (out_dir / "unet" / "diffusion_pytorch_model.safetensors").is_file():
        return False
    try:
        return json.loads(f.read_text()).get("settings_key") == settings.key(*DemoSettings.BASE_KEYS)
    except ValueError:
        return False


def load_world(base_dir: Path, settings: DemoSettings) -> MicroWorld:
    world = MicroWorld(base_dir, pick_device(settings.device), load_text_encoder=False)
    cache = base_dir / "text_cache.safetensors"
    if cache.is_file():
        world.load_text_cache(load_file(str(cache)))
    return world


# ------------------------------------------------------------------------------ adapters

class StaticLoRA(nn.Module):
    """``n`` plain trainable LoRAs on the target layers (n=1: shared; n=tasks: per task)."""

    def __init__(self, target_spec, n: int, rank: int, alpha: float, seed: int):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.names = target_spec.names
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for t in target_spec.targets:
            bound = 1 / math.sqrt(t.d_in)  # kaiming-uniform(a=sqrt 5) bound, as peft/kohya
            self.a.append(nn.Parameter((torch.rand(n, rank, t.d_in, generator=g) * 2 - 1) * bound))
            self.b.append(nn.Parameter(torch.zeros(n, t.d_out, rank)))
        self.scale = alpha / rank
        self.n = n

    def lora(self, index: torch.Tensor | None = None) -> GeneratedLoRA:
        """All n LoRAs, or one per sample picked by ``index``."""
        w = {}
        for name, a, b in zip(self.names, self.a, self.b):
            w[name] = (a, b) if index is None else (a[index], b[index])
        return GeneratedLoRA(w, self.scale)


class Adapter(nn.Module):
    """A method's way to get one LoRA per sample: shared, per task (oracle), or generated."""

    def __init__(self, method: str, world: MicroWorld, settings: DemoSettings, seed: int = 0):
        super().__init__()
        self.method = method
        spec = world.target_spec()
        if method == "shared_lora":
            self.static = StaticLoRA(spec, 1, settings.rank, settings.alpha, seed)
        elif method == "per_task_lora":
            self.static = StaticLoRA(spec, len(settings.tasks), settings.rank, settings.alpha, seed)
        elif method == "hywu":
            torch.manual_seed(seed)
            cfg = GeneratorConfig.from_preset(settings.generator_preset, rank=settings.rank, alpha=settings.alpha,
                                              token_width=settings.token_width)
            self.generator = HYWUGenerator(cfg, spec, world.condition_spec(settings.resolution))
        else:
            raise ValueError(method)
        self.to(world.device)

    def lora_for(self, world: MicroWorld, text: torch.Tensor, src_lat: torch.Tensor, task_idx: torch.Tensor) -> GeneratedLoRA:
        if self.method == "shared_lora":
            return self.static.lora()
        if self.method == "per_task_lora":
            return self.static.lora(task_idx)
        return self.generator.generate(world.condition(text, src_lat))


def train_method(method: str, world: MicroWorld, data: EncodedSplit, settings: DemoSettings, seed: int = 0,
                 show=True, steps: int | None = None) -> tuple[Adapter, list[float]]:
    """Fit ``method`` on the frozen base. Every method sees the same batches, noise and timesteps."""
    adapter = Adapter(method, world, settings, seed)
    opt = torch.optim.AdamW(adapter.parameters(), lr=settings.lr, weight_decay=0.0)
    batches = BatchMaker(data, world, settings, settings.batch, settings.seed + 303 + 7919 * seed)
    steps = settings.steps if steps is None else steps
    losses = []
    adapter.train()
    bar = progress(range(steps), desc=f"{method}", enabled=show)
    for step in bar:
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, settings.lr, warmup=10)
        bt = batches()
        lora = adapter.lora_for(world, bt["text"], bt["src_lat"], bt["task_idx"])
        with lora_patched(world.unet, lora):
            loss = diffusion_loss(world, world.unet, bt)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}")
    adapter.eval()
    return adapter, losses


def save_adapter(adapter: Adapter, path: Path, settings: DemoSettings, extra: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {"settings_key": settings.method_key(adapter.method), "method": adapter.method}
    meta.update(extra or {})
    if adapter.method == "hywu":
        save_generator(path, adapter.generator, extra=meta)
        return
    tensors = {k: v.detach().cpu().contiguous() for k, v in adapter.state_dict().items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata={k: json.dumps(v) for k, v in meta.items()})
    os.replace(tmp, path)


def generator_adapter(path: Path, device: torch.device) -> Adapter:
    """An Adapter around any HY-WU generator file (e.g. one written by `python -m trainer.train`)."""
    from hywu_nodes.core import load_generator

    gen, _ = load_generator(path, device=device)
    ad = Adapter.__new__(Adapter)
    nn.Module.__init__(ad)
    ad.method, ad.generator = "hywu", gen
    return ad.eval()


def load_adapter(method: str, path: Path, world: MicroWorld, settings: DemoSettings) -> Adapter | None:
    """The cached adapter if it was trained with the current settings, else None."""
    if not path.is_file():
        return None
    key = settings.method_key(method)
    try:
        if method == "hywu":
            from hywu_nodes.core import read_generator_info

            if read_generator_info(path).extra.get("settings_key") != key:
                return None
            return generator_adapter(path, world.device)
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if json.loads(meta.get("settings_key", "null")) != key:
            return None
        ad = Adapter(method, world, settings)
        ad.load_state_dict(load_file(str(path)))
        return ad.to(world.device).eval()
    except Exception as e:  # stale or foreign file: retrain
        log(f"  (ignoring cached {path.name}: {e})")
        return None


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
    k = (k / k.sum())
    w = (k[:, None] * k[None, :]).expand(3, 1, 7, 7)
    f = lambda z: F.conv2d(z, w, groups=3)  # noqa: E731  (valid window)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = f(x), f(y)
    sxx, syy, sxy = f(x * x) - mx * mx, f(y * y) - my * my, f(x * y) - mx * my
    m = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx * mx + my * my + c1) * (sxx + syy + c2))
    return m.mean((1, 2, 3)).numpy()


def summarise(pred: np.ndarray, data: EncodedSplit, tasks) -> dict:
    p, s = psnr(pred, data.tgt), ssim(pred, data.tgt)
    per_task = {}
    for t in tasks:
        m = np.array([x == t for x in data.tasks])
        if m.any():
            per_task[t] = {"psnr": float(p[m].mean()), "ssim": float(s[m].mean()), "n": int(m.sum())}
    conflicting = np.array([x in synthetic.CONFLICT_PARTNER for x in data.tasks])
    out = {"per_task": per_task, "overall": {"psnr": float(p.mean()), "ssim": float(s.mean()), "n": len(p)}}
    if conflicting.any():
        out["conflicting"] = {"psnr": float(p[conflicting].mean()), "ssim": float(s[conflicting].mean()),
                              "n": int(conflicting.sum())}
    return out


@torch.no_grad()
def predict(world: MicroWorld, data: EncodedSplit, settings: DemoSettings, adapter: Adapter | None,
            batch: int = 64) -> np.ndarray:
    """Sampled edits (N, H, W, 3) uint8; example i always uses noise seed settings.seed*100003 + i."""
    outs = []
    for i in range(0, len(data), batch):
        sl = slice(i, i + batch)
        src, text, tidx = data.src_lat[sl], data.text[sl], data.task_idx[sl].to(world.device)
        lora = None if adapter is None else adapter.lora_for(world, text, src, tidx)
        seeds = [settings.seed * 100003 + j for j in range(i, i + len(src))]
        outs.append(world.decode(sample(world, src, text, seeds, settings, lora)))
    return np.concatenate(outs)


def evaluate(world: MicroWorld, splits: dict[str, EncodedSplit], adapters: dict[str, Adapter | None],
             settings: DemoSettings, show=True) -> tuple[dict, dict]:
    """Metrics[split][method] and the predictions (for the grid) of every method."""
    metrics, preds = {}, {}
    items = [(s, m) for s in splits for m in adapters]
    for split, method in progress(items, desc="evaluate", enabled=show):
        data = splits[split]
        pred = predict(world, data, settings, adapters[method])
        preds.setdefault(split, {})[method] = pred
        metrics.setdefault(split, {})[method] = summarise(pred, data, settings.tasks)
    for split, data in splits.items():  # what the VAE alone allows: decode(encode(target))
        rec = world.decode(data.tgt_lat)
        metrics[split]["vae_ceiling"] = summarise(rec, data, settings.tasks)
        src_as_pred = summarise(data.src, data, settings.tasks)  # "do nothing" reference
        metrics[split]["identity"] = src_as_pred
    return metrics, preds


@torch.no_grad()
def task_separation(world: MicroWorld, data: EncodedSplit, adapter: Adapter, probes: int = 8, seed: int = 0) -> dict:
    """Does the generator use the instruction? For every example, sketch its generated update
    dW = scale * B @ A of each layer by dW @ P (P: a fixed random d_in x ``probes`` matrix), and
    report eta^2 = the share of the sketches' variance explained by the task label (0: one LoRA
    for all, like a shared LoRA; 1: one LoRA per task, like the per-task oracle), and how large
    the request-dependent part is relative to the mean update."""
    g = torch.Generator().manual_seed(seed)
    lora = adapter.lora_for(world, data.text, data.src_lat, data.task_idx.to(world.device))
    parts = []
    for name, (a, b) in lora.weights.items():
        p = torch.randn(a.shape[2], probes, generator=g).to(a) / math.sqrt(probes)
        parts.append((lora.scale * b @ (a @ p)).flatten(1))
    v = torch.cat(parts, 1).double()
    if v.shape[0] < 2:
        return {"eta2": 0.0, "relative_spread": 0.0}
    mean = v.mean(0)
    total = (v - mean).pow(2).sum()
    labels = data.task_idx.tolist()
    between = sum(((v[[i for i, t in enumerate(labels) if t == k]].mean(0) - mean).pow(2).sum()
                   * labels.count(k)) for k in set(labels))
    return {"eta2": float(between / total) if total > 0 else 0.0,
            "relative_spread": float((total / len(v)).sqrt() / mean.norm().clamp_min(1e-12))}


# ------------------------------------------------------------------------------ gradient conflict

def _flat_grad(params) -> torch.Tensor:
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])


def gradient_cosines(world: MicroWorld, data: EncodedSplit, settings: DemoSettings, shared: Adapter,
                     n: int = 32, seed: int = 0) -> dict:
    """Cosine between the shared LoRA's loss gradients for task a and task b.

    Both batches use the same n source images, noise and timesteps; only the task (target and
    instruction) differs, so the cosine isolates what the tasks ask of the shared update.
    Conflicting pairs (synthetic.CONFLICT_PAIRS) vs every other pair of demo tasks. ``centred``:
    the same after subtracting the mean gradient over all demo tasks (the part every task
    shares, e.g. plain denoising), i.e. how the tasks pull the shared update away from the
    common direction.
    """
    gen = torch.Generator().manual_seed(seed + 404)
    tasks = list(settings.tasks)
    # source images: the first n val images; per task exact targets + a train phrasing
    n = min(n, len(data))
    srcs = data.src[:n]
    ex_lat = world.encode_images(srcs)
    t = sample_timesteps(n, settings, gen).to(world.device)
    noise = torch.randn(ex_lat.shape, generator=gen).to(world.device)
    rng = np.random.default_rng(seed)
    grads = {}
    params = list(shared.parameters())
    for task in tasks:
        tgt = np.stack([synthetic.apply_task(task, s) for s in srcs])
        instr = [synthetic.instruction_for(task, "train", rng) for _ in range(n)]
        bt = {"t": t, "noise": noise, "src_lat": ex_lat, "tgt_lat": world.encode_images(tgt),
              "ctx": world.encode_text(instr)}
        for p in params:
            p.grad = None
        with torch.enable_grad(), lora_patched(world.unet, shared.static.lora()):
            diffusion_loss(world, world.unet, bt).backward()
        grads[task] = _flat_grad(params).clone()
    for p in params:
        p.grad = None
    mean_grad = torch.stack([grads[t] for t in tasks]).mean(0)
    res = {"n_images": n}
    for kind in ("raw", "centred"):
        g = grads if kind == "raw" else {t: grads[t] - mean_grad for t in tasks}
        pairs = {}
        for i, a in enumerate(tasks):
            for b in tasks[i + 1:]:
                pairs[f"{a}|{b}"] = float(F.cosine_similarity(g[a], g[b], dim=0))
        conf = {k: v for k, v in pairs.items() if synthetic.CONFLICT_PARTNER.get(k.split("|")[0]) == k.split("|")[1]}
        other = {k: v for k, v in pairs.items() if k not in conf}
        block = {
            "conflicting_pairs": conf,
            "mean_conflicting": float(np.mean(list(conf.values()))) if conf else None,
            "mean_other_pairs": float(np.mean(list(other.values()))) if other else None,
            "all_pairs": pairs,
        }
        if kind == "raw":
            res.update(block)
        else:
            res["centred"] = block
    return res


# ------------------------------------------------------------------------------ output

def grid_png(path: Path, data: EncodedSplit, preds: dict, rows: list[int], columns=("base", "shared_lora", "hywu"),
             scale: int = 3) -> None:
    """Rows of: source | target | base | shared LoRA | HY-WU (labelled), upscaled for viewing."""
    from PIL import Image, ImageDraw

    r = data.src.shape[1] * scale
    labels = ["source", "target"] + [{"base": "base alone", "shared_lora": "shared LoRA", "hywu": "HY-WU",
                                      "per_task_lora": "per-task LoRA"}.get(c, c) for c in columns]
    head, left = 14, 190
    img = Image.new("RGB", (left + r * len(labels), head + r * len(rows)), (255, 255, 255))
    d = ImageDraw.Draw(img)
    for j, lab in enumerate(labels):
        d.text((left + j * r + 3, 2), lab, fill=(0, 0, 0))
    for i, k in enumerate(rows):
        y = head + i * r
        d.text((3, y + 3), data.tasks[k], fill=(0, 0, 0))
        words, line, yy = data.instructions[k].split(), "", y + 16
        for w in words:  # wrap the instruction
            if len(line) + len(w) > 28:
                d.text((3, yy), line, fill=(90, 90, 90))
                line, yy = "", yy + 11
            line = (line + " " + w).strip()
        d.text((3, yy), line, fill=(90, 90, 90))
        ims = [data.src[k], data.tgt[k]] + [preds[c][k] for c in columns]
        for j, a in enumerate(ims):
            img.paste(Image.fromarray(a).resize((r, r), Image.NEAREST), (left + j * r, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def format_table(metrics: dict, settings: DemoSettings, methods=("base", "shared_lora", "per_task_lora", "hywu")) -> str:
    names = {"base": "base alone", "shared_lora": "shared LoRA", "per_task_lora": "per-task LoRA*",
             "hywu": "HY-WU", "vae_ceiling": "(VAE ceiling)", "identity": "(no edit)"}
    lines = []
    for split, per in metrics.items():
        if split not in SPLITS:
            continue
        cols = list(settings.tasks) + ["conflicting", "overall"]
        lines.append(f"PSNR dB / SSIM to the exact target -- split '{split}' ({per['base']['overall']['n']} images)")
        short = {t: t.replace("shift_", "sh_").replace("_to_", "2").replace("brighten", "bright").replace("grayscale", "gray")
                 for t in cols}
        lines.append(f"{'method':16s}" + "".join(f"{short[c]:>14s}" for c in cols))
        for m in list(methods) + ["vae_ceiling", "identity"]:
            if m not in per:
                continue
            row = per[m]
            cells = []
            for c in cols:
                v = row["per_task"].get(c) if c in row["per_task"] else row.get(c)
                cells.append(f"{v['psnr']:6.2f}/{v['ssim']:.3f}" if v else f"{'-':>14s}")
            lines.append(f"{names.get(m, m):16s}" + "".join(f"{c:>14s}" for c in cells))
        lines.append("")
    lines.append("* per-task LoRA is an oracle: it is told the task label; HY-WU and the shared LoRA are not.")
    return "\n".join(lines)


def format_cosines(gc: dict) -> str:
    out = ["Gradient cosine of the shared LoRA between tasks (same images/noise, only the task differs):"]
    for when, g in gc.items():
        for label, blk in (("raw", g), ("centred", g.get("centred"))):
            if not blk:
                continue
            pairs = ", ".join(f"{k.replace('|', '/')} {v:+.2f}" for k, v in blk["conflicting_pairs"].items())
            out.append(f"  {when:>7s} {label:>7s}: conflicting pairs {blk['mean_conflicting']:+.3f} ({pairs}); "
                       f"other pairs {blk['mean_other_pairs']:+.3f}")
    out.append("  (centred = after removing the mean gradient over all tasks, the part they share)")
    return "\n".join(out)
