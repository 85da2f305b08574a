"""Import-only stand-ins for torchvision and torchaudio, used by the tests ONLY when the real
package cannot be imported (tests/comfy_harness.py puts tests/stubs on sys.path / PYTHONPATH then).

Why: ComfyUI imports both at module level in model files that `comfy.sd` (and so `nodes.py`)
imports (0.3.75: torchvision for Stable Cascade, Cosmos, ACE; 0.30 also torchaudio for its audio
VAEs and encoders), but no family tested here calls them. The only wheels reachable here are
CUDA torchvision builds whose C extension cannot load against the CPU torch 2.13 in .venv (a
matching install would replace torch), and torchaudio releases that stop at 2.11. Anything
actually used from a stub raises, so a test that needed the real package fails loudly.
"""
import sys
import types

HYWU_STUB = True


class _Missing:
    def __init__(self, name):
        self._name = name

    def __getattr__(self, item):
        return _Missing(f"{self._name}.{item}")

    def __call__(self, *a, **k):
        root = self._name.split(".")[0]
        raise RuntimeError(f"{self._name}: {root} is not installed (tests/stubs stand-in)")

    def __mro_entries__(self, bases):  # `class X(torchaudio.transforms.Foo)` at import time
        return (object,)


class _StubModule(types.ModuleType):
    def __getattr__(self, item):
        if item.startswith("__"):
            raise AttributeError(item)
        return _Missing(f"{self.__name__}.{item}")


def fill(package: types.ModuleType, submodules: list[str]) -> None:
    """Make `package` an import-only stub with these (dotted) submodules."""
    package.__version__ = "0.0.0+hywu.stub"
    package.HYWU_STUB = True
    package.__class__ = _StubModule
    for name in submodules:
        full = f"{package.__name__}.{name}"
        m = _StubModule(full)
        m.__file__ = package.__file__
        sys.modules[full] = m
        parent = sys.modules[full.rsplit(".", 1)[0]]
        setattr(parent, name.rsplit(".", 1)[-1], m)
