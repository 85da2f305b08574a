"""The demo's edit-direction and image-quality figures (issue 16): pair accuracy on hand-made
outputs, the printed tables, and bench/conflict.py's per-seed figures and acceptance checks, on
made-up metrics and in a --quick run (every stage of the bench, figures meaningless)."""

import importlib.util
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "scripts")]

import hywu_demo_core as D  # noqa: E402
from trainer import synthetic  # noqa: E402

PAIRS = [f"{a}|{b}" for a, b in synthetic.CONFLICT_PAIRS]


def _conflict_bench():
    # imported by path: "conflict" is a name another package next to the checkout may have
    spec = importlib.util.spec_from_file_location("hywu_bench_conflict", REPO / "bench" / "conflict.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _data(tasks, per_task=3):
    ex = synthetic.make_examples("val", per_task * len(tasks), seed=2, tasks=tasks)
    return SimpleNamespace(src=np.stack([np.asarray(e.source) for e in ex]),
                           tgt=np.stack([np.asarray(e.target) for e in ex]), tasks=[e.task for e in ex])


def _partner_targets(data):
    return np.stack([synthetic.apply_task(synthetic.CONFLICT_PARTNER[t], s) for t, s in zip(data.tasks, data.src)])


def test_pair_accuracy_counts_the_edits_that_went_their_own_way():
    data = _data(list(synthetic.ADAPTER_TASKS))
    own = D.pair_accuracy(data.tgt, data)
    assert own == {p: 1.0 for p in PAIRS}  # the own target: every edit right
    conflicting = [i for i, t in enumerate(data.tasks) if t in synthetic.CONFLICT_PARTNER]
    partner = data.tgt.copy()
    partner[conflicting] = _partner_targets(SimpleNamespace(src=data.src[conflicting],
                                                            tasks=[data.tasks[i] for i in conflicting]))
    assert D.pair_accuracy(partner, data) == {p: 0.0 for p in PAIRS}  # the partner's target: every edit wrong
    # brighten right, darken wrong: half of that pair; the others untouched
    mixed = data.tgt.copy()
    dark = [i for i, t in enumerate(data.tasks) if t == "darken"]
    mixed[dark] = np.stack([synthetic.apply_task("brighten", data.src[i]) for i in dark])
    acc = D.pair_accuracy(mixed, data)
    assert acc["brighten|darken"] == 0.5 and all(acc[p] == 1.0 for p in PAIRS[1:])
    s = D.summarise(mixed, data, synthetic.ADAPTER_TASKS)
    assert s["pair_accuracy"] == acc and s["pair_accuracy_min"] == 0.5


def test_pair_accuracy_is_closer_not_sharper_and_skips_absent_pairs():
    data = _data(["shift_left", "shift_right", "grayscale"])
    assert set(D.pair_accuracy(data.src, data)) == {"shift_left|shift_right"}  # only the pair present
    # a blurred own target is still closer to it than to the opposite shift
    blurred = data.tgt.astype(np.float64)
    blurred = ((blurred + np.roll(blurred, 1, 1) + np.roll(blurred, -1, 1) + np.roll(blurred, 1, 2)
                + np.roll(blurred, -1, 2)) / 5).round().astype(np.uint8)
    assert D.pair_accuracy(blurred, data) == {"shift_left|shift_right": 1.0}
    # a flat source: both shifts leave it unchanged, the output is as close to either: a tie counts as wrong
    flat = data.src.copy()
    flat[:] = 128
    flat_data = SimpleNamespace(src=flat, tgt=np.stack([synthetic.apply_task(t, x) for t, x in zip(data.tasks, flat)]),
                                tasks=data.tasks)
    assert D.pair_accuracy(flat_data.tgt, flat_data) == {"shift_left|shift_right": 0.0}
    none = _data(["grayscale", "sepia"])
    s = D.summarise(none.tgt, none, ["grayscale", "sepia"])
    assert s["pair_accuracy"] == {} and s["pair_accuracy_min"] is None


def _metrics(gain=4.0, acc=0.97, ssim_hywu=0.8):
    """A made-up evaluate() result for one split, with the figures that matter set."""
    def row(psnr_c, ssim, pa):
        g = {"psnr": psnr_c, "ssim": ssim, "n": 10}
        return {"per_task": {}, "conflicting": g, "non_conflicting": dict(g), "overall": dict(g),
                "pair_accuracy": {p: pa for p in PAIRS}, "pair_accuracy_min": pa}
    return {"base": row(15.0, 0.5, 0.5), "shared_lora": row(18.0, 0.6, 0.7), "per_task_lora": row(18.0 + gain + 1, 0.85, 1.0),
            "hywu": row(18.0 + gain, ssim_hywu, acc), "vae_ceiling": row(28.0, 0.95, 1.0), "identity": row(17.0, 0.72, 0.5)}


def test_bench_figures_and_the_issue_16_checks():
    bench = _conflict_bench()
    good = {s: _metrics() for s in bench.SPLITS}
    fig = bench.seed_figures(good, {"hywu": {"eta2": 0.9}, "per_task_lora": {"eta2": 1.0}})
    for split in bench.SPLITS:
        for method in ("base", "shared_lora", "per_task_lora", "hywu"):
            assert all(fig[f"{split}/{method}/pair_accuracy/{p}"] == good[split][method]["pair_accuracy"][p] for p in PAIRS)
            assert f"{split}/{method}/pair_accuracy_min" in fig and f"{split}/{method}/ssim_overall" in fig
        assert fig[f"{split}/identity/ssim_overall"] == 0.72
        assert fig[f"{split}/hywu_minus_identity/ssim_overall"] == pytest.approx(0.8 - 0.72)
        assert fig[f"{split}/gap_closed"] == pytest.approx(0.8)
    base_ok = {"base": {"ssim": 0.9}}
    checks = bench.acceptance([fig, fig], base_ok)
    assert set(checks) == {"issue 8", "issue 16"} and all(checks["issue 16"].values()), checks
    assert not any("dev_phrasing" in k for c in checks.values() for k in c)  # dev chooses, it does not accept
    assert len(checks["issue 16"]) == 7

    def failed(per_seed, base=base_ok):
        return sorted(k for k, v in bench.acceptance(per_seed, base)["issue 16"].items() if not v)

    # one pair below 95% in one seed of one split fails that split's check only
    bad = {s: _metrics() for s in bench.SPLITS}
    bad["heldout_phrasing"]["hywu"]["pair_accuracy"]["warm|cool"] = 0.9
    bad["heldout_phrasing"]["hywu"]["pair_accuracy_min"] = 0.9
    assert failed([fig, bench.seed_figures(bad, {})]) == ["heldout_phrasing: HY-WU pair accuracy >= 95% on every conflicting pair"]
    low = bench.seed_figures({s: _metrics(gain=2.5, ssim_hywu=0.7) for s in bench.SPLITS}, {})
    # +2.5 dB of a +3.5 dB gap (71%), SSIM below the source's: the val dB and SSIM checks fail, not the gap
    assert set(failed([low])) == {"val: HY-WU SSIM to the target on the adapter tasks >= the source's (no edit)",
                                  "val: HY-WU beats the shared LoRA by >= 3.0 dB on conflicting tasks"}
    assert failed([fig], {"base": {"ssim": 0.8}}) == ["base: SSIM >= 0.85 on its own pretraining tasks"]
    only_val = bench.acceptance([fig], None, ["val"])["issue 16"]
    assert only_val and all(k.startswith("val:") for k in only_val)


def test_the_printed_tables_have_pair_accuracy_and_ssim():
    tasks = list(synthetic.ADAPTER_TASKS)
    metrics = {s: _metrics() for s in ("val", "heldout_phrasing", "dev_phrasing")}
    text = D.format_table(metrics, tasks)
    assert "split 'dev_phrasing'" not in text  # the demo's splits by default
    lines = text.splitlines()
    head = [i for i, x in enumerate(lines) if x.startswith("Pair accuracy")]
    assert len(head) == 2
    cols = lines[head[0] + 1].split()
    assert cols[:6] == ["method", "bright/darken", "warm/cool", "sh_left/right", "hue_fw/bw", "min"], cols
    hywu = next(x for x in lines[head[0]:] if x.startswith("HY-WU"))
    assert hywu.split()[1:] == ["97%"] * 5 + ["|", "0.800", "0.800", "0.800"], hywu
    assert "split 'dev_phrasing'" in D.format_table(metrics, tasks, splits=("dev_phrasing",))


def test_conflict_bench_quick_run(micro_base, tmp_path):
    """Every stage of bench/conflict.py at the demo's --quick sizes: the three splits scored, the
    base's SSIM, per-seed pair accuracy and SSIM, and both issues' checks in strict-enough JSON."""
    import torch

    torch.set_num_threads(1)
    bench = _conflict_bench()
    out = tmp_path / "conflict.json"
    r = bench.main(["--quick", "--seeds", "1", "--models", str(tmp_path / "models"),
                    "--micro", str(micro_base.diffusers_dir), "--out", str(out)])
    assert json.loads(out.read_text())["acceptance"] == r["acceptance"]
    assert r["splits"] == ["val", "dev_phrasing", "heldout_phrasing"]
    seed = r["per_seed"][0]
    for split in r["splits"]:
        for method in ("base", "shared_lora", "per_task_lora", "hywu"):
            assert 0 <= seed[f"{split}/{method}/pair_accuracy_min"] <= 1
            assert all(0 <= seed[f"{split}/{method}/pair_accuracy/{p}"] <= 1 for p in PAIRS)
        assert -1 <= seed[f"{split}/hywu/ssim_overall"] <= 1 and -1 <= seed[f"{split}/identity/ssim_overall"] <= 1
    e = r["base_editor"]
    assert e["tasks"] == list(synthetic.BASE_TASKS) and -1 <= e["base"]["ssim"] <= 1
    assert set(e["base"]["ssim_per_task"]) == set(synthetic.BASE_TASKS)
    assert all(isinstance(v, bool) for c in r["acceptance"].values() for v in c.values())
    assert "base: SSIM >= 0.85 on its own pretraining tasks" in r["acceptance"]["issue 16"]
    assert math.isfinite(r["summary"]["val/hywu/pair_accuracy_min"]["mean"])


def test_world_setting_overrides_are_typed():
    """--set KEY=VALUE (the demo, bench/conflict.py, the memory benches): typed like the field,
    booleans read true/false (bool("false") would be True), an unknown key names the known ones."""
    s = D.WorldSettings().with_overrides(["text_sparse=false", "base_steps=12", "base_snr_gamma=0"])
    assert s.text_sparse is False and s.base_steps == 12 and s.base_snr_gamma == 0.0
    assert D.WorldSettings().with_overrides(["text_sparse=true"]).text_sparse is True
    assert s.key() != D.WorldSettings().key()  # a changed setting is a different cached base
    with pytest.raises(SystemExit, match="unknown world setting 'base_stepz'.*base_steps"):
        D.WorldSettings().with_overrides(["base_stepz=3"])
    with pytest.raises(SystemExit, match="'text_sparse' is true or false"):
        D.WorldSettings().with_overrides(["text_sparse=maybe"])
