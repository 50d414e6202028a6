"""A progress bar on stderr: tqdm when installed, else a small built-in one."""
from __future__ import annotations

import sys
import time


class _SimpleBar:
    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.enabled = max(total, 1), desc, enabled
        self.n, self.t0, self.postfix = 0, time.perf_counter(), ""

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text
        self._draw()

    def update(self, n: int = 1) -> None:
        self.n += n
        self._draw()

    def _draw(self) -> None:
        if not self.enabled:
            return
        width = 24
        done = int(width * self.n / self.total)
        elapsed = time.perf_counter() - self.t0
        sys.stderr.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.n}/{self.total} "
                         f"{elapsed:5.0f}s {self.postfix[:50]:<50}")
        sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def progress_bar(total: int, desc: str = "bench", enabled: bool = True):
    """An object with ``update(n)``, ``set_postfix_str(text)`` and ``close()``."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleBar(total, desc, enabled)
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False,
                dynamic_ncols=True)
