"""Progress reporting: a tqdm bar on a terminal (MB, docs/s, tokens/s, ETA), a plain log line every ~10 s otherwise."""

from __future__ import annotations

import sys
import time

LOG_EVERY_S = 10.0


def log(message: str) -> None:
    print(f"data_prep: {message}", file=sys.stderr, flush=True)


class Progress:
    """`update(docs, bytes_read_total, tokens)` (cumulative bytes) or `advance(docs, bytes, tokens)` (increments)
    per batch or unit; `total` (bytes, optional) gives the ETA; `finish(extra)` at the end."""

    def __init__(self, what: str, total: int | None = None):
        self.what = what
        self.total = total
        self.start = time.monotonic()
        self.docs = self.tokens = self.bytes = 0
        self._last_log = self.start
        self._bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm  # imported only for a terminal: the import alone costs ~50 ms of start-up

            self._bar = tqdm(desc=what, unit="B", unit_scale=True, file=sys.stderr, dynamic_ncols=True, total=total)

    def _elapsed(self) -> float:
        return max(time.monotonic() - self.start, 1e-9)

    def _rate(self) -> float:
        return self.bytes / 1e6 / self._elapsed()

    def _eta(self) -> str:
        if not self.total or not self.bytes:
            return "?"
        return f"{max(self.total - self.bytes, 0) / (self.bytes / self._elapsed()):.0f} s"

    def update(self, docs: int, bytes_total: int, tokens: int = 0) -> None:
        self.advance(docs, bytes_total - self.bytes, tokens)

    def advance(self, docs: int, nbytes: int, tokens: int = 0) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        now = time.monotonic()
        if self._bar is not None:
            if self.total is not None and self._bar.total != self.total:
                self._bar.total = self.total
            self._bar.update(nbytes)
            elapsed = self._elapsed()
            self._bar.set_postfix_str(f"{self.docs / elapsed:,.0f} docs/s, {self.tokens / elapsed:,.0f} tokens/s",
                                      refresh=False)
        elif now - self._last_log >= LOG_EVERY_S:
            self._last_log = now
            elapsed = self._elapsed()
            log(f"{self.what}: {self.docs:,} docs ({self.docs / elapsed:,.0f}/s), {self.tokens:,} tokens "
                f"({self.tokens / elapsed:,.0f}/s), {self.bytes / 1e6:,.1f} MB ({self._rate():.1f} MB/s), "
                f"ETA {self._eta()}")

    def finish(self, extra: str = "") -> None:
        if self._bar is not None:
            self._bar.close()
        elapsed = self._elapsed()
        tokens = f"{self.tokens:,} tokens, " if self.tokens else ""
        log(f"{self.what} done: {self.docs:,} docs, {tokens}{self.bytes / 1e6:,.1f} MB in {elapsed:.1f} s "
            f"({self._rate():.1f} MB/s){extra}")
