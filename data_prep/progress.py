"""Progress reporting: a tqdm bar on a terminal, a plain log line every ~10 s otherwise (batch logs stay small)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

LOG_EVERY_S = 10.0


def log(message: str) -> None:
    print(f"data_prep: {message}", file=sys.stderr, flush=True)


class Progress:
    """Call `update(docs, bytes_read_total, tokens)` per batch and `finish(extra)` at the end."""

    def __init__(self, what: str):
        self.what = what
        self.start = time.monotonic()
        self.docs = self.tokens = self.bytes = 0
        self._last_log = self.start
        self._bar = tqdm(desc=what, unit=" docs", file=sys.stderr, dynamic_ncols=True) if sys.stderr.isatty() else None

    def _rate(self) -> float:
        return self.bytes / 1e6 / max(time.monotonic() - self.start, 1e-9)

    def update(self, docs: int, bytes_total: int, tokens: int = 0) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes = bytes_total
        now = time.monotonic()
        if self._bar is not None:
            self._bar.update(docs)
            self._bar.set_postfix_str(f"{self._rate():.1f} MB/s", refresh=False)
        elif now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            log(f"{self.what}: {self.docs:,} docs, {self.tokens:,} tokens, {self.bytes / 1e6:,.1f} MB read, "
                f"{self._rate():.1f} MB/s")

    def finish(self, extra: str = "") -> None:
        if self._bar is not None:
            self._bar.close()
        elapsed = time.monotonic() - self.start
        tokens = f"{self.tokens:,} tokens, " if self.tokens else ""
        log(f"{self.what} done: {self.docs:,} docs, {tokens}{self.bytes / 1e6:,.1f} MB in {elapsed:.1f} s "
            f"({self._rate():.1f} MB/s){extra}")
