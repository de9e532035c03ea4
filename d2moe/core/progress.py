"""Progress bars for long commands: tqdm on a terminal, nothing otherwise (logs stay clean)."""

from __future__ import annotations

import sys
from typing import Any


def progress_bar(total: int, enabled: bool, desc: str, unit: str, *,
                 delay_s: float = 0.0) -> Any:
    """A tqdm bar of `total` units when enabled, stderr is a terminal and tqdm is installed,
    else None (callers guard `bar.update` with `if bar`). With `delay_s` the bar shows only
    once the work has taken that many seconds (a quick run prints nothing)."""
    if not enabled or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, unit=unit, delay=delay_s)
