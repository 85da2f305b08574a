"""The one error a generator file can raise."""
from __future__ import annotations


class GeneratorFileError(ValueError):
    """A file that is not a usable HY-WU generator. The message says what is wrong and what to do;
    ``kind`` names the failure for callers that add their own advice (e.g. "pickle", "truncated",
    "metadata", "mismatch", "too_large")."""

    def __init__(self, message: str, kind: str = "invalid"):
        super().__init__(message)
        self.kind = kind
