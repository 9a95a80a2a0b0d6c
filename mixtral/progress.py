"""Progress bars for the commands that run for minutes on big models (convert, quantize, bench,
eval): tqdm on stderr, so that stdout keeps only the command's result.

A bar is drawn where someone watches it: by default only when stderr is a terminal (in a log
file or a pipe it would be lines of carriage returns). Callers switch it off where it would
spoil their own output (`bench --json`) or on a follower rank, and on where a log should show
it (eval's leader). Long jobs in the library report progress through plain callbacks and never
import this module.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def bar(total: float | None, desc: str, unit: str = "it", *, shown: bool | None = None,
        **options: Any) -> tqdm:
    """A tqdm bar on stderr; `shown` None: only if stderr is a terminal. Bytes: unit="B"."""
    if shown is None:
        shown = sys.stderr.isatty()
    if unit == "B":  # 1.2G/93.4G rather than 1234567890B/...
        options = {"unit_scale": True, "unit_divisor": 1024, **options}
    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True,
                disable=not shown, **options)


class Stages:
    """One bar per stage of a job that reports `progress(stage, done, total)` (bytes), labelled
    "<desc>: <stage>"; use it as a context manager so the last bar is closed."""

    def __init__(self, desc: str, *, shown: bool | None = None) -> None:
        self.desc, self.shown = desc, shown
        self.stage: str | None = None
        self.bar: tqdm | None = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        if stage != self.stage or self.bar is None:
            self.close()
            self.stage, self.bar = stage, bar(total, f"{self.desc}: {stage}", "B",
                                              shown=self.shown)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Stages:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
