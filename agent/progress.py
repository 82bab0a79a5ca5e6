"""Progress bars for long first-time work (model assembly, NF4 conversion)."""

from __future__ import annotations

import sys
from collections.abc import Callable


def byte_bar(total: int, description: str) -> Callable[[int], None]:
    """A tqdm bar over `total` bytes; returns its `update`. Silent when not a terminal."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, unit="B", unit_scale=True, leave=False,
               disable=not sys.stderr.isatty())
    return bar.update


def step_bar(total: int, description: str) -> Callable[[int], None]:
    """A tqdm bar over `total` steps (tensors, layers)."""
    from tqdm import tqdm

    bar = tqdm(total=total, desc=description, leave=False, disable=not sys.stderr.isatty())
    return bar.update
