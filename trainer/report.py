"""What the trainer tells a user: a time estimate from the first steps, notes about the base, a
loss-curve PNG beside the checkpoints (PIL only) and the closing summary."""
from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

ESTIMATE_AFTER = 3  # steps timed before the estimate (the first one warms caches up and is left out)


def duration(seconds: float) -> str:
    seconds = max(0.0, float(seconds))
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def estimate_line(step_times: list[float], done: int, total: int, validations: int = 0) -> str:
    timed = step_times[1:] if len(step_times) > 1 else step_times
    per = sum(timed) / len(timed)
    left = per * (total - done)
    return (f"estimate: {per:.2f} s/step from the first {len(step_times)} steps: about {duration(left)} for the remaining "
            f"{total - done} steps" + (f", plus {validations} validation(s)" if validations else ""))


def random_base_kind(path: str) -> str | None:
    """'micro' / 'tiny' when ``path`` is one of the project's seeded random bases (they run, but
    cannot show an edit), None otherwise (a real base, or the trained demo base)."""
    p = Path(path or "")
    if not p.is_dir() or (p / "hywu_demo_base.json").is_file():  # scripts/hywu_demo.py trains its base: it edits
        return None
    if (p / "hywu_micro_base.json").is_file():
        return "micro"
    if (p / "tiny_base.json").is_file():
        return "tiny"
    return None


def random_base_note(path: str, kind: str) -> str:
    what = "scripts/build_micro_base.py" if kind == "micro" else "trainer/tiny_bases.py"
    return (f"note: base.path {path} is the seeded {kind} test base ({what}): its weights are random, so training on it "
            "exercises the pipeline but cannot show an edit, and its ComfyUI outputs look like noise or stay dark. "
            "For a real run point base.path at a diffusers folder of a real base (trainer/configs/sd15_ip2p.yaml, "
            "flux_kontext.yaml, qwen_image_edit.yaml name the layouts); `make demo` trains one on CPU that shows the method.")


def tensorboard_note(available: bool, folder: str) -> str:
    if available:
        return f"TensorBoard logs: {folder} (tensorboard --logdir {folder})"
    return ("note: TensorBoard is not installed, so no TensorBoard logs (optional: pip install tensorboard); "
            "the losses are in summary.json and loss.png")


def _smooth(xs: list[float], k: int) -> list[float]:
    out, acc = [], []
    for x in xs:
        acc.append(x)
        if len(acc) > k:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def loss_curve(path: str | Path, train: list, val: list[tuple[int, float]], base: float | None, title: str = "") -> Path:
    """Train loss per step (light: raw, dark: running mean), validation loss (red dots) and the frozen
    base's validation loss (dashed line). ``train`` may hold None for skipped steps."""
    W, H, L, R, T, B = 720, 400, 64, 16, 28, 40
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default()
    pts = [(i + 1, x) for i, x in enumerate(train) if x is not None and math.isfinite(x)]
    ys = [y for _, y in pts] + [y for _, y in val] + ([base] if base is not None else [])
    n = max([len(train)] + [s for s, _ in val] + [1])
    lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
    if hi - lo < 1e-12:
        lo, hi = lo - 0.5, hi + 0.5
    pad = (hi - lo) * 0.05
    lo, hi = lo - pad, hi + pad

    def xy(step, y):
        return L + (W - L - R) * (step / n), T + (H - T - B) * (1 - (y - lo) / (hi - lo))

    d.rectangle([L, T, W - R, H - B], outline="black")
    for k in range(5):
        y = lo + (hi - lo) * k / 4
        _, py = xy(0, y)
        d.line([L - 4, py, L, py], fill="black")
        d.text((4, py - 6), f"{y:.4g}", fill="black", font=font)
    for k in range(5):
        s = round(n * k / 4)
        px, _ = xy(s, lo)
        d.line([px, H - B, px, H - B + 4], fill="black")
        d.text((px - 8, H - B + 6), str(s), fill="black", font=font)
    d.text((W // 2 - 20, H - 18), "step", fill="black", font=font)
    if len(pts) > 1:
        d.line([xy(s, y) for s, y in pts], fill=(170, 190, 230), width=1)
        sm = _smooth([y for _, y in pts], max(1, len(pts) // 20))
        d.line([xy(s, y) for (s, _), y in zip(pts, sm)], fill=(30, 70, 160), width=2)
    if base is not None:
        x0, y0 = xy(0, base)
        x = x0
        while x < W - R:
            d.line([x, y0, min(x + 8, W - R), y0], fill=(120, 120, 120), width=2)
            x += 14
    for s, y in val:
        px, py = xy(s, y)
        d.ellipse([px - 4, py - 4, px + 4, py + 4], fill=(200, 40, 40))
    legend = "train loss (running mean dark)   red: validation loss"
    if base is not None:
        legend += "   dashed: base without LoRA (validation)"
    d.text((L, 8), (title + ": " if title else "") + legend, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp-{path.name}")
    img.save(tmp, format="PNG")
    tmp.replace(path)
    from .state import publish

    publish(path)
    return path


def summary_lines(s: dict) -> list[str]:
    """The closing summary (the same facts as summary.json, for a person)."""
    out = [f"done: {s['name']} ({s['method']}, {s['base_family']}): {s['steps']} steps"
           + (f" (resumed at step {s['resumed_from']})" if s.get("resumed_from") else "")
           + f" in {duration(s.get('seconds') or 0)}"]
    if s.get("final_loss") is not None:
        out.append(f"  train loss: {s['first_loss']:.4f} at the first step -> {s['mean_loss_last_10']:.4f} (mean of the last 10)")
    v = s.get("validation") or {}
    if v.get("loss") is not None and v.get("base_loss") is not None:
        change = (v["loss"] - v["base_loss"]) / v["base_loss"] * 100 if v["base_loss"] else 0.0
        verdict = "better than" if v["loss"] < v["base_loss"] else "not better than"
        out.append(f"  validation loss ({v['rows']} held-out rows): {v['loss']:.4f} with the trained LoRA vs {v['base_loss']:.4f} "
                   f"for the base without it ({change:+.1f}%: {verdict} the base)")
    elif not v.get("rows"):
        out.append("  validation: no held-out rows (data.val_fraction / data.val_path), so no validation loss")
    files = s.get("files") or []
    if files:
        out.append(f"  {'generator' if s['method'] == 'hywu' else 'LoRA file(s)'}: {', '.join(files)}")
        folder = "ComfyUI/models/hywu/" if s["method"] == "hywu" else "ComfyUI/models/loras/"
        out.append(f"  use it in ComfyUI: cp {' '.join(json.dumps(f) if ' ' in f else f for f in files)} {folder}")
    if s.get("samples"):
        out.append(f"  samples: {s['samples']}")
    if s.get("previews"):
        out.append(f"  previews on your images: {s['previews']}")
    if s.get("loss_curve"):
        out.append(f"  loss curve: {s['loss_curve']}")
    if s.get("skipped_total"):
        out.append(f"  skipped rows: {s['skipped_rows']}")
    return out
