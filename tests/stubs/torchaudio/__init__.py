"""Import-only stand-in for torchaudio (see tests/stubs/hywu_import_only.py)."""
import sys

from hywu_import_only import fill

fill(sys.modules[__name__], ["functional", "transforms", "compliance", "compliance.kaldi", "io", "utils"])
