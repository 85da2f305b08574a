"""``--init-from``: continue training an existing generator file, or start a generator from a static LoRA.

A **generator file** (what the trainer writes, what HY-WU Load Generator reads) fixes the base
family, the target layers, the condition spec (text length, hidden layer, prompt mask, image
resolution) and every generator setting. The run takes them from the file: an option the user
set that disagrees is refused with both values, so an extended generator can never silently
become another architecture. The file's condition statistics are kept (recomputing them on the
new data would move the inputs of the requests it already serves). The new file is written in
the same format, with ``init_from`` (the parent's name, steps and lineage) in its ``extra``.

A **static LoRA** (kohya layout: ``<key>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``,
as core.lora_format writes and ComfyUI's LoRA loaders read) becomes the generator's shared rank
(``generator.shared_rank`` = the LoRA's rank): the generator's B head starts at zero, so at step 0
the generator's LoRA *is* the user's LoRA for every request, and training adds the request-dependent
residual. With ``--method shared_lora`` the LoRA itself trains on (a shared LoRA continued on new
data; ``generator.rank`` = the LoRA's). Without ``base.targets`` the layers are exactly the LoRA's.
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field

import torch

from hywu_nodes.core import PRESETS, HYWUGenerator, build_target_spec, lora_module_key
from hywu_nodes.core.checkpoint import load_generator, read_generator_info
from hywu_nodes.core.errors import GeneratorFileError
from hywu_nodes.core.metadata_schema import is_generator_metadata
from hywu_nodes.core.safetensors_header import read_safetensors_header

from .config import ConfigError, TrainConfig

# Generator settings a file fixes (GeneratorConfig field -> config key).
_GEN_KEYS = ("rank", "alpha", "token_width", "row_tokens", "condition_norm", "shared_rank", "film")


@dataclass
class InitSource:
    """What ``--init-from`` points at: ``kind`` is "generator" or "lora"."""

    path: str
    kind: str
    info: object = None  # GeneratorInfo (generator files)
    lora: dict = field(default_factory=dict)  # LoRA: module key -> (down (r, d_in), up (d_out, r), scale)
    family: str | None = None  # the LoRA key layout's family, when it tells ("lora_unet_" = SD1.5)

    @property
    def label(self) -> str:
        return os.path.basename(self.path)

    @property
    def keeps_condition_stats(self) -> bool:
        return self.kind == "generator" and self.info.config.condition_norm != "none"

    def lineage(self) -> dict:
        """What the new file's ``extra`` records about where it started."""
        if self.kind == "lora":
            return {"init_from": {"file": self.label, "kind": "lora", "rank": self.rank}}
        extra = self.info.extra or {}
        return {"init_from": {"file": self.label, "kind": "generator", "steps": extra.get("steps"),
                              "name": extra.get("name"), "parent": extra.get("init_from")}}

    @property
    def rank(self) -> int:
        return max(d.shape[0] for d, _, _ in self.lora.values())


def open_source(path: str) -> InitSource:
    """Read ``path``'s header (and, for a LoRA, its weights); errors say what the file is."""
    if not path or not os.path.isfile(path):
        raise ConfigError(f"--init-from: file not found: {path}")
    if not path.endswith(".safetensors"):
        raise ConfigError(f"--init-from: {os.path.basename(path)} is not a .safetensors file (a generator file or a "
                          "LoRA in the kohya layout); other formats are never read")
    try:
        header = read_safetensors_header(path, os.path.basename(path))
    except GeneratorFileError as e:
        raise ConfigError(f"--init-from: {e}") from None
    if is_generator_metadata(header.metadata):
        try:
            return InitSource(path, "generator", info=read_generator_info(path))
        except GeneratorFileError as e:
            raise ConfigError(f"--init-from: {e}") from None
    return _open_lora(path, header)


def _open_lora(path: str, header) -> InitSource:
    from safetensors.torch import load_file

    label = os.path.basename(path)
    names = list(header.tensors)
    modules = sorted({k[: -len(".lora_down.weight")] for k in names if k.endswith(".lora_down.weight")})
    if not modules:
        raise ConfigError(f"--init-from: {label} is neither a HY-WU generator file nor a LoRA in the kohya layout "
                          "(no '<layer>.lora_down.weight' tensors)")
    known = {f"{m}.{s}" for m in modules for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    other = sorted(set(names) - known)
    if other:
        raise ConfigError(f"--init-from: {label} has {len(other)} tensor(s) outside the kohya LoRA layout this reads "
                          f"(e.g. '{other[0][:80]}'; DoRA scales, LoHa/LoKr and diffusers lora_A/lora_B keys are not read)")
    text = [m for m in modules if m.startswith(("lora_te", "text_encoder", "lora_te1", "lora_te2"))]
    if text:
        raise ConfigError(f"--init-from: {label} adapts the text encoder too ({len(text)} layers, e.g. '{text[0]}'); the "
                          "generator adapts the denoiser only, and the base's frozen text encoder makes its condition. "
                          "Use a LoRA of the denoiser only (e.g. trained with the text encoder frozen)")
    state = load_file(path)
    lora = {}
    for m in modules:
        down, up = state[f"{m}.lora_down.weight"].float(), state.get(f"{m}.lora_up.weight")
        if up is None:
            raise ConfigError(f"--init-from: {label}: layer '{m}' has lora_down but no lora_up weight")
        up = up.float()
        if down.ndim != 2 or up.ndim != 2 or down.shape[0] != up.shape[1]:
            raise ConfigError(f"--init-from: {label}: layer '{m}' is not a linear LoRA (down {list(down.shape)}, up "
                              f"{list(up.shape)}); convolution LoRAs are not read")
        if not (torch.isfinite(down).all() and torch.isfinite(up).all()):
            raise ConfigError(f"--init-from: {label}: layer '{m}' holds NaN or infinite values")
        alpha = state.get(f"{m}.alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0  # kohya: no alpha = alpha equals rank
        lora[m] = (down, up, scale)
    family = "sd15_ip2p" if all(m.startswith("lora_unet_") for m in modules) else None
    return InitSource(path, "lora", lora=lora, family=family)


# ------------------------------------------------------------------------------ config

def explicit_keys(config_path: str | None, overrides) -> set[str]:
    """Dotted keys the user set, in the YAML file or as ``--section.key=value``."""
    import yaml

    keys: set[str] = set()

    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict) and prefix.count(".") < 1:
                walk(v, f"{prefix}{k}.")
            else:
                keys.add(f"{prefix}{k}")

    if config_path and os.path.isfile(config_path):
        with open(config_path) as f:
            data = yaml.safe_load(f) or {}
        if isinstance(data, dict):
            walk(data)
    for item in overrides:
        key = item.lstrip("-").partition("=")[0].replace("-", "_")
        keys.add(key)
    return keys


def _file_values(src: InitSource, cfg: TrainConfig) -> dict:
    """Config key -> value the file fixes."""
    if src.kind == "lora":
        if cfg.train.method == "per_task_lora":
            raise ConfigError(f"--init-from {src.label}: a LoRA starts a generator (train.method hywu, the LoRA as its "
                              "shared rank) or continues as a shared LoRA (train.method shared_lora), not per_task_lora")
        # shared_lora: the LoRA itself trains on; hywu: it becomes the generator's shared rank
        out = {"generator.rank": src.rank} if cfg.train.method == "shared_lora" else {"generator.shared_rank": src.rank}
        if src.family:
            out["base.family"] = src.family
        return out
    info = src.info
    g = info.config
    text, image = info.condition_spec["text"], info.condition_spec["image"]
    out = {"base.family": info.base_family, "train.method": "hywu", "base.text_tokens": text.max_tokens,
           "base.text_layer": text.text_layer, "base.text_mask": text.padding_mask,
           "base.resolution": int(image.options.get("resolution", 0)) or None}
    out.update({f"generator.{k}": getattr(g, k) for k in _GEN_KEYS})
    # how the base was run in training, recorded by its family (trainer/families: file_extra)
    for extra_key, key in (("flux_guidance", "base.guidance"), ("reference_pixels", "base.reference_pixels")):
        value = (info.extra or {}).get(extra_key)
        if value is not None and hasattr(cfg.base, key.split(".")[1]):
            out[key] = value
    dims = {k: getattr(g, k) for k in ("d_model", "n_blocks", "n_heads")}
    preset = next((p for p, v in PRESETS.items() if all(v[k] == dims[k] for k in dims)), None)
    out["generator.preset"] = preset if preset is not None else dims  # dims: no preset has them
    return {k: v for k, v in out.items() if v is not None}


def _get(cfg, key):
    section, _, name = key.partition(".")
    return getattr(getattr(cfg, section), name)


def _set(cfg, key, value):
    section, _, name = key.partition(".")
    setattr(getattr(cfg, section), name, value)


def resolve_config(cfg: TrainConfig, src: InitSource, explicit: set[str] | None = None) -> TrainConfig:
    """Take what ``src`` fixes into ``cfg`` (in place). A key the user set (``explicit``; when
    None, any value other than the default) that disagrees is refused with both values."""
    default = TrainConfig()
    conflicts = []
    for key, value in _file_values(src, cfg).items():
        current = _get(cfg, key)
        if key == "generator.preset" and isinstance(value, dict):  # the file's size matches no preset
            given = key in explicit if explicit is not None else current != _get(default, key)
            if given:
                conflicts.append(f"{key}: the config sets {current!r} ({PRESETS[current]['d_model']} wide, "
                                 f"{PRESETS[current]['n_blocks']} blocks), {src.label} has "
                                 f"d_model {value['d_model']}, {value['n_blocks']} blocks, {value['n_heads']} heads")
            continue
        if current == value:
            continue
        given = key in explicit if explicit is not None else current != _get(default, key)
        if given:
            conflicts.append(f"{key}: the config sets {current!r}, {src.label} has {value!r}")
        else:
            _set(cfg, key, value)
    if src.kind == "generator":  # not fixed by the file, but its values are the natural defaults
        extra = src.info.extra or {}
        if not cfg.base.path:
            cfg.base.path = str(extra.get("base_path", ""))
        name_given = "name" in explicit if explicit is not None else cfg.name != default.name
        if not name_given and extra.get("name"):
            cfg.name = str(extra["name"])
    if conflicts:
        what = "generator file" if src.kind == "generator" else "LoRA"
        raise ConfigError(f"--init-from {src.label}: the {what} fixes these settings and the config disagrees "
                          "(remove the option to take the file's value, or start a new generator):\n  - "
                          + "\n  - ".join(conflicts))
    cfg.train.init_from = src.path
    return cfg


# ------------------------------------------------------------------------------ the run

def target_spec(src: InitSource, denoiser, cfg: TrainConfig):
    """The layers the generator writes: the file's (checked against the base), or the LoRA's."""
    family = cfg.base.family
    modules = dict(denoiser.named_modules())
    if src.kind == "generator":
        spec = src.info.target_spec
        wrong = []
        for t in spec.targets:
            m = modules.get(t.name)
            if not isinstance(m, torch.nn.Linear):
                wrong.append(f"{t.name} (not a linear layer of this base)")
            elif (m.in_features, m.out_features) != (t.d_in, t.d_out):
                wrong.append(f"{t.name} ({t.d_in}->{t.d_out} in the file, {m.in_features}->{m.out_features} in the base)")
        if wrong:
            raise ConfigError(f"--init-from {src.label}: the file was trained for another base than {cfg.base.path}: "
                              f"{len(wrong)} of its {len(spec.targets)} layers do not fit, e.g. {wrong[0]}")
        if cfg.base.targets is not None:
            mine = build_target_spec(denoiser, family, include=cfg.base.targets)
            if mine.names != spec.names:
                raise ConfigError(f"--init-from {src.label}: base.targets {cfg.base.targets} selects {len(mine.targets)} "
                                  f"layers, the file was trained on {len(spec.targets)} "
                                  f"(e.g. {(set(mine.names) ^ set(spec.names)).pop()} is in one only); remove base.targets")
        return spec
    by_key = {lora_module_key(family, n): n for n, m in modules.items() if isinstance(m, torch.nn.Linear)}
    unknown = [k for k in src.lora if k not in by_key]
    if unknown:
        raise ConfigError(f"--init-from {src.label}: {len(unknown)} of its {len(src.lora)} layers are no linear layer of "
                          f"this {family} base (e.g. '{unknown[0]}'): a LoRA for another base or key layout")
    names = {by_key[k] for k in src.lora}
    for k, (down, up, _) in src.lora.items():
        m = modules[by_key[k]]
        if (down.shape[1], up.shape[0]) != (m.in_features, m.out_features):
            raise ConfigError(f"--init-from {src.label}: layer '{k}' is {down.shape[1]}->{up.shape[0]} in the LoRA, "
                              f"{m.in_features}->{m.out_features} in the base")
    if cfg.base.targets is None:
        return build_target_spec(denoiser, family, include=[f"^{re.escape(n)}$" for n in sorted(names)])
    spec = build_target_spec(denoiser, family, include=cfg.base.targets)
    outside = sorted(names - set(spec.names))
    if outside:
        raise ConfigError(f"--init-from {src.label}: {len(outside)} of the LoRA's layers are not in base.targets "
                          f"{cfg.base.targets} (e.g. {outside[0]}); remove base.targets to target the LoRA's layers")
    return spec


def build_method(cfg: TrainConfig, src: InitSource, spec, condition_spec, tasks):
    """The hywu method started from ``src`` (the file's generator, or a fresh one whose shared
    rank holds the LoRA)."""
    from .methods import Method, build_method as build_fresh

    if src.kind == "lora":
        method = build_fresh(cfg, spec, condition_spec, tasks)
        if method.name == "shared_lora":
            load_lora_into_static(method.module, src, cfg.base.family)
        else:
            load_lora_into_shared_rank(method.module, src, cfg.base.family)
        return method
    if condition_spec.to_json() != src.info.condition_spec.to_json():
        raise ConfigError(f"--init-from {src.label}: this base's condition ({_describe(condition_spec)}) differs from "
                          f"the one the file was trained on ({_describe(src.info.condition_spec)})")
    gcfg = dataclasses.replace(src.info.config, gradient_checkpointing=cfg.generator.gradient_checkpointing)
    factory = lambda: HYWUGenerator(gcfg, spec, condition_spec)  # noqa: E731
    try:
        loaded, _ = load_generator(src.path)
    except GeneratorFileError as e:
        raise ConfigError(f"--init-from: {e}") from None
    module = factory()
    module.load_state_dict(loaded.state_dict())
    return Method("hywu", module, cfg.base.family, factory=factory)


def _describe(spec) -> str:
    return ", ".join(f"{s.name}: {s.kind} {s.max_tokens}x{s.width} {s.options}" for s in spec.sources)


@torch.no_grad()
def load_lora_into_static(lora, src: InitSource, family: str) -> None:
    """Continue the LoRA as a shared static LoRA (trainer.methods.StaticLoRA, rank = the LoRA's)."""
    _write_lora(lora.target_spec.targets, [a[0] for a in lora.a], [b[0] for b in lora.b], lora.scale, src, family)


@torch.no_grad()
def load_lora_into_shared_rank(generator: HYWUGenerator, src: InitSource, family: str) -> None:
    """Write the LoRA into the generator's shared rank so that scale * shared_b @ shared_a equals
    the LoRA's update (its alpha / rank folded into B). Layers of lower rank are zero-padded;
    targets the LoRA lacks keep the fresh init (B = 0)."""
    _write_lora(generator.target_spec.targets, list(generator.shared_a), list(generator.shared_b), generator.scale, src,
                family)


@torch.no_grad()
def _write_lora(targets, a_params, b_params, gen_scale: float, src: InitSource, family: str) -> None:
    for t, sa, sb in zip(targets, a_params, b_params):
        r = sa.shape[0]
        entry = src.lora.get(lora_module_key(family, t.name))
        if entry is None:
            continue
        down, up, scale = entry
        k = down.shape[0]
        sa.zero_()
        sb.zero_()
        sa[:k] = down.to(sa.dtype)
        sb[:, :k] = (up * (scale / gen_scale)).to(sb.dtype)
        if k < r:
            # zero rows/columns would stay dead (both factors' gradients are zero); a fresh small A
            # with B = 0 keeps the update exact and the spare rank trainable
            sa[k:].uniform_(-t.d_in ** -0.5, t.d_in ** -0.5)


def config_for(init_path: str, config_path: str | None, overrides) -> TrainConfig:
    """The config of ``python -m trainer.train --init-from FILE [--config YAML] [overrides]``:
    defaults (not the demo config), the YAML and overrides, then what the file fixes."""
    from .config import read_config, validate

    cfg = read_config(config_path, overrides)
    resolve_config(cfg, open_source(init_path), explicit_keys(config_path, overrides))
    validate(cfg)
    return cfg


def prepare(cfg: TrainConfig) -> InitSource:
    """For :func:`trainer.train.run`: the source of ``cfg.train.init_from``, its settings taken into
    ``cfg`` (a no-op after :func:`config_for`; in-process callers get the same checks)."""
    from .config import validate

    src = open_source(cfg.train.init_from)
    resolve_config(cfg, src)
    validate(cfg)
    return src
