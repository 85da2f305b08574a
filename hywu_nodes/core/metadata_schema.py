"""What a generator file's metadata may hold, checked field by field before anything is built.

Every field of the generator config, of a target layer and of a condition source (and every
condition option) has one :class:`Rule` in the tables below: its type and bounds. A field the
tables do not know is refused, so a new field needs a rule here (tests/test_core_file_checks.py
checks that the tables cover :class:`GeneratorConfig`). Fields a file lacks take their defaults,
so files written before a field existed still load.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, fields

from .conditions import CONDITION_KINDS, ConditionSource, ConditionSpec
from .errors import GeneratorFileError
from .generator import GeneratorConfig
from .targets import BASE_FAMILIES, LinearTarget, TargetSpec

FORMAT = "hywu-generator"
# The newest version this code reads; files from 1 to FORMAT_VERSION load. v2 added generator
# options (condition_norm + its stored statistics, shared_rank, film) and the text source's
# layer/mask options; a v1 file is a v2 file with every option off.
FORMAT_VERSION = 2

REMEDY = ("The file is damaged or was edited: copy it again from the output folder of its training run, "
          "or pick another generator.")


@dataclass(frozen=True)
class Rule:
    """Allowed values of one field: ``kind`` is "int", "number" (finite), "bool", "text" or
    "choice"; ``lo``/``hi`` bound numbers (and text length); ``optional`` allows null."""

    kind: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple = ()
    optional: bool = False

    def problem(self, value) -> str | None:
        """None when ``value`` is allowed, else what is wrong with it."""
        if value is None:
            return None if self.optional else "is null"
        shown = repr(value)[:40]
        if self.kind == "bool":
            return None if isinstance(value, bool) else f"is {shown}; it must be true or false"
        if self.kind == "choice":
            return None if value in self.choices else f"is {shown}; it must be one of {', '.join(map(str, self.choices))}"
        if self.kind == "layer":  # a named layer, or a hidden layer counted from the end (-1 = last)
            ok = value in self.choices or (isinstance(value, int) and not isinstance(value, bool) and self.lo <= value <= -1)
            return None if ok else f"is {shown}; it must be one of {', '.join(self.choices)} or a whole number from {self.lo:g} to -1"
        if self.kind == "text":
            if not isinstance(value, str) or not (self.lo <= len(value) <= self.hi):
                return f"is {shown}; it must be text of {self.lo} to {self.hi} characters"
            return None
        is_int = isinstance(value, int) and not isinstance(value, bool)
        if self.kind == "int" and not is_int:
            return f"is {shown}; it must be a whole number from {self.lo:g} to {self.hi:g}"
        if self.kind == "number" and not (is_int or isinstance(value, float)):
            return f"is {shown}; it must be a number from {self.lo:g} to {self.hi:g}"
        if isinstance(value, float) and not math.isfinite(value):
            return f"is {shown}; it must be a finite number"
        if not (self.lo <= value <= self.hi):
            return f"is {shown}; it must be from {self.lo:g} to {self.hi:g}"
        return None


def whole(lo, hi, optional=False) -> Rule:
    return Rule("int", lo, hi, optional=optional)


def number(lo, hi) -> Rule:
    return Rule("number", lo, hi)


def text(max_len, min_len=1) -> Rule:
    return Rule("text", min_len, max_len)


def choice(*options) -> Rule:
    return Rule("choice", choices=tuple(options))


FLAG = Rule("bool")
MAX_TARGETS = 65_536
MAX_SOURCES = 16
MAX_WIDTH = 1 << 20  # widest linear layer or condition feature a file may describe

# GeneratorConfig: one rule per dataclass field (the reference release is 24 blocks of d_model 4096).
CONFIG_RULES: dict[str, Rule] = {
    "d_model": whole(4, 16_384),
    "n_blocks": whole(1, 256),
    "n_heads": whole(1, 256),
    "ffn_mult": number(0.25, 16),
    "token_width": whole(1, 65_536),
    "rank": whole(1, 1024),
    "alpha": number(1e-6, 1e6),
    "row_tokens": whole(1, 65_536),  # None in a config means "choose"; a file records the choice
    "gradient_checkpointing": FLAG,
    "condition_norm": choice("none", "feature", "token"),
    "shared_rank": whole(0, 1024),
    "film": FLAG,
}
TARGET_RULES: dict[str, Rule] = {
    "name": text(512),
    "d_in": whole(1, MAX_WIDTH),
    "d_out": whole(1, MAX_WIDTH),
    "group": whole(0, MAX_TARGETS),
}
CONDITION_RULES: dict[str, Rule] = {
    "name": text(64),
    "kind": choice(*CONDITION_KINDS),
    "width": whole(1, MAX_WIDTH),
    "max_tokens": whole(1, 65_536),
}
# Extraction details of a condition source (ConditionSource.options), read by Condition Encode.
CONDITION_OPTION_RULES: dict[str, Rule] = {
    "layer": Rule("layer", lo=-256, choices=("last", "penultimate")),
    "mask": choice("none", "padding"),
    "final_norm": FLAG,
    "resolution": whole(8, 8192),
    "patch": whole(1, 64),
    "vae_scale": whole(1, 64),
    "latent": choice("scaled"),
    "crop": FLAG,
    # Qwen-Image-Edit(-Plus): the instruction is encoded with the source image shown to Qwen2.5-VL as the core
    # TextEncodeQwenImageEdit(Plus) node shows it (at vl_pixels), and the generator reads the tokens after the image
    "vl_prompt": choice("qwen_image_edit", "qwen_image_edit_plus"),
    "vl_pixels": whole(64, 1 << 26),
    "vl_tokens": choice("after_image"),
}
# Fields of 'hywu.extra' that nodes read (the rest of it, e.g. steps and run name, is only shown).
EXTRA_RULES: dict[str, Rule] = {
    "flux_guidance": number(0, 100),  # embedded guidance the FLUX base was trained at (the graph's FluxGuidance)
}
REQUIRED_KEYS = ("hywu.format", "hywu.format_version", "hywu.base_family", "hywu.config", "hywu.target_spec",
                 "hywu.target_fingerprint", "hywu.condition_spec", "hywu.rank", "hywu.alpha")
OPTIONAL_KEYS = ("hywu.extra",)


@dataclass(frozen=True)
class GeneratorMetadata:
    version: int
    config: GeneratorConfig
    target_spec: TargetSpec
    condition_spec: ConditionSpec
    extra: dict


def is_generator_metadata(meta: dict) -> bool:
    return meta.get("hywu.format") == FORMAT


def parse_generator_metadata(meta: dict[str, str], label: str) -> GeneratorMetadata:
    """Check every field of a generator file's metadata; raise one :class:`GeneratorFileError`
    naming the first problem. Nothing is allocated from the values before they pass."""
    def fail(problem: str, kind: str = "metadata"):
        raise GeneratorFileError(f"{label}: generator metadata {problem}. {REMEDY}", kind)

    missing = [k for k in REQUIRED_KEYS if k not in meta]
    if missing:
        fail(f"lacks {', '.join(missing)}")
    unknown = sorted(k for k in meta if k.startswith("hywu.") and k not in REQUIRED_KEYS + OPTIONAL_KEYS)
    if unknown:
        raise GeneratorFileError(
            f"{label}: generator metadata has fields this HY-WU node pack does not know ({', '.join(unknown[:5])}). "
            "It may come from a newer HY-WU: update the node pack. Otherwise: " + REMEDY, "metadata")
    version = _version(meta["hywu.format_version"], label)

    config_data = _json_object(meta, "hywu.config", fail)
    _check_fields(config_data, CONFIG_RULES, "'hywu.config'", fail)
    known = {f.name for f in fields(GeneratorConfig)}
    if set(config_data) - known:  # a rule without a dataclass field: the tables are out of date
        fail(f"'hywu.config' has fields {sorted(set(config_data) - known)} that this node pack cannot use")
    config = GeneratorConfig(**config_data)

    spec_data = _json_object(meta, "hywu.target_spec", fail)
    if set(spec_data) != {"family", "targets"}:
        fail("'hywu.target_spec' must hold exactly 'family' and 'targets'")
    targets = spec_data["targets"]
    if not isinstance(targets, list) or not 1 <= len(targets) <= MAX_TARGETS:
        fail(f"'hywu.target_spec' must list 1 to {MAX_TARGETS:,} target layers")
    for i, t in enumerate(targets):
        _check_fields(t, TARGET_RULES, f"'hywu.target_spec' target {i}", fail, required=True)
    names = [t["name"] for t in targets]
    if len(set(names)) != len(names):
        fail("'hywu.target_spec' names a target layer twice")
    family = meta["hywu.base_family"]
    if family not in BASE_FAMILIES:
        raise GeneratorFileError(
            f"{label} is a generator for base family '{family[:40]}', which this HY-WU node pack does not know (it "
            f"knows {', '.join(BASE_FAMILIES)}). Update the node pack, or pick a generator for one of these bases.",
            "unknown_family")
    if spec_data["family"] != family:
        fail(f"says base family '{family}', but its target layers are recorded for '{str(spec_data['family'])[:40]}'")
    target_spec = TargetSpec(family, tuple(LinearTarget(**t) for t in targets))
    if target_spec.fingerprint != meta["hywu.target_fingerprint"]:
        fail("has a target fingerprint that does not match its target layers")

    sources = _json_list(meta, "hywu.condition_spec", fail)
    if not 1 <= len(sources) <= MAX_SOURCES:
        fail(f"'hywu.condition_spec' must list 1 to {MAX_SOURCES} condition sources")
    parsed = []
    for i, s in enumerate(sources):
        where = f"'hywu.condition_spec' source {i}"
        options = s.pop("options", {}) if isinstance(s, dict) else {}
        _check_fields(s, CONDITION_RULES, where, fail, required=True)
        _check_fields(options, CONDITION_OPTION_RULES, f"{where} options", fail)
        parsed.append(ConditionSource(options=options, **s))
    if len({s.name for s in parsed}) != len(parsed):
        fail("'hywu.condition_spec' names a condition source twice")
    condition_spec = ConditionSpec(tuple(parsed))

    rank, alpha = _number(meta, "hywu.rank", CONFIG_RULES["rank"], fail), _number(meta, "hywu.alpha", CONFIG_RULES["alpha"], fail)
    if rank != config.rank or alpha != config.alpha:
        fail(f"says rank {rank} / alpha {alpha:g}, but its generator config has rank {config.rank} / alpha {config.alpha:g}")
    extra = _json_object(meta, "hywu.extra", fail) if "hywu.extra" in meta else {}
    for key, rule in EXTRA_RULES.items():
        problem = rule.problem(extra[key]) if key in extra else None
        if problem:
            fail(f"'hywu.extra' field '{key}' {problem}")
    return GeneratorMetadata(version, config, target_spec, condition_spec, extra)


def _version(raw: str, label: str) -> int:
    if not raw.isdigit() or len(raw) > 6:
        raise GeneratorFileError(f"{label}: generator metadata 'hywu.format_version' is {raw[:20]!r}, not a version "
                                 f"number. {REMEDY}", "metadata")
    version = int(raw)
    if version > FORMAT_VERSION:
        raise GeneratorFileError(
            f"{label} uses generator format v{version}; this HY-WU node pack reads up to v{FORMAT_VERSION}. Update the "
            "HY-WU node pack (ComfyUI Manager, or git pull in custom_nodes/ComfyUI-HY-WU) and restart ComfyUI.",
            "newer_version")
    if version < 1:
        raise GeneratorFileError(f"{label}: generator metadata 'hywu.format_version' is {version}. {REMEDY}", "metadata")
    return version


def _loads(meta, key, fail):
    try:
        return json.loads(meta[key])
    except ValueError as e:
        reason = str(e)[:80]
    fail(f"'{key}' is not valid JSON ({reason})")  # outside the except: one error, no chained traceback


def _json_object(meta, key, fail) -> dict:
    value = _loads(meta, key, fail)
    if not isinstance(value, dict):
        fail(f"'{key}' must be a JSON object")
    return value


def _json_list(meta, key, fail) -> list:
    value = _loads(meta, key, fail)
    if not isinstance(value, list):
        fail(f"'{key}' must be a JSON list")
    return value


def _number(meta, key, rule: Rule, fail):
    try:
        value = float(meta[key]) if rule.kind == "number" else int(meta[key])
    except ValueError:
        value = meta[key]
    problem = rule.problem(value)
    if problem:
        fail(f"'{key}' {problem}")
    return value


def _check_fields(data, rules: dict[str, Rule], where: str, fail, required: bool = False) -> None:
    if not isinstance(data, dict):
        fail(f"{where} must be a JSON object")
    unknown = sorted(set(data) - set(rules))
    if unknown:
        fail(f"{where} has unknown field(s) {', '.join(map(str, unknown[:5]))}")
    if required:
        absent = [k for k in rules if k not in data]
        if absent:
            fail(f"{where} lacks {', '.join(absent)}")
    for key, value in data.items():
        problem = rules[key].problem(value)
        if problem:
            fail(f"{where} field '{key}' {problem}")
