"""Untrusted generator files, in-process: every crafted case (tests/crafted_files.py) is refused
with one GeneratorFileError that says what is wrong and what to do, before anything large is
allocated; the rule tables cover every field; the memory estimate refuses what does not fit."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
import torch

import crafted_files
from hywu_nodes.core import (
    ConditionSource, GeneratorConfig, GeneratorFileError, LinearTarget, MemoryBudget, load_generator, save_generator,
    standard_condition_spec,
)
from hywu_nodes.core import metadata_schema as schema
from tiny_models import make_generator, tiny_unet

MB = 1024 * 1024


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.safetensors"
    save_generator(path, make_generator(tiny_unet(), "sd15_ip2p", nonzero_b=True))
    return path


@pytest.fixture(scope="module")
def crafted(good, tmp_path_factory):
    return crafted_files.make_all(good, tmp_path_factory.mktemp("crafted"))


def _peak_rss_reset() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM (Linux)
        return True
    except OSError:
        return False


def _rss(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.mark.parametrize("case", sorted(crafted_files.CASES))
def test_crafted_file_is_refused_with_a_remedy(crafted, case):
    path = crafted[case]
    budget = MemoryBudget(ram=4 * 1024 * MB)
    can_reset = _peak_rss_reset()
    before = _rss("VmRSS")
    with pytest.raises(GeneratorFileError) as exc:
        load_generator(path, budget=budget)
    growth = (_rss("VmHWM") if can_reset else _rss("VmRSS")) - before
    msg = str(exc.value)
    for needle in crafted_files.CASES[case][1]:
        assert needle.lower() in msg.lower(), f"{needle!r} not in: {msg}"
    assert str(path.parent) not in msg and msg.startswith(path.name), "messages name the file, not a server path"
    if exc.value.kind != "pickle":
        assert "pickle" not in msg.lower(), f"a {exc.value.kind} file is not a pickle: {msg}"
    assert exc.value.__cause__ is None and exc.value.__context__ is None or exc.value.__suppress_context__
    print(f"{case}: peak RSS +{growth / MB:.1f} MB")
    assert growth < 200 * MB, f"{case}: peak RSS grew by {growth / MB:.0f} MB"


def test_rule_tables_cover_every_field():
    assert set(schema.CONFIG_RULES) == {f.name for f in dataclasses.fields(GeneratorConfig)}
    assert set(schema.TARGET_RULES) == {f.name for f in dataclasses.fields(LinearTarget)}
    assert set(schema.CONDITION_RULES) == {f.name for f in dataclasses.fields(ConditionSource)} - {"options"}
    for source in standard_condition_spec(768, 77, 4, 512).sources:
        assert set(source.options) <= set(schema.CONDITION_OPTION_RULES), source.options
    # the shipped presets pass their own rules
    for preset in ("tiny", "small", "medium", "large"):
        cfg = dataclasses.asdict(GeneratorConfig.from_preset(preset, row_tokens=25))
        assert all(schema.CONFIG_RULES[k].problem(v) is None for k, v in cfg.items()), preset


def test_good_file_loads_with_its_footprint(good):
    gen, info = load_generator(good, budget=MemoryBudget(ram=1024 * MB))
    fp = info.footprint
    assert fp.weights == sum(p.numel() * p.element_size() for p in gen.parameters())
    assert fp.index_tables > 0 and fp.generate > 0 and fp.running == fp.weights + fp.index_tables + fp.generate
    assert info.format_version == 1


def test_memory_budget_refuses_what_does_not_fit(good):
    _, info = load_generator(good)
    fp = info.footprint
    with pytest.raises(GeneratorFileError, match="does not fit: it needs about .* GiB of memory") as exc:
        load_generator(good, budget=MemoryBudget(ram=fp.running - 1))
    assert exc.value.kind == "too_large"
    with pytest.raises(GeneratorFileError, match="on the GPU to run"):
        load_generator(good, dtype=torch.float32, budget=MemoryBudget(ram=fp.loaded, device=fp.running - 1))
    with pytest.raises(GeneratorFileError, match="of RAM to load"):
        load_generator(good, budget=MemoryBudget(ram=fp.loaded - 1, device=10 ** 12))
    load_generator(good, budget=MemoryBudget(ram=fp.loaded, device=fp.running))  # exactly enough


def test_messages_use_the_given_label(crafted):
    with pytest.raises(GeneratorFileError) as exc:
        load_generator(crafted["empty"], label="models/hywu/sub/x.safetensors")
    assert str(exc.value).startswith("models/hywu/sub/x.safetensors is empty")
    assert os.fspath(crafted["empty"]) not in str(exc.value)
