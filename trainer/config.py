"""Training configuration: dataclasses, YAML loading, ``--section.key=value`` overrides, and
validation with messages that say what to fix."""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from hywu_nodes.core import BASE_FAMILIES, PRESETS
from hywu_nodes.core.generator import CONDITION_NORMS

from .edits import CHAIN_SHARED
from .buckets import BUCKET_MODES, TEMPLATE_SCALE
from .fp8_base import WEIGHT_DTYPES
from .replay import ReplayConfig, replay_problems
from .single_files import supported as supported_files

METHODS = ("hywu", "shared_lora", "per_task_lora")
SOURCES = ("synthetic", "manifest", "parquet", "folders")
# other trainers' key names accepted in a config (ai-toolkit's dataset keys)
ALIASES = {"data.folder_path": "data.path"}
PRECISIONS = ("no", "fp16", "bf16")


@dataclass
class BaseConfig:
    family: str = "sd15_ip2p"  # one of BASE_FAMILIES
    path: str = ""  # local diffusers folder (or, for sd15_ip2p, a single-file checkpoint)
    tiny: bool = False  # build a seeded tiny base into `path` if it is missing (tests/demo only)
    synthetic_full: bool = False  # full-size architecture with seeded RANDOM weights instead of `path` (benchmarks only)
    architecture: str = ""  # synthetic_full: which shipped architecture (trainer/architectures/); "" = the family's own
    weight_dtype: str = "bf16"  # bf16 (the training dtype) | fp8_e4m3fn | fp8_scaled: the denoiser's linear weights at rest
    resolution: int = 32  # the generator's image condition (square, multiple of 16); with buckets: square also the base's images
    buckets: str = "square"  # square: every image cropped to resolution^2 | template: each source sized as the family's template sizes it
    megapixels: float | None = None  # buckets template: ImageScaleToTotalPixels' megapixels; None = the template's
    text_tokens: int | None = None  # text condition length; None = family default (77 / 512 / 1024)
    targets: list[str] | None = None  # regexes of adapted linear layers; None = family default
    text_layer: int = -1  # which text-encoder hidden layer the generator reads (-1 = last, -2 = the one before, ...)
    text_mask: bool = False  # the generator ignores the padding after the prompt's end token
    guidance: float | None = None  # flux_kontext: embedded guidance the base gets (the graph's FluxGuidance); None = 2.5
    vl_pixels: int | None = None  # qwen families: area of the image shown to Qwen2.5-VL; None = ComfyUI's (1024^2 / 384^2 Plus)
    reference_pixels: int | None = None  # qwen families: area of the reference latent's image; None = ComfyUI's 1024^2
    files: dict = field(default_factory=dict)  # component -> a ComfyUI single file instead of base.path/<component> (transformer)


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic | manifest (JSONL/CSV) | parquet (folder) | folders (target + control images)
    path: str = ""  # manifest file, parquet folder, or folders: the targets (or a folder with target/ and control/)
    control_path: str = ""  # folders: the source images, named as their targets (ai-toolkit's control_path)
    caption_ext: str = "txt"  # folders: the instruction of target X.png is in X.<caption_ext>
    n_train: int | None = None  # training rows: the first n usable ones (null: all rows; synthetic: 64 examples)
    n_val: int = 4  # held-out rows shown in the PNG grid (the validation loss uses up to 64 held-out rows)
    val_fraction: float = 0.05  # manifest/parquet/folders: share of the usable rows held out for validation (0 = none)
    val_path: str = ""  # a separate validation manifest, parquet folder or folders dataset (then nothing is held out)
    tasks: list[str] | None = None  # synthetic: restrict to these tasks
    cache_mb: float = 2048.0  # memory for pre-encoded rows (latents + text features); 0 = encode every batch
    cache_dir: str = ""  # also keep the encodings on disk here (next run); rows over cache_mb go to shards here
    replay: ReplayConfig = field(default_factory=ReplayConfig)  # old data mixed in a set share (trainer/replay.py)
    chain_edits: bool = True  # rows with an `edits` list train as those edits chained (trainer/edits.py); false: ignored
    chain_shared: str = "once"  # once | per_edit: the generator's shared rank counted once per chained row, or per edit


@dataclass
class GeneratorSection:
    preset: str = "tiny"
    token_width: int | None = None  # entries per parameter token along d_in/d_out; None = the preset's
    rank: int = 4
    alpha: float = 4.0
    gradient_checkpointing: bool = False
    row_tokens: int | None = None  # tokens per grid row; None = chosen from the targets
    condition_norm: str = "none"  # none | feature | token: standardise the condition with training-set statistics
    shared_rank: int = 0  # > 0: a learned static LoRA of this rank inside the generator (generated = residual)
    film: bool = False  # FiLM of the generator's queries from the pooled text
    norm_examples: int = 1024  # training examples the condition statistics are computed from


@dataclass
class TrainSection:
    method: str = "hywu"  # hywu | shared_lora | per_task_lora
    max_steps: int = 30
    batch_size: int = 4  # per process
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine
    max_grad_norm: float = 1.0
    seed: int = 0
    mixed_precision: str = "no"  # no | fp16 | bf16
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda
    base_gradient_checkpointing: bool = False
    offload_encoders: bool = True  # text encoders + VAE to CPU memory once every row is encoded (back for validation grids)
    blocks_to_swap: int = 0  # the denoiser's last N blocks live in CPU memory, copied in ahead of use (trainer/block_swap.py)
    drop_text: float | None = None  # CFG dropout of the base's text condition; None = family default
    drop_image: float | None = None  # CFG dropout of the base's image condition; None = family default
    timestep_sampling: str = "logit_normal"  # flow families: logit_normal | uniform
    snr_gamma: float = 0.0  # noise-prediction families: min-SNR loss weighting min(SNR, gamma) / SNR (0 = off)
    save_every: int = 0  # steps between checkpoints (0 = only at the end)
    keep_checkpoints: int = 2
    validate_every: int = 0  # steps between PNG grids (0 = only at the end)
    validate_steps: int = 4  # sampler steps of the validation edits
    samples: list | None = None  # previews on your own images at each validation: [{image: path, instruction: text}]
    log_every: int = 1
    draws_per_example: int = 1  # noise/timestep draws per example: one generated LoRA serves them all
    max_nonfinite: int = 5  # consecutive non-finite (NaN/inf) steps that stop the run
    deterministic: bool = True  # deterministic kernels: the same config + seed + thread count gives the same weights
    fsdp: bool = False  # shard the trained module with torch FSDP2 (trainer/sharding.py)
    fsdp_shard_base: bool = False  # also shard the frozen base's blocks (implies fsdp)
    init_from: str = ""  # a generator file to continue, or a kohya LoRA as the shared rank (trainer/init_from.py)
    freeze_shared_rank: bool = False  # hywu: keep generator.shared_rank's LoRA (the part every request shares) as it is


@dataclass
class TrainConfig:
    name: str = "demo"
    output: str = "output/train/demo"
    base: BaseConfig = field(default_factory=BaseConfig)
    data: DataConfig = field(default_factory=DataConfig)
    generator: GeneratorSection = field(default_factory=GeneratorSection)
    train: TrainSection = field(default_factory=TrainSection)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ConfigError(ValueError):
    """A configuration problem; the message says which key and what is allowed."""


def _coerce(value: Any, current: Any, key: str) -> Any:
    if isinstance(value, str) and not isinstance(current, str):
        raw, value = value, yaml.safe_load(value)  # "true" -> bool, "[a, b]" -> list, "null" -> None
        if isinstance(value, str):
            try:
                value = float(raw) if "." in raw or "e" in raw.lower() else int(raw)  # YAML 1.1 reads "5e-4" as text
            except ValueError:
                pass
    if isinstance(current, bool) and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, int) and not isinstance(current, bool) and isinstance(value, float) and value.is_integer():
        value = int(value)
    if current is not None and value is not None and type(value) is not type(current) and not isinstance(current, list):
        raise ConfigError(f"{key} must be {type(current).__name__}, got {value!r}")
    return value


def apply(cfg: TrainConfig, data: dict, prefix: str = "") -> None:
    """Merge a nested dict into ``cfg``; unknown keys are errors naming the known ones."""
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in ALIASES:
            full = ALIASES[full]
            key = full.rsplit(".", 1)[-1]
        target = cfg
        if not hasattr(target, key):
            known = ", ".join(f.name for f in dataclasses.fields(target))
            raise ConfigError(f"unknown config key '{full}'; known here: {known}")
        current = getattr(target, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"'{full}' is a section; give it keys, e.g. {full}.{dataclasses.fields(current)[0].name}=...")
            apply(current, value, full + ".")
        else:
            setattr(target, key, _coerce(value, current, full))


def set_dotted(cfg: TrainConfig, dotted: str, value: str) -> None:
    parts = dotted.split(".")
    nested: dict = {}
    d = nested
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value
    apply(cfg, nested)


def load_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    cfg = read_config(path, overrides)
    validate(cfg)
    return cfg


def read_config(path: str | None, overrides: list[str] = ()) -> TrainConfig:
    """Defaults, then the YAML file ``path``, then ``--section.key=value`` overrides (not validated)."""
    cfg = TrainConfig()
    if path:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path) as f:
            data = yaml.safe_load(f) or {}
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a config is a YAML mapping of sections (base, data, generator, train)")
        apply(cfg, data)
    for item in overrides:
        key, sep, value = item.lstrip("-").partition("=")
        if not sep:
            raise ConfigError(f"override '{item}' must look like --section.key=value")
        set_dotted(cfg, key.replace("-", "_"), value)
    return cfg


SAMPLE_KEYS = {"image": ("image", "ctrl_img", "control", "source"), "instruction": ("instruction", "prompt")}


def sample_fields(item: dict) -> tuple:
    """(image path, instruction) of a train.samples entry (ai-toolkit's ctrl_img / prompt accepted)."""
    return tuple(next((item[k] for k in keys if k in item), None) for keys in SAMPLE_KEYS.values())


def sample_problems(samples) -> list[str]:
    if samples is None:
        return []
    if not isinstance(samples, list):
        return [f"train.samples must be a list of {{image: path, instruction: text}}, got {samples!r}"]
    out = []
    for i, item in enumerate(samples):
        image, text = sample_fields(item) if isinstance(item, dict) else (None, None)
        if not isinstance(item, dict) or not isinstance(text, str) or not text.strip():
            out.append(f"train.samples[{i}] must be a mapping {{image: path, instruction: text}} with a non-empty "
                       f"instruction, got {item!r}")
        elif not isinstance(image, str) or not os.path.isfile(image):
            out.append(f"train.samples[{i}].image: no such image file {image!r}")
    return out


def validate(cfg: TrainConfig) -> None:
    b, d, g, t = cfg.base, cfg.data, cfg.generator, cfg.train
    problems = []
    if b.family not in BASE_FAMILIES:
        problems.append(f"base.family '{b.family}' is not one of {', '.join(BASE_FAMILIES)}")
    if not b.path and not b.synthetic_full:
        problems.append("base.path is empty: give the local diffusers folder of the frozen base")
    if b.architecture and not (Path(__file__).parent / "architectures" / b.architecture).is_dir():
        problems.append(f"base.architecture '{b.architecture}' is not one of the shipped architectures in trainer/architectures/")
    if b.weight_dtype not in WEIGHT_DTYPES:
        problems.append(f"base.weight_dtype must be one of {', '.join(WEIGHT_DTYPES)}, got {b.weight_dtype!r}")
    elif b.weight_dtype != "bf16" and t.fsdp_shard_base:
        problems.append("base.weight_dtype fp8 and train.fsdp_shard_base exclude each other: an fp8 base is already a "
                        "quarter of an fp32 one; shard the generator only (train.fsdp)")
    if t.blocks_to_swap < 0:
        problems.append(f"train.blocks_to_swap must be 0 (off) or a number of the base's blocks, got {t.blocks_to_swap}")
    elif t.blocks_to_swap and (t.fsdp or t.fsdp_shard_base):
        problems.append("train.blocks_to_swap and FSDP exclude each other: swap blocks on one GPU, or shard them over several")
    if b.synthetic_full and b.tiny:
        problems.append("base.tiny and base.synthetic_full exclude each other: pick the seeded tiny base or the full-size random one")
    if b.resolution % 16 or b.resolution < 16:
        problems.append(f"base.resolution {b.resolution} must be a positive multiple of 16")
    for sub, path in (b.files or {}).items():
        if sub not in supported_files(b.family):
            problems.append(f"base.files.{sub}: {b.family} reads a ComfyUI single file for "
                            f"{', '.join(supported_files(b.family)) or 'no component'}; give {sub} in the diffusers folder base.path")
        elif not Path(str(path)).is_file():
            problems.append(f"base.files.{sub}: no file at {path}")
    if b.buckets not in BUCKET_MODES:
        problems.append(f"base.buckets must be one of {', '.join(BUCKET_MODES)}, got {b.buckets!r}")
    if b.megapixels is not None:
        if b.buckets != "template":
            problems.append("base.megapixels sizes the template buckets: set base.buckets: template (or drop base.megapixels)")
        elif TEMPLATE_SCALE.get(b.family) is not None and TEMPLATE_SCALE[b.family].kind != "total_pixels":
            problems.append(f"base.megapixels: {b.family}'s template scales with FluxKontextImageScale, which has fixed "
                            "resolutions (about 1 MP); drop base.megapixels")
        elif not 0.01 <= b.megapixels <= 16:
            problems.append(f"base.megapixels must be in [0.01, 16] (ImageScaleToTotalPixels' range), got {b.megapixels}")
    if d.source not in SOURCES:
        problems.append(f"data.source '{d.source}' is not one of {', '.join(SOURCES)}")
    if d.source != "synthetic" and not d.path:
        needs = {"manifest": "manifest file", "parquet": "folder of .parquet files",
                 "folders": "folder of target images with same-name .txt instructions"}[d.source] if d.source in SOURCES else "path"
        problems.append(f"data.path is empty: data.source={d.source} needs a {needs}")
    if d.chain_shared not in CHAIN_SHARED:
        problems.append(f"data.chain_shared '{d.chain_shared}' is not one of {', '.join(CHAIN_SHARED)}")
    if g.preset not in PRESETS:
        problems.append(f"generator.preset '{g.preset}' is not one of {', '.join(PRESETS)}")
    if g.condition_norm not in CONDITION_NORMS:
        problems.append(f"generator.condition_norm '{g.condition_norm}' is not one of {', '.join(CONDITION_NORMS)}")
    if g.token_width is not None and g.token_width < 1:
        problems.append("generator.token_width must be positive (or null for the preset's)")
    if g.shared_rank < 0 or g.norm_examples < 1:
        problems.append("generator.shared_rank must be 0 (off) or positive, generator.norm_examples at least 1")
    if b.text_layer >= 0:
        problems.append(f"base.text_layer must be negative (-1 = the last layer, -2 = the one before), got {b.text_layer}")
    if (b.text_layer != -1 or b.text_mask) and b.family != "sd15_ip2p":
        problems.append(f"base.text_layer / base.text_mask are implemented for sd15_ip2p only (not {b.family})")
    if b.guidance is not None and (b.family != "flux_kontext" or not 0 <= b.guidance <= 100):
        problems.append(f"base.guidance is the embedded guidance of flux_kontext (0 to 100, the graph's FluxGuidance), got "
                        f"{b.guidance} for {b.family}" + ("" if b.family == "flux_kontext" else "; leave it unset"))
    for k in ("vl_pixels", "reference_pixels"):
        v = getattr(b, k)
        if v is not None and (not b.family.startswith("qwen_image_edit") or not 64 <= v <= 1 << 26):
            problems.append(f"base.{k} is the image area (pixels, 64 to 2^26) of the qwen families, got {v} for {b.family}")
    if t.method not in METHODS:
        problems.append(f"train.method '{t.method}' is not one of {', '.join(METHODS)}")
    if t.mixed_precision not in PRECISIONS:
        problems.append(f"train.mixed_precision '{t.mixed_precision}' is not one of {', '.join(PRECISIONS)}")
    if t.lr_schedule not in ("constant", "cosine"):
        problems.append(f"train.lr_schedule '{t.lr_schedule}' is not constant or cosine")
    if t.timestep_sampling not in ("logit_normal", "uniform"):
        problems.append(f"train.timestep_sampling '{t.timestep_sampling}' is not logit_normal or uniform")
    if t.snr_gamma < 0:
        problems.append(f"train.snr_gamma must be 0 (off) or positive, got {t.snr_gamma}")
    elif t.snr_gamma > 0 and b.family != "sd15_ip2p":
        problems.append(f"train.snr_gamma weights the noise-prediction loss of sd15_ip2p; {b.family} trains with "
                        "flow matching (use train.timestep_sampling there)")
    problems += sample_problems(t.samples)
    if t.device not in ("auto", "cpu", "cuda"):
        problems.append(f"train.device '{t.device}' is not auto, cpu or cuda")
    for k in ("max_steps", "batch_size", "grad_accum", "keep_checkpoints", "validate_steps", "log_every", "draws_per_example",
              "max_nonfinite"):
        if getattr(t, k) < 1:
            problems.append(f"train.{k} must be at least 1")
    for k in ("drop_text", "drop_image"):
        v = getattr(t, k)
        if v is not None and not 0 <= v < 1:
            problems.append(f"train.{k} must be in [0, 1)")
    if (t.fsdp or t.fsdp_shard_base) and t.mixed_precision == "fp16":
        problems.append("train.fsdp runs in fp32 or bf16 (train.mixed_precision: no | bf16); fp16 needs a sharded "
                        "gradient scaler the trainer does not have")
    for k in ("token_width", "row_tokens"):
        v = getattr(g, k)
        if v is not None and v < 1:
            problems.append(f"generator.{k} must be a positive integer (or null for the default)")
    problems += replay_problems(d.replay)
    if d.replay.distill > 0 and (t.method != "hywu" or not t.init_from):
        problems.append("data.replay.distill keeps an extended generator's LoRAs for the old rows: it needs "
                        "--init-from a generator file and train.method hywu")
    if t.freeze_shared_rank and (t.method != "hywu" or not g.shared_rank):
        problems.append("train.freeze_shared_rank keeps the generator's shared rank: it needs train.method hywu and "
                        f"generator.shared_rank > 0 (here {t.method}, shared_rank {g.shared_rank})")
    if d.n_train is not None and d.n_train < 1:
        problems.append("data.n_train must be at least 1 (or null: all rows; 64 synthetic examples)")
    if not 0 <= d.val_fraction < 1:
        problems.append(f"data.val_fraction must be in [0, 1) (a share of the usable rows), got {d.val_fraction}")
    if d.val_path and d.source == "synthetic":
        problems.append("data.val_path applies to manifest/parquet/folders data; the synthetic world has its own held-out split (data.n_val)")
    if d.cache_mb < 0:
        problems.append("data.cache_mb must be >= 0 (0 turns the cache of encodings off)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
