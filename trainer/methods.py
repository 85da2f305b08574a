"""What is trained: the HY-WU generator, or the static-LoRA baselines the paper compares to.

Each method turns (trainable module, batch condition, task ids) into a core ``GeneratedLoRA``
plus the sample -> LoRA index map for ``core.lora_patched``; the loss and the loop are shared,
so the baselines get exactly the same data, budget and target layers.
  * ``hywu``: one LoRA per sample, generated from the condition;
  * ``shared_lora``: one static LoRA (batch 1, broadcast to every sample);
  * ``per_task_lora``: one static LoRA per task label, indexed by the sample's task.
Static LoRAs follow PEFT's init: A ~ U(+-1/sqrt(d_in)), B = 0 (the patched base starts equal to the base).
"""
from __future__ import annotations

import math
import os

import torch
from safetensors.torch import save_file
from torch import nn

from hywu_nodes.core import GeneratedLoRA, GeneratorConfig, HYWUGenerator, save_generator, to_lora_state_dict


class StaticLoRA(nn.Module):
    """``n`` trainable LoRAs for the targets of a spec."""

    def __init__(self, target_spec, rank: int, alpha: float, n: int = 1):
        super().__init__()
        self.target_spec, self.rank, self.alpha, self.n = target_spec, rank, alpha, n
        self.a = nn.ParameterList()
        self.b = nn.ParameterList()
        for t in target_spec.targets:
            bound = 1 / math.sqrt(t.d_in)
            self.a.append(nn.Parameter(torch.empty(n, rank, t.d_in).uniform_(-bound, bound)))
            self.b.append(nn.Parameter(torch.zeros(n, t.d_out, rank)))

    def forward(self) -> dict:
        return {t.name: (a, b) for t, a, b in zip(self.target_spec.targets, self.a, self.b)}

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


class Method:
    def __init__(self, name: str, module: nn.Module, family: str, tasks: list[str] | None = None, factory=None):
        self.name, self.module, self.family, self.tasks = name, module, family, tasks or []
        self.factory = factory  # builds a fresh module of the same shape (unsharded copies)

    def lora(self, wrapped: nn.Module, cond, task_id: torch.Tensor, draws: int = 1) -> tuple[GeneratedLoRA, torch.Tensor | None]:
        """Call through ``wrapped`` (the DDP wrapper or the sharded module) so gradients are
        synchronised. ``draws``: samples per example in the base batch (draw-major, see
        FamilyAdapter.prepare_encoded); the generated / per-task LoRA of example j serves them all.
        HY-WU: one LoRA per condition (rows with chained edits: trainer.edits.EditPlan.chain sums
        them per row)."""
        inner = self.module
        if self.name == "hywu":
            return wrapped(cond), None
        weights = wrapped()
        if self.name == "shared_lora":
            return GeneratedLoRA(weights, inner.scale), None
        if (task_id < 0).any():
            raise ValueError("per_task_lora: a training row has no task label (or one not seen when the run started)")
        return GeneratedLoRA(weights, inner.scale), task_id.repeat(draws)

    def unsharded(self, state_dict: dict) -> "Method":
        """A plain copy holding ``state_dict`` (a sharded run writes its user files from it)."""
        with torch.device("meta"):
            module = self.factory()
        module.load_state_dict(state_dict, assign=True)
        if hasattr(module, "register_index_buffers"):
            module.register_index_buffers()  # built on 'meta' with the weights
        return Method(self.name, module, self.family, self.tasks, self.factory)

    def save(self, folder: str, name: str, extra: dict) -> list[str]:
        """Write the user-facing file(s) into ``folder``; returns their paths."""
        os.makedirs(folder, exist_ok=True)
        if self.name == "hywu":
            path = os.path.join(folder, f"{name}.safetensors")
            save_generator(path, self.module, extra=extra)
            return [path]
        lora = GeneratedLoRA(self.module(), self.module.scale)
        labels = ["shared"] if self.name == "shared_lora" else self.tasks
        paths = []
        for i, label in enumerate(labels):
            path = os.path.join(folder, f"{name}.safetensors" if self.name == "shared_lora" else f"{name}-{label}.safetensors")
            _atomic_save(to_lora_state_dict(lora, self.family, i), path, {"hywu.method": self.name, "hywu.task": label})
            paths.append(path)
        return paths


def _atomic_save(tensors: dict, path: str, metadata: dict) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    save_file(tensors, tmp, metadata=metadata)
    os.replace(tmp, path)


def build_method(cfg, target_spec, condition_spec, tasks: list[str]) -> Method:
    g, method = cfg.generator, cfg.train.method
    if method == "hywu":
        overrides = {k: getattr(g, k) for k in ("token_width", "row_tokens") if getattr(g, k) is not None}
        gcfg = GeneratorConfig.from_preset(g.preset, rank=g.rank, alpha=g.alpha, gradient_checkpointing=g.gradient_checkpointing,
                                           condition_norm=g.condition_norm, shared_rank=g.shared_rank, film=g.film, **overrides)
        factory = lambda: HYWUGenerator(gcfg, target_spec, condition_spec)  # noqa: E731
        return Method(method, factory(), cfg.base.family, factory=factory)
    if method == "shared_lora":
        factory = lambda: StaticLoRA(target_spec, g.rank, g.alpha, 1)  # noqa: E731
        return Method(method, factory(), cfg.base.family, factory=factory)
    if not tasks:
        raise ValueError("train.method=per_task_lora needs task labels in the data (a 'task' column); none were found")
    factory = lambda: StaticLoRA(target_spec, g.rank, g.alpha, len(tasks))  # noqa: E731
    return Method(method, factory(), cfg.base.family, tasks, factory=factory)
