"""Test-only ComfyUI nodes, linked into the test server next to the pack (never shipped to users):
IMAGE tensors that no core node makes (one or two channels, an empty batch, NaN pixels), to test
HY-WU Condition Encode's checks through the real server; tiny FLUX / Qwen-Image models and text
encoders built with ComfyUI's own classes (tiny_dit.py and the per-family modules)."""
import torch


class HYWUTestImage:
    CATEGORY = "HY-WU tests"
    RETURN_TYPES = ("IMAGE",)
    FUNCTION = "make"
    DESCRIPTION = "Test helper: an IMAGE of any batch, size and channel count, filled with noise or NaN."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "batch": ("INT", {"default": 1, "min": 0, "max": 8, "tooltip": "images in the batch"}),
            "size": ("INT", {"default": 64, "min": 1, "max": 512, "tooltip": "height and width"}),
            "channels": ("INT", {"default": 3, "min": 1, "max": 8, "tooltip": "channels per pixel"}),
            "fill": (["noise", "nan", "inf"], {"tooltip": "pixel values"}),
        }}

    def make(self, batch, size, channels, fill):
        image = torch.rand(batch, size, size, channels, generator=torch.Generator().manual_seed(0))
        if fill != "noise":
            image[:, : size // 2] = float(fill)
        return (image,)


from .tiny_dit import HYWUTestTinyDiTLoader  # noqa: E402
from .tiny_flux2 import HYWUTestTinyFlux2Loader, HYWUTestTinyFlux2TE, HYWUTestTinyFlux2VAE  # noqa: E402
from .tiny_flux_te import HYWUTestTinyFluxTE, HYWUTestTinyVAE  # noqa: E402
from .tiny_qwen_te import HYWUTestQwenEditEncode, HYWUTestTinyQwenTE  # noqa: E402

NODE_CLASS_MAPPINGS = {"HYWUTestImage": HYWUTestImage, "HYWUTestTinyDiTLoader": HYWUTestTinyDiTLoader,
                       "HYWUTestTinyFluxTE": HYWUTestTinyFluxTE, "HYWUTestTinyVAE": HYWUTestTinyVAE,
                       "HYWUTestTinyQwenTE": HYWUTestTinyQwenTE, "HYWUTestQwenEditEncode": HYWUTestQwenEditEncode,
                       "HYWUTestTinyFlux2Loader": HYWUTestTinyFlux2Loader, "HYWUTestTinyFlux2TE": HYWUTestTinyFlux2TE,
                       "HYWUTestTinyFlux2VAE": HYWUTestTinyFlux2VAE}
NODE_DISPLAY_NAME_MAPPINGS = {"HYWUTestImage": "HY-WU test image (tests only)",
                              "HYWUTestTinyDiTLoader": "HY-WU test tiny DiT loader (tests only)",
                              "HYWUTestTinyFluxTE": "HY-WU test tiny FLUX text encoders (tests only)",
                              "HYWUTestTinyVAE": "HY-WU test tiny VAE (tests only)",
                              "HYWUTestTinyQwenTE": "HY-WU test tiny Qwen2.5-VL text encoder (tests only)",
                              "HYWUTestQwenEditEncode": "HY-WU test Qwen edit encode at small sizes (tests only)",
                              "HYWUTestTinyFlux2Loader": "HY-WU test tiny FLUX.2 loader (tests only)",
                              "HYWUTestTinyFlux2TE": "HY-WU test tiny klein Qwen3 text encoder (tests only)",
                              "HYWUTestTinyFlux2VAE": "HY-WU test tiny FLUX.2 VAE (tests only)"}
