"""What every base family adapter provides, plus helpers they share.

An adapter owns the frozen parts of one base (denoiser, text encoder(s), VAE, noise schedule)
and answers three questions: how to encode a batch (frozen, no grad), what the generator's
condition is, and what the loss is for one forward of the denoiser. The caller installs the
LoRA (``core.lora_patched``) around :meth:`FamilyAdapter.loss` and :meth:`FamilyAdapter.sample`.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hywu_nodes.core import Condition, ConditionSpec, patchify_latent, square_resize

from ..buckets import VAE_MULTIPLE, vae_crop


class BaseFolderError(FileNotFoundError):
    """The configured base is missing or incomplete; the message names the path and what it needs."""


def check_base_folder(path: str, family: str, required: dict[str, str], files: dict | None = None) -> Path:
    """Fail at start (not an hour in) when ``path`` is not a usable diffusers folder. ``files``: components given
    as ComfyUI single files (base.files), which the folder need not hold."""
    p = Path(path)
    required = {k: v for k, v in required.items() if k not in (files or {})}
    need = "\n".join(f"    {k}/  ({v})" for k, v in required.items())
    if not p.exists():
        raise BaseFolderError(f"base.path {p} does not exist. For base.family={family} it must be a local diffusers folder containing:\n{need}")
    if not p.is_dir():
        raise BaseFolderError(f"base.path {p} is a file; base.family={family} needs a local diffusers folder containing:\n{need}\n"
                              "(convert a single-file checkpoint once with diffusers' from_single_file + save_pretrained)")
    missing = [k for k in required if not (p / k).is_dir() or not any((p / k).iterdir())]
    if missing:
        raise BaseFolderError(f"base.path {p} is missing {', '.join(s + '/' for s in missing)}. For base.family={family} the folder must contain:\n{need}")
    return p


DENOISERS = ("transformer", "unet")  # the sub-folder of each family's denoiser


class BaseParts:
    """Where a family's frozen components come from: the local diffusers folder ``base.path``, or,
    with ``base.synthetic_full``, the full-size architectures shipped in ``trainer/architectures``
    with seeded random weights (benchmarks and memory checks only: such a base edits nothing)."""

    def __init__(self, cfg, family: str, required: dict[str, str]):
        self.family, self.synthetic = family, bool(cfg.base.synthetic_full)
        self.weight_dtype, self.blocks_to_swap = cfg.base.weight_dtype, cfg.train.blocks_to_swap
        self.architecture = cfg.base.architecture or family  # synthetic_full: e.g. flux2_klein_9b for the family flux2_klein
        self.files = dict(cfg.base.files or {})  # component -> a ComfyUI single file (trainer/single_files.py)
        self.root = None if self.synthetic else check_base_folder(cfg.base.path, family, required, self.files)

    def model(self, sub: str, cls, device, dtype) -> nn.Module:
        """Component ``sub`` on ``device``. The denoiser is stored as ``base.weight_dtype`` says (trainer/fp8_base.py)
        and, with ``train.blocks_to_swap``, keeps its last blocks in CPU memory (trainer/block_swap.py); both are
        done in CPU memory first, so the accelerator never holds the bf16 weights or the swapped blocks."""
        from trainer.block_swap import BlockSwap
        from trainer.fp8_base import store_in_fp8

        device = torch.device(device)
        denoiser = sub in DENOISERS
        staged = denoiser and device.type != "meta" and (self.weight_dtype != "bf16" or self.blocks_to_swap)
        load_to = torch.device("cpu") if staged else device
        if self.synthetic:
            from trainer.full_bases import build_component

            m = build_component(self.architecture, sub, load_to, dtype, seed=zlib.crc32(sub.encode()))
        elif sub in self.files:
            from trainer.single_files import load_component

            m = load_component(self.family, sub, self.files[sub], cls, self.root / sub, self.architecture, dtype).to(load_to)
        else:
            # diffusers and transformers name the dtype argument differently
            key = "torch_dtype" if cls.__module__.startswith("diffusers") else "dtype"
            m = cls.from_pretrained(self.root / sub, **{key: dtype}).to(load_to)
        if denoiser:
            store_in_fp8(m, self.weight_dtype)
            if self.blocks_to_swap and device.type != "meta":
                m.hywu_block_swap = BlockSwap(m, self.blocks_to_swap, device)
            elif staged:
                m.to(device)
        return m

    def tokenizer(self, sub: str, max_length: int):
        from transformers import AutoTokenizer

        if not self.synthetic:
            return AutoTokenizer.from_pretrained(self.root / sub)
        import tempfile

        from trainer.tiny_bases import write_byte_tokenizer

        with tempfile.TemporaryDirectory(prefix="hywu_tok_") as tmp:  # vocabularies are data, not shipped configs
            write_byte_tokenizer(tmp, max_length=max_length)
            return AutoTokenizer.from_pretrained(tmp)

    def scheduler(self, cls):
        if self.synthetic:
            from trainer.full_bases import scheduler_config

            return cls.from_config(scheduler_config(self.architecture))
        return cls.from_pretrained(self.root / "scheduler")

    def class_name(self, sub: str) -> str:
        if self.synthetic:
            from trainer.full_bases import architecture

            return architecture(self.architecture, sub)["_class_name"]
        return read_class_name(self.root / sub)


def freeze(*modules: nn.Module) -> None:
    """Frozen parts: no grads, eval mode (no dropout), never in the optimizer."""
    for m in modules:
        m.requires_grad_(False)
        m.eval()


def sample_generators(seed: int, step: int, keys: list[int]) -> list[torch.Generator]:
    """One CPU generator per sample, keyed by (seed, step, global slot): noise, timesteps and
    dropout do not depend on how the global batch is split over processes or on resuming."""
    return [torch.Generator().manual_seed((seed * 1_000_003 + step) * 65_537 + k) for k in keys]


def split_batch(x) -> list:
    """A batched tensor (or tuple of them) -> one entry per example."""
    if isinstance(x, (tuple, list)):
        return list(zip(*(split_batch(t) for t in x)))
    return list(x.unbind(0))


def stack_batch(items: list):
    """Inverse of :func:`split_batch`."""
    if isinstance(items[0], (tuple, list)):
        return tuple(stack_batch(list(col)) for col in zip(*items))
    return torch.stack(items)


def repeat_draws(x, n: int):
    """Batch of B (a tensor or a tuple of tensors) -> n/B draws of it, draw-major (see prepare_encoded)."""
    if isinstance(x, (tuple, list)):
        return tuple(repeat_draws(t, n) for t in x)
    k, rest = divmod(n, x.shape[0])
    if rest:
        raise ValueError(f"{n} samples do not divide into draws of a batch of {x.shape[0]}")
    return x if k == 1 else x.repeat(k, *([1] * (x.ndim - 1)))


def per_sample(gens, fn) -> torch.Tensor:
    return torch.stack([fn(g) for g in gens])


def randn_like_per_sample(gens, shape) -> torch.Tensor:
    return per_sample(gens, lambda g: torch.randn(shape, generator=g))


def uniform_per_sample(gens) -> torch.Tensor:
    return per_sample(gens, lambda g: torch.rand((), generator=g))


def unpatchify_latent(tokens: torch.Tensor, channels: int, h: int, w: int, patch: int = 2) -> torch.Tensor:
    """Inverse of ``core.patchify_latent``: (B, (h/p)*(w/p), C*p*p) -> (B, C, h, w)."""
    b = tokens.shape[0]
    x = tokens.reshape(b, h // patch, w // patch, channels, patch, patch)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(b, channels, h, w)


def module_digest(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (tests: frozen weights stay bit-identical)."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        v = v.to_local() if hasattr(v, "to_local") else v  # a sharded base: this process's shard
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def read_class_name(folder: Path) -> str:
    for name in ("config.json",):
        f = folder / name
        if f.is_file():
            return json.loads(f.read_text()).get("_class_name", "")
    return ""


class FamilyAdapter:
    name = ""
    default_drop = (0.0, 0.0)  # (text, image) CFG dropout the family's pipelines expect
    flow = True  # flow matching (else DDPM noise prediction)
    text_sees_image = False  # the text encoder reads the source image too (Qwen2.5-VL): text per row

    def __init__(self, cfg, device: torch.device, dtype: torch.dtype):
        self.cfg, self.device, self.dtype = cfg, device, dtype
        self.resolution = cfg.base.resolution
        drop_text, drop_image = self.default_drop
        self.drop_text = drop_text if cfg.train.drop_text is None else cfg.train.drop_text
        self.drop_image = drop_image if cfg.train.drop_image is None else cfg.train.drop_image

    # Set by subclasses.
    denoiser: nn.Module
    condition_spec: ConditionSpec

    def frozen_modules(self) -> dict[str, nn.Module]:
        raise NotImplementedError

    # images: the base reads them at their (bucket) size, the generator at the condition's square --------
    def vae_pixels(self, images01: torch.Tensor) -> torch.Tensor:
        """Images cropped (centred) to a multiple of the VAE's downscale, as ComfyUI's VAE.encode crops them."""
        return vae_crop(images01, VAE_MULTIPLE.get(self.name, 8))

    def condition_image(self, images01: torch.Tensor) -> torch.Tensor:
        """The image the generator's condition encodes: HY-WU Condition Encode's square resize (the
        identity on images already ``resolution`` square, the square buckets)."""
        return square_resize(images01, self.resolution).clamp(0, 1)

    def source_latents(self, images01: torch.Tensor) -> dict:
        """The source latents a row keeps: ``source`` (what the base reads) and, for images that are
        not the condition's square (template buckets), ``condition_source`` (what the generator reads)."""
        out = {"source": self.latent(images01)}
        if tuple(images01.shape[-2:]) != (self.resolution, self.resolution):
            out["condition_source"] = self.latent(self.condition_image(images01))
        return out

    @staticmethod
    def condition_latent(enc: dict) -> torch.Tensor:
        """The source latent the generator's image condition is made from (see :meth:`source_latents`)."""
        return enc.get("condition_source", enc["source"])

    def empty_text(self):
        """The empty instruction's text encoding, which CFG dropout puts in place of an instruction, encoded once
        (also before the encoders leave the accelerator, trainer/offload.py); None where a family keeps its
        negative with each cached row (Qwen-Image-Edit: the text sees the image)."""
        return None

    def file_extra(self) -> dict:
        """What the generator file records about how the base was run in training (``hywu.extra``),
        so the ComfyUI graph can be set the same way (e.g. FLUX's embedded guidance)."""
        return {}

    def enable_gradient_checkpointing(self) -> None:
        self.denoiser.enable_gradient_checkpointing()

    @torch.no_grad()
    def encode(self, batch: dict) -> dict:
        """The frozen, deterministic encodings of a decoded batch, which the trainer caches per
        example: ``source`` / ``target`` latents (as the denoiser sees them) and ``text`` (what
        :meth:`training_text` returns)."""
        return {**self.source_latents(batch["source"]), "target": self.latent(batch["target"]),
                "text": self.training_text(batch["instruction"])}

    def training_text(self, texts: list[str]):
        """The text encodings the trainer keeps per instruction (default: :meth:`encode_text`'s)."""
        return self.encode_text(texts)

    def text_items(self, text) -> list:
        """Split a :meth:`training_text` result into one item per instruction (for the cache)."""
        return split_batch(text)

    def stack_text(self, items: list):
        """Inverse of :meth:`text_items`."""
        return stack_batch(items)

    # chained edits (trainer/edits.py): an edit's text feeds the generator, never the base, so only
    # what encoded_condition reads of it is encoded and kept; by default that is the whole text item
    def generator_text_items(self, texts: list[str], images01: torch.Tensor | None = None) -> list:
        """One item per text of what :meth:`encoded_condition` reads (``images01``: the rows'
        sources, for a text encoder that sees the image)."""
        return self.text_items(self.training_text(texts))

    def generator_item(self, item):
        """The part of a :meth:`text_items` item that :meth:`encoded_condition` reads."""
        return item

    def stack_generator_text(self, items: list):
        """Generator items stacked as :meth:`encoded_condition` takes ``text``."""
        return self.stack_text(items)

    @torch.no_grad()
    def prepare_encoded(self, enc: dict, step: int, keys: list[int]) -> dict:
        """Training inputs from encodings of B examples: noise, timesteps and dropout per key.
        ``len(keys)`` may be a multiple k x B: each example then gets k draws, laid out as
        [draw 0 of every example, draw 1 of every example, ...] so that sample ``i`` uses the
        example's LoRA ``i % B`` (core.lora_delta's default). ``condition`` has the B examples."""
        raise NotImplementedError

    @torch.no_grad()
    def encoded_condition(self, enc: dict) -> Condition:
        """The generator's condition from encodings (``source`` latents and ``text``): what
        :meth:`prepare_encoded` puts under ``condition``, without the noise draws."""
        raise NotImplementedError

    @torch.no_grad()
    def prepare(self, batch: dict, step: int, keys: list[int]) -> dict:
        """Frozen work for a decoded training batch: encodings, noise, timesteps, dropout."""
        return self.prepare_encoded(self.encode(batch), step, keys)

    def condition(self, prep: dict) -> Condition:
        """The generator's input for the batch (never dropped)."""
        return prep["condition"]

    def loss(self, prep: dict) -> torch.Tensor:
        """Per-sample loss (B,), float32; run with the LoRA installed."""
        raise NotImplementedError

    def loss_weights(self, prep: dict) -> torch.Tensor | None:
        """Per-sample training weights (B,) of :meth:`loss`, or None (all 1). Validation loss is unweighted."""
        return None

    @torch.no_grad()
    def encode_condition(self, source: torch.Tensor, instructions: list[str]) -> Condition:
        """Condition for images (B, 3, H, W) in [0, 1] and instructions, per the condition spec."""
        raise NotImplementedError

    @torch.no_grad()
    def sample(self, source: torch.Tensor, instructions: list[str], steps: int, seed: int = 0) -> torch.Tensor:
        """Edit ``source`` (B, 3, R, R) in [0, 1] with the base (plus any installed LoRA)."""
        raise NotImplementedError

    # Shared pieces --------------------------------------------------------------------------
    def flow_noisy(self, x0: torch.Tensor, gens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Rectified-flow interpolation: x_t = (1 - t) x0 + t noise, target v = noise - x0."""
        noise = randn_like_per_sample(gens, x0.shape[1:]).to(x0.device, x0.dtype)
        if self.cfg.train.timestep_sampling == "logit_normal":
            t = torch.sigmoid(per_sample(gens, lambda g: torch.randn((), generator=g)))
        else:
            t = uniform_per_sample(gens)
        t = t.to(x0.device, torch.float32)
        tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
        return (1 - tb) * x0 + tb * noise, t, noise - x0

    def drop_masks(self, gens) -> tuple[torch.Tensor, torch.Tensor]:
        """Independent per-sample CFG dropout of the base's text and image conditions."""
        u = per_sample(gens, lambda g: torch.rand(2, generator=g))
        return (u[:, 0] < self.drop_text).to(self.device), (u[:, 1] < self.drop_image).to(self.device)


class FlowMatchingFamily(FamilyAdapter):
    """DiT bases trained with flow matching on 2x2-patchified latent tokens (Flux Kontext,
    Qwen-Image-Edit). A subclass provides ``encode_text`` (a tuple of text inputs),
    ``latent``, ``_forward(noisy, ref, t, text, h, w)`` (velocity of the noisy tokens) and
    ``decode_latent``; loss and sampler are shared."""

    def loss(self, prep):
        pred = self._forward(prep["noisy"], prep["ref"], prep["t"], prep["text"], *prep["hw"])
        return F.mse_loss(pred.float(), prep["target"].float(), reduction="none").flatten(1).mean(1)

    def sample_sigmas(self, steps: int) -> torch.Tensor:
        """The sampler's noise levels, 1 -> 0 (``steps + 1`` values); a family gives the schedule its
        ComfyUI template samples with, so a validation edit is the one a user gets."""
        return torch.linspace(1, 0, steps + 1)

    @torch.no_grad()
    def sample(self, source, instructions, steps, seed=0):
        text = self.encode_text(instructions)
        src = self.latent(source)
        ref = patchify_latent(src, 2)
        h, w = src.shape[-2:]
        g = torch.Generator().manual_seed(seed)
        x = patchify_latent(torch.randn(src.shape, generator=g), 2).to(self.device, torch.float32)
        sigmas = self.sample_sigmas(steps)
        for s, s_next in zip(sigmas[:-1], sigmas[1:]):  # Euler on the flow ODE
            v = self._forward(x, ref, torch.full((x.shape[0],), float(s), device=self.device), text, h, w)
            x = x + (s_next - s) * v.float()
        lat = unpatchify_latent(x, self.latent_channels, h, w).to(self.dtype)
        return ((self.decode_latent(lat).float() + 1) / 2).clamp(0, 1).cpu()
