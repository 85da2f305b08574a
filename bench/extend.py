#!/usr/bin/env python
"""Extending a trained generator with new edits without forgetting (issue 17), over seeds, as JSON.

On the frozen demo base (scripts/hywu_demo_core.py), per seed, every run by `python -m trainer.train`
(trainer/configs/demo.yaml, one batch size, rank and layer set):
  1. HY-WU, a shared LoRA and per-task LoRAs on six old adapter tasks (``--old``);
  2. HY-WU extended with two new tasks (``--new``; shift_right conflicts with the old shift_left)
     by ``--init-from`` the step-1 generator: without replay, with 10% replay of the old data
     (``data.replay``), and with 10% replay plus ``data.replay.distill`` (``--distill``) over
     ``--distill-rows`` rows of all the old data per batch; every HY-WU extension keeps the file's
     shared rank (``train.freeze_shared_rank``; ``--no-freeze-shared-rank`` trains it); the shared
     LoRA continued on the new tasks (``--init-from`` its file, ``--method shared_lora``); per-task
     LoRAs for the new tasks added to the old ones;
  3. HY-WU trained jointly on all eight tasks (the reference for the new tasks' gain).
Scored on the val split (val images, training phrasings; PSNR to the exact targets) per task, on
the old and the new tasks, with "no edit" (the source itself). The targets of issue 17:
  * HY-WU with 10% replay loses at most 0.3 dB on the old tasks (step 1 -> step 2);
  * it reaches >= 90% of the joint model's gain over "no edit" on the new tasks;
the shared LoRA's forgetting is reported beside it.

    python bench/extend.py                       # 3 seeds, 300 + 150 steps (CPU: see README for times)
    python bench/extend.py --seeds 1 --steps 150 --extend-steps 75      # a reduced run
    python bench/extend.py --quick --models /tmp/m --micro models/micro_sd15_ip2p   # shows it runs
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import memory_world as W  # noqa: E402

D, demo = W.D, W.demo

OLD = ("brighten", "darken", "warm", "cool", "shift_left", "grayscale")
NEW = ("shift_right", "sepia")  # shift_right conflicts with the old shift_left


def seed_figures(m: dict, old, new) -> dict:
    """Figures of one seed from the val metrics of every variant."""
    g = {k: {"old": W.group_psnr(v, old), "new": W.group_psnr(v, new)} for k, v in m.items()}
    out = {f"{k}/{grp}": v for k, d in g.items() for grp, v in d.items()}
    for method, before in (("hywu", "hywu_old"), ("shared_lora", "shared_old")):
        for after in [k for k in g if k.startswith(method.split("_")[0] + "_") and k not in (before, "hywu_joint")]:
            out[f"forgetting/{after}"] = g[before]["old"] - g[after]["old"]  # dB lost on the old tasks
    joint_gain = g["hywu_joint"]["new"] - g["identity"]["new"]
    for k in g:
        if k not in ("identity", "vae_ceiling"):
            gain = g[k]["new"] - g["identity"]["new"]
            out[f"new_gain_vs_joint/{k}"] = gain / joint_gain if joint_gain > 0 else float("nan")
    return out


def acceptance(per_seed: list[dict]) -> dict:
    def every(key, ok):
        vals = [s[key] for s in per_seed if key in s]
        return bool(vals) and all(ok(v) for v in vals)

    out = {}
    for run, label in (("hywu_ext_replay", "HY-WU + 10% replay"), ("hywu_ext_replay_distill", "HY-WU + 10% replay + distill")):
        if any(f"forgetting/{run}" in s for s in per_seed):
            out[f"{label} loses <= 0.3 dB on the old tasks"] = every(f"forgetting/{run}", lambda v: v <= 0.3)
            out[f"{label} reaches >= 90% of the joint model's new-task gain over no edit"] = \
                every(f"new_gain_vs_joint/{run}", lambda v: v >= 0.9)
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    W.add_world_args(ap)
    ap.add_argument("--old", default=",".join(OLD))
    ap.add_argument("--new", default=",".join(NEW))
    ap.add_argument("--per-task-rows", type=int, default=100, help="training rows per task (demo.yaml: 1000 for 10 tasks)")
    ap.add_argument("--steps", type=int, default=300, help="steps of the old-task and joint runs (demo.yaml: 600)")
    ap.add_argument("--extend-steps", type=int, default=150, help="steps of every extension run")
    ap.add_argument("--replay", type=float, default=0.1)
    ap.add_argument("--distill", type=float, default=1.0,
                    help="also extend with replay + data.replay.distill of this weight (0: skip that run)")
    ap.add_argument("--distill-rows", type=int, default=16,
                    help="data.replay.distill_rows of that run: rows of all the old data per batch for the distillation alone (0: off)")
    ap.add_argument("--freeze-shared-rank", action=argparse.BooleanOptionalAction, default=True,
                    help="train.freeze_shared_rank in the HY-WU extensions: the shared rank stays the first run's")
    ap.add_argument("--extend-train", action="append", default=[], metavar="--SECTION.KEY=VALUE",
                    help="trainer override for the continued runs only (HY-WU extensions, shared LoRA continued), "
                         "e.g. --extend-train=--train.lr=3e-4; the per-task LoRAs for the new tasks start fresh")
    a = ap.parse_args(argv)
    clock, timer = W.Clock(), demo.Timer()
    old, new = [t for t in a.old.split(",") if t], [t for t in a.new.split(",") if t]
    if a.quick:
        a.per_task_rows, a.steps, a.extend_steps, a.eval_per_task, a.sample_steps = 3, 2, 1, 1, 2
    s = W.settings(a.quick)
    models, device = W.models_dir(a), W.device_of(a.device)
    base_dir = W.ensure_base(s, models, a.micro)
    common = (W.QUICK_TRAIN if a.quick else []) + list(a.train)
    rows = lambda tasks: f"--data.n_train={a.per_task_rows * len(tasks)}"  # noqa: E731
    world = D.World(base_dir, device)
    tasks = old + new
    split = D.make_split(world, "val", a.eval_per_task * len(tasks), tasks, 0, s.resolution)
    per_seed, runs_info = [], []
    for seed in range(a.first_seed, a.first_seed + a.seeds):
        def job(methods, extra, steps):
            return (methods, [*common, f"--max-steps={steps}", *extra])

        def cont(methods, extra):  # continues a file: the extension overrides come last, so they win
            return job(methods, [*extra, *a.extend_train], a.extend_steps)

        def run(*jobs):
            return W.train_jobs(base_dir, models, seed, list(jobs), device, timer, a.force, inprocess=a.quick)

        old_data, ext_data = [W.tasks_arg(old), rows(old)], [W.tasks_arg(new), rows(new)]
        gen_old, static_old, joint = run(job(("hywu",), old_data, a.steps), job(("shared_lora", "per_task_lora"), old_data, a.steps),
                                         job(("hywu",), [W.tasks_arg(tasks), rows(tasks)], a.steps))
        replay = [f"--data.replay.fraction={a.replay}",
                  f"--data.replay.sources=[{{source: synthetic, tasks: [{', '.join(old)}], n_train: {a.per_task_rows * len(old)}}}]"]
        gen0, shared0 = W.run_file(gen_old["hywu"], "hywu"), W.run_file(static_old["shared_lora"], "shared_lora")
        ext_data_h = [*ext_data, *(["--train.freeze_shared_rank=true"] if a.freeze_shared_rank else [])]  # HY-WU only
        distill = [cont(("hywu",), [*ext_data_h, f"--init-from={gen0}", *replay, f"--data.replay.distill={a.distill}",
                                    *([f"--data.replay.distill_rows={a.distill_rows}"] if a.distill_rows else [])])
                   ] if a.distill > 0 else []
        ext, ext_r, shared_c, added, *ext_d = run(cont(("hywu",), [*ext_data_h, f"--init-from={gen0}"]),
                                                  cont(("hywu",), [*ext_data_h, f"--init-from={gen0}", *replay]),
                                                  cont(("shared_lora",), [*ext_data, f"--init-from={shared0}"]),
                                                  job(("per_task_lora",), ext_data, a.extend_steps), *distill)
        first = {**gen_old, **static_old}
        variants = {
            "hywu_old": {"hywu": W.run_file(first["hywu"], "hywu")},
            "hywu_ext": {"hywu": W.run_file(ext["hywu"], "hywu")},
            "hywu_ext_replay": {"hywu": W.run_file(ext_r["hywu"], "hywu")},
            **({"hywu_ext_replay_distill": {"hywu": W.run_file(ext_d[0]["hywu"], "hywu")}} if ext_d else {}),
            "hywu_joint": {"hywu": W.run_file(joint["hywu"], "hywu")},
            "shared_old": {"shared_lora": shared0},
            "shared_cont": {"shared_lora": W.run_file(shared_c["shared_lora"], "shared_lora")},
        }
        methods = {"base": D.Method("base")}
        for name, files in variants.items():
            methods[name] = next(v for k, v in D.load_methods(world, files, tasks).items() if k != "base")
        per_task = {t: W.run_file(first["per_task_lora"], "per_task_lora", t) for t in old}
        per_task.update({t: W.run_file(added["per_task_lora"], "per_task_lora", t) for t in new})
        methods["per_task_added"] = D.load_methods(world, {"per_task_lora": per_task}, tasks)["per_task_lora"]
        metrics, _ = D.evaluate(world, {"val": split}, methods, tasks, a.sample_steps, 1.0, seed, show=False)
        per_seed.append(seed_figures(metrics["val"], old, new))
        runs_info.append({"seed": seed, "runs": {k: str(v) for k, v in {**{f"first/{m}": p for m, p in first.items()},
                                                                          "joint": joint["hywu"], "ext": ext["hywu"],
                                                                          "ext_replay": ext_r["hywu"],
                                                                          **({"ext_replay_distill": ext_d[0]["hywu"]} if ext_d else {}),
                                                                          "shared_cont": shared_c["shared_lora"],
                                                                          "per_task_new": added["per_task_lora"]}.items()}})
        print({k: round(v, 3) for k, v in per_seed[-1].items()}, file=sys.stderr, flush=True)
    keys = sorted({k for p in per_seed for k in p})
    result = {
        "benchmark": "extend", "quick": a.quick, "seeds": [r["seed"] for r in runs_info], "old_tasks": old, "new_tasks": new,
        "sizes": {"rows_per_task": a.per_task_rows, "steps": a.steps, "extend_steps": a.extend_steps, "replay": a.replay,
                  "distill": a.distill, "distill_rows": a.distill_rows, "freeze_shared_rank": a.freeze_shared_rank,
                  "eval_images_per_task": a.eval_per_task, "sampler_steps": a.sample_steps},
        "trainer_overrides": common, "extend_overrides": a.extend_train, "world": s.key(),
        "summary": {k: W.stats([p[k] for p in per_seed if k in p]) for k in keys},
        "acceptance": acceptance(per_seed), "per_seed": per_seed, "runs": runs_info,
        "seconds": clock.seconds(), "timings_s": timer.stages,
    }
    W.write(result, a.out)
    return W._finite(result)


if __name__ == "__main__":
    main()
