"""Import-only stand-in for torchvision (see tests/stubs/hywu_import_only.py)."""
import sys

from hywu_import_only import fill

fill(sys.modules[__name__], ["transforms", "transforms.functional", "models", "ops", "io", "utils"])
