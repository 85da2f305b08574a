"""FLUX generators are trained at one embedded guidance (the file's ``flux_guidance``), but the base
gets whatever the graph's FluxGuidance node says, and no HY-WU node sees that node. This
APPLY_MODEL wrapper reads the guidance of the sampler's model calls and warns once per value
that differs (a generator trained at 2.5 sampled at 1.0 gave another image: 21.4 dB PSNR,
tests/test_family_flux.py)."""
from __future__ import annotations

import comfy.patcher_extension

from .common import log

WRAPPER_KEY = "hywu_guidance_check"


class GuidanceCheck:
    def __init__(self, trained: float, generator_name: str | None):
        self.trained, self.generator_name, self.seen = float(trained), generator_name, set()

    def __call__(self, executor, *args, **kwargs):
        guidance = kwargs.get("guidance")
        if guidance is not None and guidance.numel():
            value = round(float(guidance.flatten()[0]), 4)
            if abs(value - self.trained) > 1e-3 and value not in self.seen:
                self.seen.add(value)
                log.warning("HY-WU: the sampler runs the FLUX model at guidance %g, but the generator '%s' was trained "
                            "at %g: set FluxGuidance to %g, or the edit differs from what it learned.", value,
                            self.generator_name or "?", self.trained, self.trained)
        return executor(*args, **kwargs)

    def __deepcopy__(self, memo):  # clones copy wrappers; the check holds no tensors
        return self


def watch_guidance(model_patcher, lora) -> None:
    """Install the check on ``model_patcher`` (a clone Apply made) when ``lora`` records the guidance
    its generator was trained at."""
    trained = getattr(lora, "flux_guidance", None)
    if trained is None or not hasattr(model_patcher, "add_wrapper_with_key"):
        return
    model_patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                       GuidanceCheck(trained, getattr(lora, "generator_name", None)))
