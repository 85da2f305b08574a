# ---------------------------------------------------------------------------------------------
# Real-ComfyUI infrastructure fixtures (tests/comfy_harness.py). Owner: test infra.
#   micro_base   -> MicroBase(diffusers_dir, checkpoint, comfyui): the seeded micro
#                   SD1.5-InstructPix2Pix base (built by scripts/build_micro_base.py if missing)
#   comfy_server -> one headless ComfyUI per session (tests/comfy_harness.ComfyServer) with the
#                   repo linked as custom_nodes/ComfyUI-HY-WU and the micro checkpoint installed
# Other fixtures go below this block.
# ---------------------------------------------------------------------------------------------
import collections
import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
if str(_TESTS) not in sys.path:
    sys.path.insert(0, str(_TESTS))
_REPO = _TESTS.parent

MicroBase = collections.namedtuple("MicroBase", "diffusers_dir checkpoint comfyui")


@pytest.fixture(scope="session")
def micro_base():
    import comfy_harness

    comfy = comfy_harness.comfyui_path()
    sys.path.insert(0, str(_REPO / "scripts"))
    try:
        import build_micro_base as bmb
    finally:
        sys.path.remove(str(_REPO / "scripts"))
    d, ckpt = bmb.ensure_micro_base(comfyui_path=comfy)
    return MicroBase(Path(d), Path(ckpt), comfy)


@pytest.fixture(scope="session")
def comfy_server(micro_base):
    import comfy_harness

    with comfy_harness.ComfyServer(checkpoints=[micro_base.checkpoint],
                                   custom_nodes=[_TESTS / "comfy_test_nodes"]) as srv:
        yield srv

# ---------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------
# HY-WU nodes fixtures (tests/test_nodes*.py, test_workflows*.py, test_frontend*.py). Owner: nodes.
#   hywu_env -> the comfy_server with the test generators (scripts/build_test_generator.py) and
#               a few deliberately wrong files in models/hywu/, and the workflows' input images.
#   The session server also loads tests/comfy_test_nodes (test-only IMAGE maker).
# ---------------------------------------------------------------------------------------------
HywuEnv = collections.namedtuple("HywuEnv", "server generators images bad_files")


@pytest.fixture(scope="session")
def hywu_env(comfy_server, micro_base):
    import torch
    from safetensors.torch import save_file

    sys.path.insert(0, str(_REPO / "scripts"))
    try:
        import build_test_generator as btg
    finally:
        sys.path.remove(str(_REPO / "scripts"))
    gens = btg.build_test_generators(base_dir=micro_base.diffusers_dir)
    hywu_dir = comfy_server.models_dir / "hywu"
    hywu_dir.mkdir(parents=True, exist_ok=True)
    for p in gens.values():
        link = hywu_dir / Path(p).name
        if not link.exists():
            link.symlink_to(Path(p).resolve())
    bad = {
        # a LoRA-like safetensors file without HY-WU metadata
        "not_generator": "hywu_not_a_generator.safetensors",
        # a generator cut in half (header promises more bytes than the file has)
        "truncated": "hywu_truncated.safetensors",
        # a pickled file: must never be listed or loaded
        "pickle": "hywu_pickled.pt",
    }
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(4, 2), "lora_unet_x.lora_down.weight": torch.zeros(2, 4)},
              str(hywu_dir / bad["not_generator"]))
    data = Path(gens["seeded"]).read_bytes()
    (hywu_dir / bad["truncated"]).write_bytes(data[: len(data) // 2])
    torch.save({"w": torch.zeros(1)}, hywu_dir / bad["pickle"])
    from hywu_graphs import make_test_image

    images = {  # the workflows' own images are copied into input/ by the pack when the server starts
        "demo": "hywu_demo_input.png",
        "example": "hywu_example.png",
        "other": comfy_server.put_input(make_test_image(1), "hywu_other_input.png"),
    }
    return HywuEnv(comfy_server, {k: Path(v).name for k, v in gens.items()}, images, bad)
