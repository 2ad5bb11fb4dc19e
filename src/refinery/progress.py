"""Progress bars for long work: one place sets their look and when they show.

Bars go to stderr and hide themselves when stderr is not a terminal (CI logs,
captured test output), unless ``REFINERY_PROGRESS=1`` forces them on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def disabled() -> bool:
    forced = os.environ.get("REFINERY_PROGRESS")
    if forced is not None:
        return forced in ("0", "false", "no")
    return not sys.stderr.isatty()


def bar(iterable: Iterable[T] | None = None, **kwargs: Any) -> tqdm:
    """A tqdm bar with the project's defaults (``desc``, ``total``, ``unit`` as in tqdm)."""
    kwargs.setdefault("mininterval", 0.5)
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("disable", disabled())
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)


def byte_bar(total: int | None, desc: str, initial: int = 0) -> tqdm:
    """A bar counting bytes, with rate (``12.3MB/s``) and size shown in binary units."""
    return bar(total=total, desc=desc, initial=initial, unit="B", unit_scale=True,
               unit_divisor=1024)
