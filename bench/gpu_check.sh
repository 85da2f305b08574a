#!/usr/bin/env bash
# One-command GPU check: about 5-8 minutes on one GPU, prints one JSON object (also written to
# output/gpu_check/gpu_check.json). Runs unchanged after the README's install commands:
#   make venv TORCH_INDEX=https://download.pytorch.org/whl/cu128 && make comfyui && bash bench/gpu_check.sh
# Everything is built from seeds (full-size architectures with RANDOM weights); nothing is downloaded.
#   1. SD1.5-full trainer in bf16: HY-WU vs shared-LoRA step time and peak memory (bench/train_step.py), and the
#      HY-WU step on the base stored in fp8 (base.weight_dtype fp8_scaled) against bf16
#   2. FSDP (trainer/sharding.py): generator + frozen base sharded over 1 process (2 with 2+ GPUs),
#      against a plain run, and its sharded checkpoint resumed in 1 plain process; block swap (4 of the UNet's
#      8 down/up blocks in pinned CPU memory, train.blocks_to_swap) against the plain run
#   3. the ComfyUI graph on the GPU at 512 px, 20 steps: Generate LoRA's share of the run, and the
#      generator offloaded after Generate LoRA (bench/gpu_comfy.py)
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-output/gpu_check}
CFG=trainer/configs/sd15_full_synthetic.yaml
rm -rf "$OUT" && mkdir -p "$OUT"
START=$(date +%s)
NGPU=$("$PY" -c "import torch; print(min(2, torch.cuda.device_count()))")
if [ "$NGPU" -lt 1 ]; then echo '{"ok": false, "error": "no CUDA device visible"}'; exit 1; fi
TORCHRUN=$(dirname "$PY")/torchrun
step() { echo "[gpu_check] $*" >&2; }

step "1/3 train_step sd15-full bf16"
timeout 360 "$PY" bench/train_step.py --base sd15-full --device cuda --precision bf16 --batch 8 --draws 1 \
    --steps 10 --warmup 3 --weight-dtype fp8_scaled --output "$OUT/train_step" > "$OUT/train_step.json" 2> "$OUT/train_step.log"
echo $? > "$OUT/train_step.rc"

step "2/3 FSDP on $NGPU process(es)"
timeout 150 "$PY" -m trainer.train --config "$CFG" --output "$OUT/plain" > "$OUT/plain.log" 2>&1
echo $? > "$OUT/plain.rc"
timeout 180 "$TORCHRUN" --nproc_per_node "$NGPU" --master_addr 127.0.0.1 --master_port 29577 -m trainer.train \
    --config "$CFG" --output "$OUT/fsdp" --train.fsdp=true --train.fsdp_shard_base=true > "$OUT/fsdp.log" 2>&1
echo $? > "$OUT/fsdp.rc"
mkdir -p "$OUT/resume/checkpoints"
cp -r "$OUT/fsdp/checkpoints/step-00000003" "$OUT/resume/checkpoints/" 2>/dev/null && echo step-00000003 > "$OUT/resume/checkpoints/latest"
timeout 150 "$PY" -m trainer.train --config "$CFG" --output "$OUT/resume" --resume > "$OUT/resume.log" 2>&1
echo $? > "$OUT/resume.rc"
timeout 150 "$PY" -m trainer.train --config "$CFG" --output "$OUT/swap" --train.blocks_to_swap=4 > "$OUT/swap.log" 2>&1
echo $? > "$OUT/swap.rc"

step "3/3 ComfyUI graph on the GPU"
timeout 330 "$PY" bench/gpu_comfy.py --device cuda --work "$OUT/comfy" > "$OUT/comfy.json" 2> "$OUT/comfy.log"
echo $? > "$OUT/comfy.rc"

OUT="$OUT" NGPU="$NGPU" ELAPSED=$(( $(date +%s) - START )) "$PY" - <<'PYEOF'
import json, os
from pathlib import Path
out, ngpu = Path(os.environ["OUT"]), int(os.environ["NGPU"])

def part(name):
    rc = int((out / f"{name}.rc").read_text() or 1) if (out / f"{name}.rc").is_file() else None
    try:
        return rc, json.loads((out / f"{name}.json").read_text())
    except (OSError, ValueError):
        log = out / f"{name}.log"
        return rc, {"error": log.read_text(errors="replace")[-1500:] if log.is_file() else "no output"}

def summary(run):
    try:
        return json.loads((out / run / "summary.json").read_text())
    except (OSError, ValueError):
        log = out / f"{run}.log"
        return {"error": log.read_text(errors="replace")[-1500:] if log.is_file() else "no output"}

def rel_diff(a, b):
    from safetensors.torch import load_file
    x, y = load_file(a), load_file(b)
    return max(((x[k].float() - y[k].float()).abs().max() / (x[k].float().abs().max() + 1e-8)).item() for k in x)

import torch
res = {"gpu": torch.cuda.get_device_name(), "gpus_used_for_fsdp": ngpu, "torch": torch.__version__,
       "cuda": torch.version.cuda, "elapsed_s": int(os.environ["ELAPSED"])}
rc, ts = part("train_step")
res["train_step"] = {"rc": rc, **({k: ts.get(k) for k in ("step_time_ratio", "peak_memory_ratio", "batch", "draws_per_example",
                                                          "precision", "components")} if "error" not in ts else ts)}
if "error" not in ts:
    res["train_step"]["hywu"] = {k: ts["hywu"][k] for k in ("median_step_s", "peak_memory_mb")}
    res["train_step"]["shared_lora"] = {k: ts["shared_lora"][k] for k in ("median_step_s", "peak_memory_mb")}
    if "hywu_fp8" in ts:
        res["train_step"]["hywu_fp8"] = {k: ts["hywu_fp8"][k] for k in ("median_step_s", "peak_memory_mb", "step_time_vs_bf16",
                                                                         "peak_memory_vs_bf16")}
plain, fsdp, resume = summary("plain"), summary("fsdp"), summary("resume")
f = {"processes": fsdp.get("processes"), "sharded": fsdp.get("sharded"), "plain_peak_mb": plain.get("peak_memory_mb"),
     "fsdp_peak_mb_rank0": fsdp.get("peak_memory_mb"), "plain_final_loss": plain.get("final_loss"),
     "fsdp_final_loss": fsdp.get("final_loss"), "resumed_from": resume.get("resumed_from")}
for k, s in (("plain", plain), ("fsdp", fsdp), ("resume", resume)):
    if "error" in s:
        f[f"{k}_error"] = s["error"]
try:
    f["fsdp_vs_plain_rel_diff"] = rel_diff(plain["files"][0], fsdp["files"][0])
    f["resume_vs_fsdp_rel_diff"] = rel_diff(fsdp["files"][0], resume["files"][0])
except Exception as e:  # a run failed: its error is above
    f["compare_error"] = repr(e)
res["fsdp"] = f
swap = summary("swap")
res["block_swap"] = {"blocks": 4, "peak_mb": swap.get("peak_memory_mb"), "plain_peak_mb": plain.get("peak_memory_mb"),
                     "final_loss": swap.get("final_loss"), "plain_final_loss": plain.get("final_loss"),
                     "median_step_s": (sorted(swap["step_times"])[len(swap["step_times"]) // 2] if swap.get("step_times") else None),
                     "plain_median_step_s": (sorted(plain["step_times"])[len(plain["step_times"]) // 2] if plain.get("step_times") else None),
                     **({"error": swap["error"]} if "error" in swap else {})}
rc, comfy = part("comfy")
res["comfy"] = {"rc": rc, **comfy}
res["ok"] = bool(res["train_step"]["rc"] == 0 and "fsdp_vs_plain_rel_diff" in f and f["fsdp_vs_plain_rel_diff"] < 5e-2
                 and f["resume_vs_fsdp_rel_diff"] < 5e-2 and f["resumed_from"] == 3 and comfy.get("ok") is True)
text = json.dumps(res, indent=1)
(out / "gpu_check.json").write_text(text)
print(text)
PYEOF
