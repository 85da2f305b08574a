"""bench/extend.py and bench/compose.py (issue 17) at their --quick size: every run is made by the
trainer's own command line (in-process), the JSON has every figure and acceptance check, and the
runs are what the benches say (an extended generator records its parent, replay rows were mixed,
the merged oracle pair is the sum of the two per-task LoRAs). The figures of a quick run mean
nothing (a world trained for a few steps); the full-size figures are in the README."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "bench"), str(REPO / "scripts"), str(REPO)]


@pytest.fixture(scope="module")
def models():
    """The quick world is cached under models/ (git-ignored; built on first use, about a minute);
    the runs are trained anew every time."""
    import shutil

    import hywu_demo_core as D

    root = REPO / "models" / "bench_quick"
    shutil.rmtree(root / "demo" / "runs", ignore_errors=True)
    shutil.rmtree(root / "demo" / "encoded", ignore_errors=True)
    # where `make demo`'s base lives, a stand-in of it (its settings key is make demo's): a quick
    # bench must build its own base beside it, never replace it (issue 36)
    full = root / "demo" / "base"
    shutil.rmtree(full, ignore_errors=True)
    full.mkdir(parents=True)
    (full / "hywu_demo_base.json").write_text(json.dumps({"settings_key": D.WorldSettings().key(), "stand_in": 1}))
    return root


def _full_base(models) -> dict:
    return {p.name: p.read_bytes() for p in (models / "demo" / "base").iterdir()}


def _quick(module, models, micro_base, tmp_path, *extra):
    torch.set_num_threads(1)  # OpenMP threads spin on shared cores (torch is imported before OMP_WAIT_POLICY is set)
    out = tmp_path / f"{module.__name__}.json"
    full = _full_base(models)
    result = module.main(["--quick", "--seeds", "1", "--models", str(models), "--micro", str(micro_base.diffusers_dir),
                          "--out", str(out), *extra])
    assert json.loads(out.read_text()) == result  # strict JSON (NaN written as null)
    assert _full_base(models) == full, "a quick run changed the full run's base (models/demo/base)"
    assert list((models / "demo").glob("base-*/hywu_demo_base.json")), "the quick base is not in its own folder"
    return result


def test_extend_quick(models, micro_base, tmp_path):
    import extend

    from hywu_nodes.core import read_generator_info

    r = _quick(extend, models, micro_base, tmp_path, "--extend-train=--train.lr=5e-4", "--distill-rows", "2")
    assert r["benchmark"] == "extend" and r["old_tasks"] == list(extend.OLD) and r["new_tasks"] == list(extend.NEW)
    fig = r["per_seed"][0]
    for v in ("hywu_old", "hywu_ext", "hywu_ext_replay", "hywu_ext_replay_distill", "hywu_joint", "shared_old", "shared_cont", "per_task_added",
              "identity", "vae_ceiling"):
        for grp in ("old", "new"):
            assert math.isfinite(fig[f"{v}/{grp}"]), (v, grp)
    for k in ("forgetting/hywu_ext", "forgetting/hywu_ext_replay", "forgetting/hywu_ext_replay_distill",
              "forgetting/shared_cont"):
        assert math.isfinite(fig[k])
    assert set(r["acceptance"]) == {f"HY-WU + 10% replay{d} {what}" for d in ("", " + distill") for what in (
        "loses <= 0.3 dB on the old tasks", "reaches >= 90% of the joint model's new-task gain over no edit")}
    runs = {k: Path(v) for k, v in r["runs"][0]["runs"].items()}
    parent = read_generator_info(runs["first/hywu"] / "hywu_demo.safetensors")
    parent_t = load_file(runs["first/hywu"] / "hywu_demo.safetensors")
    shared = [n for n in parent_t if n.startswith(("shared_a.", "shared_b."))]  # frozen in the extensions by default
    assert r["sizes"]["freeze_shared_rank"] and shared
    for k in ("ext", "ext_replay", "ext_replay_distill"):
        info = read_generator_info(runs[k] / "hywu_demo.safetensors")
        assert info.extra["init_from"]["kind"] == "generator" and info.config == parent.config
        assert info.target_spec.fingerprint == parent.target_spec.fingerprint
        ext_t = load_file(runs[k] / "hywu_demo.safetensors")
        assert all(torch.equal(parent_t[n], ext_t[n]) for n in shared), k
    summaries = {k: json.loads((runs[k] / "summary.json").read_text()) for k in ("ext", "ext_replay", "ext_replay_distill")}
    assert summaries["ext"]["replay_rows"] == 0 and summaries["ext_replay"]["replay_rows"] > 0
    assert summaries["ext_replay"]["replay_distill_last"] is None
    assert runs["ext_replay_distill"] != runs["ext_replay"] and summaries["ext_replay_distill"]["replay_rows"] > 0
    # --distill-rows reaches the distillation run only: 2 more replay rows for the term in its one step
    assert r["sizes"]["distill_rows"] == 2 and summaries["ext_replay_distill"]["replay_distill_rows_seen"] >= 2
    assert summaries["ext_replay"]["replay_distill_rows_seen"] is None
    shared = json.loads((runs["shared_cont"] / "summary.json").read_text())
    assert shared["method"] == "shared_lora" and shared["init_from"]["kind"] == "lora"

    def base_lr(run):  # the LR schedule's base rate, from the run's last checkpoint
        (state,) = sorted(run.glob("checkpoints/step-*/state.json"))[-1:]
        return json.loads(state.read_text())["scheduler"]["base_lrs"]

    # --extend-train reaches the continued runs only; the first runs and the fresh per-task LoRAs keep demo.yaml's
    assert r["extend_overrides"] == ["--train.lr=5e-4"]
    for k in ("ext", "ext_replay", "ext_replay_distill", "shared_cont"):
        assert base_lr(runs[k]) == [5e-4], k
    for k in ("first/hywu", "per_task_new"):
        assert base_lr(runs[k]) != [5e-4], k


def test_compose_quick(models, micro_base, tmp_path):
    import compose

    r = _quick(compose, models, micro_base, tmp_path, "--grid", str(tmp_path / "grid.png"), "--ceiling")
    fig = r["per_seed"][0]
    for g in ("heldout_combos", "trained_combos", "singles"):
        for m in (*compose.METHODS, "base", "identity", "vae_ceiling"):
            assert math.isfinite(fig[f"{g}/{m}"]), (g, m)
    for g in ("heldout_combos", "trained_combos"):
        for m in ("hywu_single_pair", "hywu_single_pair_shared_once"):
            assert math.isfinite(fig[f"{g}/{m}"]), (g, m)
    assert math.isfinite(fig["heldout_combos/combo_lora"]) and "trained_combos/combo_lora" not in fig
    assert r["heldout_combinations"] == list(compose.S.COMPOSED_HELDOUT)
    assert not set(r["heldout_combinations"]) & set(r["trained_combinations"])
    assert len(r["acceptance"]) == 4 and (tmp_path / "grid.png").stat().st_size > 0
    runs = r["runs"][0]["runs"]
    single = json.loads((Path(runs["single/hywu"]) / "summary.json").read_text())
    combo = json.loads((Path(runs["combo/hywu"]) / "summary.json").read_text())
    chained = json.loads((Path(runs["chained/hywu"]) / "summary.json").read_text())
    assert single["steps"] == combo["steps"] == chained["steps"]  # one budget
    # same seed and budget; the chaining (and the single tasks' share) differs, and it changed what was learnt
    combo_w, chained_w = (load_file(str(Path(runs[k]) / "hywu_demo.safetensors")) for k in ("combo/hywu", "chained/hywu"))
    assert combo_w.keys() == chained_w.keys() and not all(torch.equal(combo_w[k], chained_w[k]) for k in combo_w)
    check_merged(compose, r)
    check_clause_pair(compose, r)
    ceiling = json.loads((Path(runs["ceiling/combo_lora"]) / "summary.json").read_text())
    assert ceiling["method"] == "per_task_lora" and ceiling["steps"] == single["steps"]


def test_compose_dev_quick(models, micro_base, tmp_path):
    """The dev split is carved from the trained combinations: disjoint from the held-out ones, left
    out of the chained runs' training, every dev combination's tasks trained in other combinations."""
    import compose_dev

    r = _quick(compose_dev, models, micro_base, tmp_path, "--single-repeats", "1,2")  # two k: the choice between them
    dev, trained = set(r["dev_combinations"]), set(r["trained_combinations"])
    S = compose_dev.S
    assert dev <= set(S.COMPOSED_TRAIN) and not dev & trained and not dev & set(S.COMPOSED_HELDOUT)
    assert {p for c in dev for p in S.parts(c)} == set(compose_dev.C.SINGLES)
    assert all(any(p in S.parts(t) for t in trained) for c in dev for p in S.parts(c))
    fig = r["per_seed"][0]
    for g in ("dev_combos", "singles"):
        for m in ("merged_pair", "chained_x1", "chained_x2"):
            assert math.isfinite(fig[f"{g}/{m}"]), (g, m)
    assert r["choice"] in (1, 2)
    runs = r["runs"][0]["runs"]
    x1, x2 = (load_file(str(Path(runs[f"chained_x{k}"]) / "hywu_demo.safetensors")) for k in (1, 2))
    assert x1.keys() == x2.keys() and not all(torch.equal(x1[k], x2[k]) for k in x1)  # another share of the rows


def check_clause_pair(compose, r):
    """hywu_single_pair: the single-task generator run on each part's own sentence, the two LoRAs
    summed; shared_once drops the second LoRA's shared rank."""
    import hywu_demo_core as D

    from hywu_nodes.core import load_generator

    runs = r["runs"][0]["runs"]
    import memory_world as W

    models = Path(runs["single/hywu"]).parents[2]  # <models>/demo/runs/<run>
    world = D.World(D.base_dir_for(models, W.settings(True)), "cpu")
    gen, _ = load_generator(str(Path(runs["single/hywu"]) / "hywu_demo.safetensors"))
    combos = list(compose.S.COMPOSED_HELDOUT)
    data = D.make_split(world, "val", len(combos), combos, 0, 32)
    clauses = [compose.clause_split(world, data, k) for k in range(2)]
    for i, t in enumerate(data.tasks):  # each clause is a training sentence of that part alone
        for k, part in enumerate(compose.S.parts(t)):
            assert clauses[k].instructions[i] in compose.S.PHRASINGS[part]["train"], (t, k)
    assert torch.equal(clauses[0].src_lat, data.src_lat)
    pair = compose.ClausePair(gen, clauses).lora_for(data, slice(0, 2))
    once = compose.ClausePair(gen, clauses, shared_once=True).lora_for(data, slice(0, 2))
    shared = gen.config.shared_rank
    assert shared > 0 and once.rank == pair.rank - shared
    with torch.no_grad():
        first, second = (gen(D.condition(gen.condition_spec, c, slice(0, 2))) for c in clauses)
    for k, (a, b) in pair.weights.items():
        want = first.weights[k][1] @ first.weights[k][0] + second.weights[k][1] @ second.weights[k][0]
        assert torch.allclose(b @ a, want, rtol=1e-4, atol=1e-6), k
        oa, ob = once.weights[k]
        shared_part = second.weights[k][1][..., -shared:] @ second.weights[k][0][:, -shared:]
        assert torch.allclose(ob @ oa, want - shared_part, rtol=1e-4, atol=1e-6), k


def check_merged(compose, r):
    """merged_pair's LoRA for a combination makes the sum of its two tasks' updates."""
    import hywu_demo_core as D
    from safetensors.torch import load_file

    from hywu_nodes.core import build_target_spec, from_lora_state_dict

    runs = r["runs"][0]["runs"]
    import memory_world as W

    models = Path(runs["single/hywu"]).parents[2]  # <models>/demo/runs/<run>
    world = D.World(D.base_dir_for(models, W.settings(True)), "cpu")
    files = {t: Path(runs["single/per_task_lora"]) / f"hywu_demo-{t}.safetensors" for t in compose.SINGLES}
    combo = compose.S.COMPOSED_HELDOUT[0]
    merged = compose.merged_pairs(world, files, [combo]).lora
    spec = build_target_spec(world.unet, "sd15_ip2p")
    a, b = (from_lora_state_dict(load_file(str(files[p])), "sd15_ip2p", spec) for p in compose.S.parts(combo))
    for k, (ma, mb) in merged.weights.items():
        want = a.scale * (a.weights[k][1][0] @ a.weights[k][0][0]) + b.scale * (b.weights[k][1][0] @ b.weights[k][0][0])
        assert torch.allclose(merged.scale * mb[0] @ ma[0], want, rtol=1e-5, atol=1e-9)
    assert float(want.abs().max()) > 0  # trained (one step): the check compares something
