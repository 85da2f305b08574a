"""Runtime (bypass) LoRAs on a ComfyUI model: each adapted layer computes ``W x + s * B_b (A_b x)``
for every sample ``b``; the weights are never touched, so there is no weight backup and nothing
to re-patch when the next request brings new LoRAs.

Installed on a *clone* of the ModelPatcher through ComfyUI's own extension points:

* one **object patch** per adapted layer (``<layer>.forward``) adds the low-rank term after the
  layer's own forward. ComfyUI applies a clone's object patches when it loads that clone and
  restores the originals when it loads another clone of the same model, so the shared modules
  carry them only while this clone runs.
* one **APPLY_MODEL wrapper** reads how ComfyUI built each model call's batch:
  ``transformer_options["cond_or_uncond"]`` lists its chunks (cond, uncond, further conds; an
  area cond is still the whole latent batch, cropped), each a copy of the sampler's latent
  batch. Latent ``j`` of every chunk uses LoRA ``j % n``, so the latent batch must be a
  multiple of the LoRA count; ``comfy.utils.repeat_to_batch_size`` tiles conds the same way.

The low-rank product is the core's per-sample path (:func:`hywu_nodes.core.lora_delta`).

Guards for newer ComfyUI (read in its source, not present in 0.3.75): an object patch is a forward
bound to one layer of one model, so it computes right only on that model. Multi-GPU work units
(``comfy/multigpu.py``: ``deepclone_multigpu`` / ``match_multigpu_clones``) and the non-dynamic
delegate of a dynamic-VRAM ``ModelPatcherDynamic`` (``get_non_dynamic_delegate``, taken e.g. for
conditioning with hooks) clone the patcher onto *another* model object and copy (or deep-copy) its
object patches and wrappers, which would then run this model's layers. :func:`runtime_problem`
names such a MODEL before installing (HY-WU Apply then uses patch mode, whose weight patches
ComfyUI carries to every copy by key); the APPLY_MODEL wrapper refuses a model call on any other
model than the one it was installed on. Dynamic VRAM itself keeps runtime mode: its loader still
applies object patches (``patch_model(load_weights=False)`` in ``partially_load``).
"""
from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import torch

import comfy.patcher_extension
import comfy.utils
from comfy.weight_adapter.lora import LoRAAdapter

from ..core import lora_delta
from .types import HYWUError

WRAPPER_KEY = "hywu_runtime_lora"


@dataclass
class LowRankLayer:
    """Every LoRA term of one layer, stacked over the n LoRAs; strength and alpha/rank are folded
    into ``up``. linear: down (n, R, d_in); conv: down (n, R, d_in, *kernel). up is (n, d_out, R)."""

    kind: str  # "linear" | "conv"
    down: torch.Tensor
    up: torch.Tensor


def _linear_like(module) -> bool:
    # nn.Linear, and ComfyUI's quantized (fp8 / mixed precision) Linear, which is a plain Module
    w = getattr(module, "weight", None)
    return isinstance(module, torch.nn.Linear) or (hasattr(module, "in_features") and w is not None and w.ndim == 2)


def _conv(module) -> bool:
    return (isinstance(module, torch.nn.modules.conv._ConvNd) and not module.transposed and module.groups == 1)


def _runtime_entry(model, key, adapter):
    """(layer path, output slice or None, up 2D, down, multiplier) when this patch can run as a
    runtime LoRA, else None (it is then patched into the weights)."""
    if not isinstance(adapter, LoRAAdapter):
        return None
    up, down, alpha, mid, dora_scale, reshape = adapter.weights
    if mid is not None or dora_scale is not None or reshape is not None:
        return None
    weight_key, offset = (key, None) if isinstance(key, str) else key
    if not weight_key.endswith(".weight") or (offset is not None and offset[0] != 0):
        return None
    path = weight_key[: -len(".weight")]
    try:
        module = comfy.utils.get_attr(model, path)
    except AttributeError:
        return None
    rank = down.shape[0]
    up2 = up.reshape(up.shape[0], -1)
    if up2.shape[1] != rank:
        return None
    d_out = offset[2] if offset is not None else module.weight.shape[0]
    if up2.shape[0] != d_out:
        return None
    if _linear_like(module):
        if down.numel() != rank * module.weight.shape[1]:
            return None
        down = down.reshape(rank, -1)
    elif _conv(module) and offset is None:
        kernel_shape = (rank, *module.weight.shape[1:])
        if down.numel() != math.prod(kernel_shape):
            return None
        down = down.reshape(kernel_shape)
    else:
        return None
    scale = (float(alpha) / rank) if alpha is not None else 1.0
    return path, offset, up2, down, scale


def _stack(n: int, kind: str, entries_per_lora: list[list], d_out: int, down_shape: tuple) -> LowRankLayer:
    """One (down, up) pair per LoRA covering all entries of a layer: ranks side by side, each
    entry's ``up`` placed in its output rows (a fused qkv layer gets q, k and v slices)."""
    rank = max((sum(e[3].shape[0] for e in entries) for entries in entries_per_lora), default=0)
    down = torch.zeros(n, rank, *down_shape, dtype=torch.float32)
    up = torch.zeros(n, d_out, rank, dtype=torch.float32)
    for i, entries in enumerate(entries_per_lora):
        col = 0
        for _, offset, up2, d, mult in entries:
            r = d.shape[0]
            rows = slice(offset[1], offset[1] + offset[2]) if offset is not None else slice(None)
            down[i, col:col + r] = d.float()
            up[i, rows, col:col + r] = up2.float() * mult
            col += r
    return LowRankLayer(kind, down, up)


def split_patches(model, patch_sets: list[dict], strength: float):
    """Sort ComfyUI LoRA patches (``comfy.lora.load_lora`` output, one dict per LoRA) into runtime
    layers and the patches that must go into the weights (other adapter types, DoRA, LoCon mid
    weights, grouped convolutions, biases). Returns (layers by module path, weight patches of
    LoRA 0); with more than one LoRA every patch must run at runtime."""
    n = len(patch_sets)
    by_layer: dict[str, list[list]] = {}
    keys_of_layer: dict[str, list] = {}
    weight_patches = {}
    for key in dict.fromkeys(k for ps in patch_sets for k in ps):
        entries = [(_runtime_entry(model, key, ps[key]) if key in ps else None) for ps in patch_sets]
        present = [e for e in entries if e is not None]
        if len(present) != sum(key in ps for ps in patch_sets):
            weight_patches[key] = patch_sets[0].get(key)
            continue
        path = present[0][0]
        keys_of_layer.setdefault(path, []).append(key)
        slots = by_layer.setdefault(path, [[] for _ in range(n)])
        for i, e in enumerate(entries):
            if e is not None:
                slots[i].append((*e[:4], e[4] * strength))
    layers = {}
    for path, entries_per_lora in by_layer.items():
        w = comfy.utils.get_attr(model, path).weight
        if w.ndim == 2:
            layers[path] = _stack(n, "linear", entries_per_lora, w.shape[0], (w.shape[1],))
        elif all(len(entries) <= 1 for entries in entries_per_lora):
            layers[path] = _stack(n, "conv", entries_per_lora, w.shape[0], tuple(w.shape[1:]))
        else:  # two LoRA keys on one convolution (rare): leave them to the weight patches
            weight_patches.update({k: patch_sets[0].get(k) for k in keys_of_layer[path]})
    if weight_patches and n > 1:
        raise HYWUError(
            f"HY-WU Apply Generated LoRA: {len(weight_patches)} LoRA entries (e.g. {next(iter(weight_patches))}) are "
            "not plain LoRAs on linear or convolution layers and cannot run per sample. Use mode 'patch' with one "
            "batch_index.")
    return layers, {k: v for k, v in weight_patches.items() if v is not None}


_EXTENSION_POINTS = ("clone", "add_object_patch", "add_wrapper_with_key", "add_patches")


def multigpu_clones(model_patcher) -> int:
    """How many multi-GPU copies of the model this MODEL carries (newer ComfyUI's MultiGPU nodes)."""
    get = getattr(model_patcher, "get_additional_models_with_key", None)
    n = len(get("multigpu") or ()) if callable(get) else 0
    opts = getattr(model_patcher, "model_options", None)
    return max(n, len((opts.get("multigpu_clones") or ()) if isinstance(opts, dict) else ()))


def runtime_problem(model_patcher) -> str | None:
    """Why runtime LoRAs would not compute right on this MODEL (a sentence), or None when they do."""
    missing = [a for a in _EXTENSION_POINTS if not callable(getattr(model_patcher, a, None))]
    if not isinstance(getattr(model_patcher, "object_patches", None), dict):
        missing.append("object_patches")
    if missing or not hasattr(comfy.patcher_extension.WrappersMP, "APPLY_MODEL"):
        return (f"this MODEL ({type(model_patcher).__name__}) lacks the ComfyUI extension points runtime mode "
                f"installs through ({', '.join(missing) or 'WrappersMP.APPLY_MODEL'})")
    n = multigpu_clones(model_patcher)
    if n:
        return (f"this MODEL carries {n} multi-GPU clone(s) (a MultiGPU node before this one): each runs its own "
                "copy of the model on another GPU, where runtime mode's object patches would still run this "
                "copy's layers")
    return None


FOREIGN_MODEL = (
    "HY-WU runtime LoRA: ComfyUI is running a copy of the model that HY-WU Apply Generated LoRA did not patch "
    "(newer ComfyUI makes one for multi-GPU work units, or a non-dynamic delegate of a dynamic-VRAM model, e.g. "
    "for conditioning with hooks); runtime mode's per-layer patches would compute with the original model's "
    "layers there. Set mode to 'patch' on HY-WU Apply Generated LoRA (one LoRA: batch_index 0..N-1), or place "
    "the MultiGPU node before it (it then uses patch mode by itself).")


class RuntimeLoRA:
    """The per-sample low-rank terms of one HY-WU Apply node: the APPLY_MODEL wrapper (it learns
    each call's batch layout) and the forwards its object patches install."""

    def __init__(self, layers: dict[str, LowRankLayer], n_loras: int, model=None):
        self.layers = layers
        self.n = n_loras
        self.call_batch: int | None = None  # the batch of the model call in progress
        self._cache_key = None
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        # the BaseModel the object patches were built for (a weak reference: a deep copy of the
        # wrapper must not copy the model, and the check must not keep it alive)
        self._model = weakref.ref(model) if model is not None else None

    def __deepcopy__(self, memo):
        # the object patches call this instance; a copy would get the batch layout they never see
        return self

    # --- APPLY_MODEL wrapper --------------------------------------------------------------
    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        running = getattr(executor, "class_obj", None)
        if self._model is not None and running is not None and running is not self._model():
            raise HYWUError(FOREIGN_MODEL)
        transformer_options = {} if transformer_options is None else transformer_options
        chunks = len(transformer_options.get("cond_or_uncond") or ()) or 1
        self.check_call(x.shape[0], chunks)
        previous, self.call_batch = self.call_batch, x.shape[0]
        try:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            self.call_batch = previous

    def check_call(self, batch: int, chunks: int) -> None:
        if self.n == 1:
            return
        latents = batch // chunks if batch % chunks == 0 else batch
        if latents % self.n:
            raise HYWUError(
                f"HY-WU runtime LoRA: the sampler's latent batch has {latents} latent(s), but the model carries {self.n} "
                f"LoRAs (one per edit; latent j uses LoRA j % {self.n}). Give the sampler {self.n} latents (or a "
                "multiple): connect HY-WU Condition Encode's image output to the node that makes the latent "
                "(InstructPixToPixConditioning pixels, VAE Encode), or set batch_index on HY-WU Apply Generated LoRA "
                "to use one LoRA for every sample.")

    def to(self, target):
        """ComfyUI casts wrappers with .to(device) / .to(dtype) around sampling: drop device copies
        when moved elsewhere (the float32 masters stay on the CPU)."""
        if (isinstance(target, (torch.device, str)) and self._cache_key is not None
                and torch.device(target) != self._cache_key[0]):
            self._cache, self._cache_key = {}, None
        return self

    # --- the layers -----------------------------------------------------------------------
    def _weights(self, path: str, x: torch.Tensor):
        key = (x.device, x.dtype)
        if key != self._cache_key:
            self._cache, self._cache_key = {}, key
        w = self._cache.get(path)
        if w is None:
            layer = self.layers[path]
            w = self._cache[path] = (layer.down.to(x.device, x.dtype), layer.up.to(x.device, x.dtype))
        return w

    def _check_layer_batch(self, path: str, batch: int) -> None:
        expected = self.call_batch
        if (expected is not None and batch != expected) or batch % self.n:
            raise HYWUError(
                f"HY-WU runtime LoRA: layer {path} sees a batch of {batch} where the model call has "
                f"{expected if expected is not None else 'a multiple of ' + str(self.n)}; per-sample LoRAs need layers "
                "whose first axis is the batch. Set batch_index on HY-WU Apply Generated LoRA to use one LoRA for "
                "every sample, or use mode 'patch'.")

    def add_delta(self, path: str, module, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` (the layer's output for ``x``) plus this layer's low-rank term; added in place
        when it can be (the usual case: it saves a pass over the output)."""
        down, up = self._weights(path, x)
        if self.layers[path].kind == "conv":
            return out + self._conv_delta(path, module, x, down, up).to(out.dtype)
        if self.n > 1:
            self._check_layer_batch(path, x.shape[0])
        if out.is_contiguous() and out.dtype == x.dtype and not out.requires_grad:
            return lora_delta(x, down, up, 1.0, out=out)
        return out + lora_delta(x, down, up, 1.0).to(out.dtype)

    def _conv_delta(self, path, module, x, down, up):
        def one(xs, d, u):  # the layer's own stride/padding/dilation, then a 1x1 convolution
            h = module._conv_forward(xs, d, None)
            return torch.einsum("or,br...->bo...", u, h)

        if self.n == 1:
            return one(x, down[0], up[0])
        self._check_layer_batch(path, x.shape[0])
        parts = [one(x[i::self.n], down[i], up[i]) for i in range(self.n)]
        out = x.new_empty((x.shape[0], *parts[0].shape[1:]))
        for i, p in enumerate(parts):
            out[i::self.n] = p
        return out

    def forward_for(self, path: str, module, inner):
        """The replacement ``forward`` of one layer: its own forward (or an earlier runtime LoRA's),
        plus this node's low-rank term."""
        def forward(x, *args, **kwargs):
            return self.add_delta(path, module, x, inner(x, *args, **kwargs))

        return forward


def install(model_patcher, patch_sets: list[dict], strength: float):
    """Clone ``model_patcher`` and install the LoRAs of ``patch_sets`` (one ``comfy.lora.load_lora``
    dict per LoRA) as runtime LoRAs. Returns (clone, {"runtime": layers, "weight_patched": n})."""
    clone = model_patcher.clone()
    layers, weight_patches = split_patches(clone.model, patch_sets, strength)
    runtime = RuntimeLoRA(layers, len(patch_sets), clone.model)
    for path in layers:
        name = f"{path}.forward"
        module = comfy.utils.get_attr(clone.model, path)
        # chain to an earlier runtime LoRA on this clone; else the class's own forward (never an
        # instance attribute: another clone's object patch may be applied to the shared module now)
        inner = clone.object_patches.get(name) or type(module).forward.__get__(module, type(module))
        clone.add_object_patch(name, runtime.forward_for(path, module, inner))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, runtime)
    added = clone.add_patches(weight_patches, strength) if weight_patches else []
    return clone, {"runtime_layers": len(layers), "weight_patched": len(added), "runtime": runtime}
