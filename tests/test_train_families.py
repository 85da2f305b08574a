"""Trainer end-to-end on tiny seeded bases of all three families (CPU, ~1 min)."""
import json
from pathlib import Path

import pytest
import torch

from hywu_nodes.core import load_generator, lora_patched, read_generator_info
from trainer.data import collate, synthetic_dataset
from trainer.families import load_family
from trainer.tiny_bases import tiny_config
from trainer.train import run

FAMILIES = ["sd15_ip2p", "flux_kontext", "qwen_image_edit"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared 2-core machine: one thread is several times faster than two."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fixed_batch_loss(adapter, lora_fn, batch, repeats=4):
    """Mean loss over fixed noise/timesteps (the same keys every call), so before/after compare."""
    total = 0.0
    for r in range(repeats):
        prep = adapter.prepare(batch, step=10_000 + r, keys=list(range(len(batch["instruction"]))))
        lora = lora_fn(prep)
        with torch.no_grad():
            if lora is None:
                total += adapter.loss(prep).mean().item()
            else:
                with lora_patched(adapter.denoiser, lora):
                    total += adapter.loss(prep).mean().item()
    return total / repeats


@pytest.mark.parametrize("family", FAMILIES)
def test_train_family(family, tmp_path):
    torch.manual_seed(0)
    # The generator overfits 8 training examples: the loss on them (fixed noise) must drop.
    cfg = tiny_config(family, tmp_path / "run", data={"n_train": 8}, train={"max_steps": 20, "lr": 2e-3, "drop_text": 0.0, "drop_image": 0.0})
    summary = run(cfg, progress=False, check_frozen=True)
    assert all(summary["frozen_unchanged"].values()), summary["frozen_unchanged"]
    assert not summary["frozen_requires_grad"] and not summary["frozen_training_mode"]

    path = Path(summary["files"][0])
    info = read_generator_info(path)
    assert info.base_family == family and info.extra["steps"] == 20
    gen, _ = load_generator(path)
    head_b = gen.head_b.weight
    assert head_b.abs().sum() > 0, "B head is zero-initialised; training must change it"

    adapter = load_family(cfg, torch.device("cpu"), torch.float32)
    assert info.condition_spec == adapter.condition_spec
    batch = collate([synthetic_dataset("train", 8, cfg.train.seed, 32).load(i, 32) for i in range(8)])
    base = fixed_batch_loss(adapter, lambda p: None, batch)
    trained = fixed_batch_loss(adapter, lambda p: gen.generate(p["condition"]), batch)
    assert trained < base * 0.97, (base, trained)
    assert (tmp_path / "run" / "summary.json").is_file()
    from PIL import Image

    grids = list((tmp_path / "run" / "samples").glob("*.png"))
    # src | tgt | base | LoRA, 32 px cells shown at 128 px, a label row on top and a caption under each row
    assert len(grids) == 1 and Image.open(grids[0]).size == (4 * 128, 16 + cfg.data.n_val * (128 + 16))


@pytest.mark.parametrize("method", ["shared_lora", "per_task_lora"])
def test_baseline_methods(method, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config("sd15_ip2p", tmp_path / "run", data={"tasks": ["brighten", "darken"]},
                      train={"method": method, "max_steps": 4})
    summary = run(cfg, progress=False)
    files = summary["files"]
    assert len(files) == (1 if method == "shared_lora" else 2)
    sd = load_file(files[0])
    ups = [v for k, v in sd.items() if k.endswith("lora_up.weight")]
    assert ups and all(k.startswith("lora_unet_") for k in sd)
    assert any(u.abs().sum() > 0 for u in ups), "B starts at zero and must have trained"


def test_bad_rows_do_not_stop_a_run(tmp_path, capsys):
    """A manifest with unusable rows trains anyway; the skips are counted in the summary."""

    from PIL import Image

    rows = []
    for i in range(6):
        Image.new("RGB", (48, 32), (40 * i, 80, 200 - 30 * i)).save(tmp_path / f"s{i}.png")
        Image.new("RGB", (48, 32), (200 - 30 * i, 80, 40 * i)).save(tmp_path / f"t{i}.png")
        rows.append({"source": f"s{i}.png", "target": f"t{i}.png", "instruction": f"swap colours {i}"})
    (tmp_path / "broken.png").write_bytes(b"not an image")
    # Bad rows first: they are also the validation rows, which must not crash the run either.
    rows = [{"source": "broken.png", "target": "t0.png", "instruction": "x"}, {"source": "s1.png", "instruction": "no target"}] + rows
    (tmp_path / "edits.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tiny_config("sd15_ip2p", tmp_path / "run", data={"source": "manifest", "path": str(tmp_path / "edits.jsonl")},
                      train={"max_steps": 3, "batch_size": 8})
    summary = run(cfg, progress=False)
    assert summary["skipped_rows"] == {"corrupt image": 1, "missing target": 1}
    assert "skipped 2 bad data row(s)" in capsys.readouterr().err


@pytest.mark.parametrize("family", ["sd15_ip2p", "flux_kontext"])
def test_activation_checkpointing_gives_the_same_update(family, tmp_path):
    """Checkpointing in base and generator recomputes the LoRA-hooked forward: same weights."""
    from safetensors.torch import load_file

    plain = run(tiny_config(family, tmp_path / "plain", train={"max_steps": 2}), progress=False)
    ckpt = run(tiny_config(family, tmp_path / "ckpt", generator={"gradient_checkpointing": True},
                           train={"max_steps": 2, "base_gradient_checkpointing": True}), progress=False)
    a, b = load_file(plain["files"][0]), load_file(ckpt["files"][0])
    assert a["head_b.weight"].abs().sum() > 0
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6, rtol=1e-5), k


def test_gradient_accumulation_matches_the_full_batch(tmp_path):
    from safetensors.torch import load_file

    full = run(tiny_config("sd15_ip2p", tmp_path / "full", train={"max_steps": 2, "batch_size": 4}), progress=False)
    acc = run(tiny_config("sd15_ip2p", tmp_path / "acc", train={"max_steps": 2, "batch_size": 2, "grad_accum": 2}), progress=False)
    assert acc["global_batch"] == full["global_batch"] == 4
    a, b = load_file(full["files"][0]), load_file(acc["files"][0])
    for k in a:
        # Adam moves every weight by ~lr (1e-3) per step; summing the batch in two halves changes
        # float rounding only, which Adam can amplify to ~1e-6 where a gradient is near zero.
        assert torch.allclose(a[k], b[k], atol=2e-5, rtol=1e-4), k
