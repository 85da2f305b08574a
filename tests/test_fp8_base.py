"""An fp8 frozen base (base.weight_dtype, trainer/fp8_base.py): every linear of the denoiser stored in fp8, computing
in the training dtype, the LoRA hooks and the generator's gradient unchanged in kind; the loss and the gradient
close to those of the ordinary base; a trainer run on it.

Tolerances, measured here on the tiny seeded bases (fp32 compute on CPU, a tiny generator with a random B head,
4 synthetic examples): relative loss difference 1.1e-4 to 2.0e-3 and gradient cosine 0.9937 to 0.9997 over
sd15_ip2p, flux_kontext and flux2_klein in both fp8 modes; the tests allow 5e-3 and 0.99. The cost in a trained
generator's quality is measured by bench/fp8_base.py (the miniature world, 3 seeds; docs/performance.md)."""
from __future__ import annotations

import pytest
import torch
from torch import nn

FAMILIES = ("sd15_ip2p", "flux_kontext", "flux2_klein")
MODES = ("fp8_e4m3fn", "fp8_scaled")


def _adapter(family, weight_dtype, tmp_path):
    from trainer.families import load_family
    from trainer.tiny_bases import tiny_config

    cfg = tiny_config(family, tmp_path / "run", base={"weight_dtype": weight_dtype})
    return cfg, load_family(cfg, torch.device("cpu"), torch.float32)


def test_every_linear_is_stored_in_fp8_and_still_a_target(tmp_path):
    from hywu_nodes.core import build_target_spec
    from trainer.fp8_base import Fp8Linear

    _, plain = _adapter("flux2_klein", "bf16", tmp_path)
    _, fp8 = _adapter("flux2_klein", "fp8_scaled", tmp_path)
    linears = [m for m in plain.denoiser.modules() if isinstance(m, nn.Linear)]
    stored = [m for m in fp8.denoiser.modules() if isinstance(m, nn.Linear)]
    assert len(stored) == len(linears) > 10 and all(type(m) is Fp8Linear for m in stored)
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight.element_size() == 1 for m in stored)
    assert all(not p.requires_grad for p in fp8.denoiser.parameters())
    bytes_ = lambda model: sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))  # noqa: E731
    assert bytes_(fp8.denoiser) * 4 == bytes_(plain.denoiser)  # fp32 here; a quarter at rest (half of bf16)
    for family in ("flux2_klein",):  # the same layers, names and widths: a generator fits either base
        spec = lambda a: build_target_spec(a.denoiser, family).to_json()  # noqa: E731
        assert spec(fp8) == spec(plain)
    # the non-linear weights (norms, embeddings, modulation biases) are the loaded ones
    plain_sd, fp8_sd = plain.denoiser.state_dict(), fp8.denoiser.state_dict()
    rest = [k for k in plain_sd if not any(k == f"{n}.weight" for n, m in plain.denoiser.named_modules() if isinstance(m, nn.Linear))]
    assert rest and all(torch.equal(plain_sd[k], fp8_sd[k]) for k in rest)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", FAMILIES)
def test_loss_and_generator_gradient_match_the_ordinary_base(family, mode, tmp_path):
    from tiny_models import generator_loss_and_grad

    out = {}
    for weight_dtype in ("bf16", mode):
        cfg, adapter = _adapter(family, weight_dtype, tmp_path)
        out[weight_dtype] = generator_loss_and_grad(adapter, include=cfg.base.targets)
    (l0, g0), (l1, g1) = out["bf16"], out[mode]
    rel, cos = abs(l1 - l0) / l0, float(torch.nn.functional.cosine_similarity(g0, g1, 0))
    print(f"{family} {mode}: loss {l0:.5f} -> {l1:.5f} (rel {rel:.1e}), generator gradient cosine {cos:.5f}")
    assert rel <= 5e-3 and cos >= 0.99 and g0.norm() > 0


def test_scaled_fp8_keeps_small_weights():
    """A layer of small weights: plain e4m3fn flushes most of them (subnormals below 2^-9), scaled keeps them."""
    from trainer.fp8_base import Fp8Linear

    torch.manual_seed(0)
    lin = nn.Linear(64, 64, bias=False)
    with torch.no_grad():
        lin.weight.mul_(1e-3 / lin.weight.abs().max())
    err = {}
    for scaled in (False, True):
        w = Fp8Linear.from_linear(lin, scaled).dequantized(torch.float32)
        err[scaled] = float((w - lin.weight).norm() / lin.weight.norm())
    print(f"weights below 1e-3: relative error e4m3fn {err[False]:.3f}, scaled {err[True]:.3f}")
    assert err[True] < 0.05 < err[False]


def test_weight_dtype_is_checked():
    from trainer.config import ConfigError, TrainConfig, validate

    cfg = TrainConfig()
    cfg.base.path = "x"
    for value in MODES + ("bf16",):
        cfg.base.weight_dtype = value
        validate(cfg)
    cfg.base.weight_dtype = "int4"
    with pytest.raises(ConfigError, match="base.weight_dtype must be one of bf16, fp8_e4m3fn, fp8_scaled"):
        validate(cfg)
    cfg.base.weight_dtype, cfg.train.fsdp_shard_base = "fp8_scaled", True
    with pytest.raises(ConfigError, match="fsdp_shard_base"):
        validate(cfg)


def test_a_training_run_on_an_fp8_base(tmp_path):
    """`trainer.train.run` with base.weight_dtype fp8_scaled: it trains, the stored base stays bit-identical."""
    from trainer.tiny_bases import tiny_config
    from trainer.train import run

    cfg = tiny_config("flux2_klein", tmp_path / "run", base={"weight_dtype": "fp8_scaled"},
                      train={"max_steps": 3, "log_every": 1}, data={"n_train": 8})
    summary = run(cfg, progress=False, check_frozen=True)
    assert summary["steps"] == 3 and all(summary["frozen_unchanged"].values())
    assert summary["final_loss"] == summary["final_loss"]  # finite
