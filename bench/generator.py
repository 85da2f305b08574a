"""Generator size and CPU speed for the full SD1.5 (InstructPix2Pix) target spec.

Prints JSON: parameter tokens, generated LoRA elements and generator parameters per preset;
for the `small` preset, the CPU forward time of one sample and of a batch of 4 (with the
per-sample ratio), and the peak resident memory each forward adds. Each measurement runs in a
fresh process so peaks do not mix. Usage: python bench/generator.py [--presets tiny,small]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from hywu_nodes.core import Condition, GeneratorConfig, HYWUGenerator, build_target_spec, describe, standard_condition_spec  # noqa: E402

RANK, ALPHA, RESOLUTION = 16, 64.0, 512


def sd15_spec():
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):  # full-size config, no weights allocated
        unet = UNet2DConditionModel(in_channels=8, out_channels=4, cross_attention_dim=768)
    return build_target_spec(unet, "sd15_ip2p")


def rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1])
    return 0


def measure(preset: str, batch: int, repeats: int) -> dict:
    """Runs in a child process: build the generator, then time no-grad forwards."""
    torch.manual_seed(0)
    cond_spec = standard_condition_spec(768, 77, 4, RESOLUTION)
    gen = HYWUGenerator(GeneratorConfig.from_preset(preset, rank=RANK, alpha=ALPHA), sd15_spec(), cond_spec).eval()
    cond = Condition({s.name: torch.randn(batch, s.max_tokens, s.width) for s in cond_spec.sources})
    with torch.no_grad():
        gen.generate(cond)  # warm-up
        base = rss_kib("VmRSS")
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            gen.generate(cond)
            times.append(time.perf_counter() - t)
    return {"seconds": min(times), "peak_extra_mib": max(0, rss_kib("VmHWM") - base) / 1024}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="tiny,small,medium,large")
    parser.add_argument("--timed-preset", default="small")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        print(json.dumps(measure(args._child[0], int(args._child[1]), args.repeats)))
        return

    spec = sd15_spec()
    cond_spec = standard_condition_spec(768, 77, 4, RESOLUTION)
    report = {
        "base": "SD1.5 InstructPix2Pix UNet (full size, meta device)",
        "rank": RANK, "alpha": ALPHA, "targets": len(spec.targets),
        "torch_threads": torch.get_num_threads(),
        "presets": {p: describe(GeneratorConfig.from_preset(p, rank=RANK, alpha=ALPHA), spec, cond_spec) for p in args.presets.split(",")},
    }
    timing = {}
    for batch in (1, 4):
        out = subprocess.run([sys.executable, __file__, "--_child", args.timed_preset, str(batch), "--repeats", str(args.repeats)],
                             check=True, capture_output=True, text=True).stdout
        timing[f"batch_{batch}"] = json.loads(out.strip().splitlines()[-1])
    timing["per_sample_ratio_batch4_vs_batch1"] = timing["batch_4"]["seconds"] / 4 / timing["batch_1"]["seconds"]
    report["cpu_forward"] = {"preset": args.timed_preset, **timing}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
