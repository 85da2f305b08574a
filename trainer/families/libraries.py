"""The diffusers / transformers releases the trainer needs, checked when it starts (not an hour
in, as an AttributeError deep in a family adapter).

Floors (also in requirements-train.txt and pyproject's ``train`` extra), measured with older
releases installed over the venv (pip --target + PYTHONPATH, tiny bases rebuilt by them): at these
floors tests/test_train_families.py trains every family, tests/test_family_qwen_parity.py passes
(both Qwen families) and qwen_image_edit_plus trains; the release before each fails:
- diffusers 0.37.0: the Qwen-Image transformer takes ``encoder_hidden_states_mask`` alone
  (0.36.0 still needs ``txt_seq_lens`` and fails in qwen_image_edit), and Qwen-Image-Edit-2511's
  transformer config sets ``zero_cond_t``, which 0.36.0 ignores with only a warning. The classes
  came earlier: FluxKontextPipeline, QwenImageTransformer2DModel, AutoencoderKLQwenImage and
  QwenImageEditPipeline in 0.35.0, QwenImageEditPlusPipeline (2509) in 0.36.0.
- transformers 4.56.0: ``from_pretrained(..., dtype=)`` (4.55 passes ``dtype`` on to the model's
  constructor: TypeError). Qwen2_5_VLModel with the vision tower and ``text_config`` came in 4.52.
"""
from __future__ import annotations

import importlib

FLOORS = {"diffusers": "0.37.0", "transformers": "4.56.0"}

# Per family: the classes its adapter loads (imported by the check), and the diffusers pipeline
# whose conventions it follows (looked up by name only: importing a pipeline pulls in image
# processors the trainer never uses).
FAMILY_CLASSES = {
    "sd15_ip2p": {
        "diffusers": ["UNet2DConditionModel", "AutoencoderKL", "AutoencoderTiny", "DDPMScheduler", "DDIMScheduler"],
        "transformers": ["CLIPTextModel", "AutoTokenizer"],
        "pipelines": ["StableDiffusionInstructPix2PixPipeline"],
    },
    "flux_kontext": {
        "diffusers": ["FluxTransformer2DModel", "AutoencoderKL", "FlowMatchEulerDiscreteScheduler"],
        "transformers": ["T5EncoderModel", "CLIPTextModel", "AutoTokenizer"],
        "pipelines": ["FluxKontextPipeline"],
    },
    "qwen_image_edit": {
        "diffusers": ["QwenImageTransformer2DModel", "AutoencoderKLQwenImage", "FlowMatchEulerDiscreteScheduler"],
        "transformers": ["AutoModel", "Qwen2_5_VLModel", "Qwen2_5_VLForConditionalGeneration", "AutoTokenizer"],
        "pipelines": ["QwenImageEditPipeline"],
    },
    # Qwen-Image-Edit-2509/2511 (issue 15 adds the adapter)
    "qwen_image_edit_plus": {
        "diffusers": ["QwenImageTransformer2DModel", "AutoencoderKLQwenImage", "FlowMatchEulerDiscreteScheduler"],
        "transformers": ["AutoModel", "Qwen2_5_VLModel", "Qwen2_5_VLForConditionalGeneration", "AutoTokenizer"],
        "pipelines": ["QwenImageEditPlusPipeline"],
    },
    "flux2_klein": {
        "diffusers": ["Flux2Transformer2DModel", "AutoencoderKLFlux2"],
        "transformers": ["Qwen3Model", "AutoTokenizer"],
        "pipelines": ["Flux2KleinPipeline"],
    },
}


class LibraryVersionError(ImportError):
    """diffusers or transformers is too old (or lacks a class); the message names what to install."""


def _install_hint() -> str:
    return ("Install them with: pip install -U " + " ".join(f"'{n}>={v}'" for n, v in FLOORS.items())
            + " (or pip install -r requirements-train.txt).")


def check_libraries(families=None, modules: dict | None = None) -> None:
    """Raise :class:`LibraryVersionError` unless the installed diffusers and transformers are at
    least :data:`FLOORS` and have every class ``families`` (default: all) use. ``modules`` maps
    "diffusers"/"transformers" to a module (tests pass stand-ins); default: import them."""
    from packaging.version import InvalidVersion, Version

    names = list(FAMILY_CLASSES) if families is None else [families] if isinstance(families, str) else list(families)
    names = [f for f in names if f in FAMILY_CLASSES]  # a family not listed yet: the floors only (a test lists them all)
    mods = dict(modules or {})
    for lib in FLOORS:
        if lib not in mods:
            try:
                mods[lib] = importlib.import_module(lib)
            except ImportError as e:
                raise LibraryVersionError(f"the trainer needs {lib}>={FLOORS[lib]}, and {lib} does not import ({e}). "
                                          f"{_install_hint()}") from None
    old = []
    for lib, floor in FLOORS.items():
        found = str(getattr(mods[lib], "__version__", "unknown"))
        try:
            too_old = Version(found) < Version(floor)
        except InvalidVersion:
            too_old = True
        if too_old:
            old.append(f"{lib} {found} is installed, the trainer needs {lib}>={floor}")
    if old:
        raise LibraryVersionError("; ".join(old) + f" (the oldest release its base families work with). {_install_hint()}")
    missing = []
    for fam in names:
        for lib in FLOORS:
            for cls in FAMILY_CLASSES[fam][lib]:
                try:
                    getattr(mods[lib], cls)
                except (AttributeError, ImportError, RuntimeError) as e:  # lazy modules raise on a broken import
                    missing.append(f"{lib}.{cls} (base family {fam}: {type(e).__name__})")
        for cls in FAMILY_CLASSES[fam]["pipelines"]:
            if cls not in dir(mods["diffusers"]):
                missing.append(f"diffusers.{cls} (base family {fam})")
    if missing:
        versions = ", ".join(f"{lib} {getattr(mods[lib], '__version__', 'unknown')}" for lib in FLOORS)
        raise LibraryVersionError(f"the installed {versions} lack {', '.join(missing)}. {_install_hint()}")
