"""A progress line on stderr for ``qsurgeon prune``: transformer block, epoch, round, energy.

It consumes the event dicts :func:`~qsurgeon.server.engine.run.run_prune` emits. On a
terminal it rewrites one line in place (carriage return); when stderr is a file or a
pipe it prints a line per finished block instead, so logs stay readable.
"""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class ProgressBar:
    """Callable progress sink: ``ProgressBar()(event)``."""

    def __init__(self, stream: TextIO | None = None, width: int = 24, min_interval: float = 0.1):
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.width = width
        self.min_interval = min_interval
        self.blocks = 0
        self.started = time.perf_counter()
        self._last_draw = 0.0
        self._line_open = False

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self.blocks = int(event.get("blocks", 0))
            self.started = time.perf_counter()
            resumed = event.get("resumed_blocks", 0)
            note = f", resuming after block {resumed}" if resumed else ""
            self._print(f"pruning {event.get('tensors')} tensors in {self.blocks} blocks "
                        f"({event.get('tokens')} calibration tokens{note})")
        elif kind == "block":
            self._draw(self._bar(int(event["block"])) + f" block {int(event['block']) + 1}/{self.blocks}", force=True)
        elif kind == "round":
            initial = event.get("initial_energy") or 0.0
            energy = float(event.get("energy", 0.0))
            change = f" ({100.0 * (energy / initial - 1.0):+.1f}%)" if initial else ""
            self._draw(
                self._bar(int(event["block"])) + f" block {int(event['block']) + 1}/{self.blocks}"
                f" epoch {event.get('epoch')}/{event.get('epochs')} round {event.get('round')}"
                f" blocks {event.get('blocks')} accepted {event.get('accepted')} energy {energy:.4g}{change}"
            )
        elif kind == "block_done":
            line = (self._bar(int(event["block"]) + 1) + f" block {int(event['block']) + 1}/{self.blocks} done,"
                    f" mean relative error {float(event.get('error', 0.0)):.4f}")
            if self.interactive:
                self._draw(line, force=True)
            else:
                self._print(line)
        elif kind == "done":
            self._print(f"done in {float(event.get('seconds', 0.0)):.1f} s")

    def _bar(self, done_blocks: int) -> str:
        filled = int(self.width * done_blocks / self.blocks) if self.blocks else 0
        elapsed = time.perf_counter() - self.started
        return f"[{'#' * filled}{'.' * (self.width - filled)}] {elapsed:6.1f}s"

    def _draw(self, line: str, force: bool = False) -> None:
        if not self.interactive:
            return
        now = time.perf_counter()
        if not force and now - self._last_draw < self.min_interval:
            return
        self._last_draw = now
        self.stream.write("\r\x1b[2K" + line)
        self.stream.flush()
        self._line_open = True

    def _print(self, line: str) -> None:
        if self._line_open:
            self.stream.write("\n")
            self._line_open = False
        self.stream.write(line + "\n")
        self.stream.flush()
