"""Import-only stand-in for torchvision, used by the tests ONLY when no working torchvision
is installed (tests/comfy_harness.py puts tests/stubs on sys.path / PYTHONPATH in that case).

Why: ComfyUI 0.3.75 imports torchvision at module level in a few model files that
`comfy.sd` (and so `nodes.py`) imports (Stable Cascade, Cosmos, ACE), but SD1.5 never calls
it. The only torchvision wheels reachable here are CUDA builds whose C extension cannot load
against the CPU torch 2.13 in .venv, and a matching install would replace torch. Anything
actually used from this stub raises, so a test that needed real torchvision fails loudly.
"""
import sys
import types

__version__ = "0.0.0+hywu.stub"
HYWU_STUB = True


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, item):
        return _Missing(f"{self._name}.{item}")

    def __call__(self, *a, **k):
        raise RuntimeError(f"{self._name}: torchvision is not installed (tests/stubs stand-in)")


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self.__name__}.{item}")


def _sub(name):
    full = f"{__name__}.{name}"
    m = _StubModule(full)
    m.__file__ = __file__
    sys.modules[full] = m
    return m


transforms = _sub("transforms")
transforms.functional = _sub("transforms.functional")
models = _sub("models")
ops = _sub("ops")
io = _sub("io")
utils = _sub("utils")
