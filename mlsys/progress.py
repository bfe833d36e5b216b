"""Progress on long work: a redrawn tqdm bar on a terminal; in a log file (stderr not a
terminal, e.g. `dvc repro > log`), one plain line per step instead of hundreds of redraws.
MLSYS_PROGRESS=0 turns both off (the stages' ``progress`` argument)."""
from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm


class Lines:
    """The part of tqdm's interface the stages use, printing one line per ``update``:
    ``<desc>: <done>/<total> <unit> (<seconds> s)``."""

    def __init__(self, total: int, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.t0 = time.perf_counter()

    def update(self, n: int = 1) -> None:
        if n:
            self.n += n
            print(f"{self.desc}: {self.n}/{self.total} {self.unit} ({time.perf_counter() - self.t0:.1f} s)",
                  file=sys.stderr, flush=True)

    def set_postfix(self, **_) -> None:
        pass

    def close(self) -> None:
        pass

    def __enter__(self) -> "Lines":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def bar(total: int, desc: str, unit: str, enabled: bool = True, lines: bool = True, leave: bool = True):
    """A progress bar over ``total`` ``unit``s: tqdm on a terminal; elsewhere a :class:`Lines`
    (``lines``) or nothing (for inner loops whose caller prints its own line per step)."""
    if enabled and not sys.stderr.isatty():
        return Lines(total, desc, unit) if lines else tqdm(total=total, disable=True)
    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled, leave=leave)
