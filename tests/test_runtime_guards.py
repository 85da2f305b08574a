"""Runtime mode on newer ComfyUI (issue 15 item 6), checked with the real ModelPatcher of the ComfyUI
under test (the micro SD1.5-IP2P checkpoint; on 0.30 its own deepclone_multigpu makes the copies) and
subclasses that behave as newer releases do where it matters on a CPU:

* ``ModelPatcherDynamic`` (dynamic VRAM, the default on GPUs): ``is_dynamic()``; its loader still
  applies object patches, so runtime mode stays; its non-dynamic delegate
  (``get_non_dynamic_delegate``, e.g. for conditioning with hooks) is a clone on another model object;
* multi-GPU work units (``comfy/multigpu.py``): ``additional_models["multigpu"]`` holds clones on
  their own model copies (``deepclone_multigpu``), and ``match_multigpu_clones`` clones the main
  patcher, object patches and wrappers included, onto each copy.

An object patch computes with the layer of the model it was built for, so on another model it would
run the wrong layers: HY-WU Apply falls back to patch mode (one LoRA, with a warning) or refuses
(one LoRA per sample), and a runtime wrapper asked to run another model refuses clearly."""
from __future__ import annotations

import copy
import logging

import pytest
import torch

import comfy_harness

R = 4
TO_Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"


@pytest.fixture(scope="module")
def comfy_model(micro_base):
    comfy_harness.import_comfy(micro_base.comfyui, extra_modules=(
        "comfy.sd", "comfy.utils", "comfy.model_management", "comfy.model_patcher", "comfy.lora", "comfy_api.latest"))
    import comfy.sd

    model, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(micro_base.checkpoint), output_vae=False,
                                                           output_clip=False)
    return model


def _lora(seed):
    g = torch.Generator().manual_seed(seed)
    return {f"{TO_Q}.lora_down.weight": torch.randn(R, 320, generator=g) * 0.1,
            f"{TO_Q}.lora_up.weight": torch.randn(320, R, generator=g) * 0.1, f"{TO_Q}.alpha": torch.tensor(2.0)}


def _inputs(batch=2):
    g = torch.Generator().manual_seed(0)
    return dict(x=torch.randn(batch, 4, 8, 8, generator=g), t=torch.full((batch,), 5.0),
                c_concat=torch.randn(batch, 4, 8, 8, generator=g), c_crossattn=torch.randn(batch, 77, 768, generator=g))


def _call(patcher, inp):
    """One model call as the sampler makes it (the patcher loaded, its wrappers in transformer_options)."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    with torch.no_grad():
        return patcher.model.apply_model(inp["x"], inp["t"], c_concat=inp["c_concat"], c_crossattn=inp["c_crossattn"],
                                         transformer_options={"wrappers": patcher.wrappers})


def _apply(model, lora, mode="runtime", batch_index=-1):
    from hywu_nodes.nodes.apply import HYWUApplyGeneratedLoRA

    return HYWUApplyGeneratedLoRA.execute(model, lora, 1.0, batch_index, mode).args[0]


def _runtime_wrappers(patcher):
    import comfy.patcher_extension

    from hywu_nodes.nodes.runtime_lora import WRAPPER_KEY

    return patcher.get_wrappers(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY)


def _on_copy(patcher, deep_object_patches=False):
    """A clone of ``patcher`` on its own copy of the model, as newer ComfyUI makes for multi-GPU work
    units and non-dynamic delegates: its own ``deepclone_multigpu`` (0.28+: a fresh load from
    cached_patcher_init, then clone(), which copies object patches and wrappers), or on 0.3.75 a
    deep copy of the model in its place; object patches and wrappers optionally deep-copied, as some
    releases did."""
    import comfy.model_management as mm
    import comfy.model_patcher

    mm.unload_all_models()  # no object patch applied to the modules while they are copied
    if hasattr(patcher, "deepclone_multigpu"):
        n = patcher.deepclone_multigpu()
    else:
        n = comfy.model_patcher.ModelPatcher.clone(patcher)
        n.model = copy.deepcopy(patcher.model)
        n.backup, n.object_patches_backup = {}, {}
    n.__class__ = comfy.model_patcher.ModelPatcher
    if deep_object_patches:
        n.object_patches = copy.deepcopy(patcher.object_patches)
        n.wrappers = copy.deepcopy(patcher.wrappers)
    return n


def _dynamic_like(model):
    import comfy.model_patcher

    class DynamicLike(comfy.model_patcher.ModelPatcher):
        """What runtime mode meets in ModelPatcherDynamic: is_dynamic(), clones of the same class on the
        same model, and a non-dynamic delegate on another model object."""

        def is_dynamic(self):
            return True

        def get_non_dynamic_delegate(self):
            return _on_copy(self)

    p = model.clone()
    p.__class__ = DynamicLike
    return p


def _multigpu(model):
    """The MODEL as newer ComfyUI's MultiGPU nodes leave it (create_multigpu_deepclones)."""
    p = model.clone()
    p.set_additional_models("multigpu", [_on_copy(model)])
    return p


def test_runtime_problem_names_multigpu_and_missing_extension_points(comfy_model):
    import comfy.model_patcher

    from hywu_nodes.nodes.runtime_lora import runtime_problem

    assert runtime_problem(comfy_model) is None  # the ComfyUI's own ModelPatcher
    assert runtime_problem(_dynamic_like(comfy_model)) is None  # dynamic VRAM alone keeps runtime mode
    assert "1 multi-GPU clone" in runtime_problem(_multigpu(comfy_model))
    opts = comfy_model.clone()
    opts.model_options["multigpu_clones"] = {torch.device("cpu"): object()}  # the sampler-side record
    assert "multi-GPU" in runtime_problem(opts)

    class NoWrappers(comfy.model_patcher.ModelPatcher):
        add_wrapper_with_key = None

    bare = comfy_model.clone()
    bare.__class__ = NoWrappers
    assert "add_wrapper_with_key" in runtime_problem(bare)


def test_dynamic_vram_model_keeps_runtime_mode(comfy_model):
    inp, lora = _inputs(), _lora(1)
    dyn = _dynamic_like(comfy_model)
    runtime = _apply(dyn, lora, "runtime")
    assert _runtime_wrappers(runtime) and type(runtime).__name__ == "DynamicLike"
    got, want, base = _call(runtime, inp), _call(_apply(comfy_model, lora, "patch"), inp), _call(comfy_model, inp)
    effect = float((want - base).abs().max())
    assert effect > 1e-2 and float((got - want).abs().max()) <= 1e-4 * effect + 1e-5


@pytest.mark.parametrize("deep", [False, True], ids=["copied", "deep-copied"])
def test_runtime_lora_refuses_a_copy_on_another_model(comfy_model, deep):
    """Made after HY-WU Apply (a MultiGPU node downstream, or the dynamic model's delegate): the copy's
    object patches would run the original layers; its first model call stops with a clear error and the
    runtime clone itself still runs."""
    from hywu_nodes.nodes.types import HYWUError

    inp = _inputs()
    runtime = _apply(_dynamic_like(comfy_model), _lora(1), "runtime")
    delegate = runtime.get_non_dynamic_delegate() if not deep else _on_copy(runtime, deep_object_patches=True)
    assert delegate.model is not runtime.model and delegate.object_patches
    if deep:  # a deep copy keeps the one wrapper the object patches report to, and never copies the model
        assert _runtime_wrappers(delegate)[0] is _runtime_wrappers(runtime)[0]
    with pytest.raises(HYWUError, match="copy of the model .* Set mode to 'patch'"):
        _call(delegate, inp)
    assert torch.isfinite(_call(runtime, inp)).all()


def test_multigpu_model_falls_back_to_patch_mode_with_a_warning(comfy_model, caplog):
    inp, lora = _inputs(), _lora(2)
    multi = _multigpu(comfy_model)
    with caplog.at_level(logging.WARNING, logger="HY-WU"):
        out = _apply(multi, lora, "runtime")
    assert "using patch mode" in caplog.text and "multi-GPU" in caplog.text
    assert not _runtime_wrappers(out) and not out.object_patches and out.patches
    assert out.get_additional_models_with_key("multigpu")  # ComfyUI still carries its multi-GPU clones
    torch.testing.assert_close(_call(out, inp), _call(_apply(comfy_model, lora, "patch"), inp), rtol=0, atol=0)


def test_multigpu_model_refuses_one_lora_per_sample(comfy_model):
    from hywu_nodes.nodes.types import HYWUError, HYWULoRA

    loras = [_lora(3), _lora(4)]
    with pytest.raises(HYWUError, match=r"multi-GPU clone.*Set batch_index to 0\.\.1"):
        _apply(_multigpu(comfy_model), HYWULoRA(loras[0], batch=loras), "runtime", -1)
    out = _apply(_multigpu(comfy_model), HYWULoRA(loras[0], batch=loras), "runtime", 1)  # one of them: patch mode
    assert out.patches and not _runtime_wrappers(out)
