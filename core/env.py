"""The offline environment: nothing is ever downloaded at run time, and no library prints per-file bars.

One dict, used by launch.py (this process), cluster/run.py (every Ray actor's process) and the tests.
"""
from __future__ import annotations

import os

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
               "HF_HUB_DISABLE_PROGRESS_BARS": "1", "TRANSFORMERS_VERBOSITY": "error"}


def set_offline_env() -> None:
    """OFFLINE_ENV into this process's environment, keeping any value the user set."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
