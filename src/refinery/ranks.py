"""Which torchrun process this is, read from the environment without importing torch:
the data stages (no torch) ask too, and a torch import costs seconds per stage."""

from __future__ import annotations

import os


def env_rank() -> int:
    """This process's global rank from torchrun's environment (0 outside torchrun)."""
    return int(os.environ.get("RANK", "0"))


def env_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    return env_rank() == 0
