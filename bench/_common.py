"""Shared by the bench scripts (run as `python bench/NAME.py`, so this folder is on sys.path)."""

from __future__ import annotations

import json
from typing import Optional


def emit(result: dict, out: Optional[str]) -> int:
    """Print `result` as indented JSON and, with `out`, write the same text there; exit status 0."""
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0
