"""Progress on stderr for ``qsurgeon prune`` and ``qsurgeon demo``, drawn with tqdm.

It consumes the event dicts :func:`~qsurgeon.server.engine.run.run_prune` emits
(``start``, ``block``, ``round``, ``block_done``, ``done``) and only changes what is
shown, never the events. Two kinds of "block" meet here and are named apart: a
*transformer block* of the model (``event["block"]`` of ``blocks``) and the *QUBOs* that
iCBS solves in each of its rounds (``event["blocks"]`` of a ``round`` event).

On a terminal, tqdm draws one bar over the transformer blocks with the elapsed time and
an ETA, and the current round after it; each finished transformer block leaves a line
above the bar. When stderr is a file or a pipe nothing is redrawn: every update is a
plain line with the same ETA (round lines at most every ``log_interval`` seconds), so
logs stay readable.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm import tqdm

#: the bar on a terminal: ``transformer block 3/6 ███▍      2/6 [00:24<00:48], epoch 1/1, round 3: ...``
_BAR_FORMAT = "{desc} {bar:16} {n_fmt}/{total_fmt} [{elapsed}<{remaining}]{postfix}"
#: the time part of a plain line: ``[00:24 elapsed, ETA 00:48]`` (the ETA from finished transformer blocks)
_TIME_FORMAT = "[{elapsed} elapsed, ETA {remaining}]"


class ProgressBar:
    """Callable progress sink: ``ProgressBar()(event)``.

    ``notice``, if given, is printed once when the first transformer block starts (the CLI
    passes :func:`kernel_compile_notice` there: the first round is where numba compiles).
    """

    def __init__(self, stream: TextIO | None = None, notice: str | None = None, log_interval: float = 10.0):
        self.stream = stream or sys.stderr
        self.interactive = bool(getattr(self.stream, "isatty", lambda: False)())
        self.notice = notice
        self.log_interval = log_interval
        self.blocks = 0
        self.bar: tqdm | None = None
        self._rounds = 0
        self._qubos = 0
        self._last_log = -math.inf

    def __call__(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        if kind == "start":
            self._start(event)
        elif kind == "block":
            self._rounds = self._qubos = 0
            if self.notice:
                self._print(self.notice)
                self.notice = None
            if self.bar is not None:
                self.bar.set_description_str(self._name(event), refresh=False)
                self.bar.set_postfix_str("calibrating", refresh=self.interactive)
        elif kind == "round":
            self._round(event)
        elif kind == "block_done":
            if self.bar is not None:
                self.bar.set_postfix_str("", refresh=False)
                self.bar.update(int(event["block"]) + 1 - self.bar.n)
            rounds = f"{self._rounds} round{'s' if self._rounds > 1 else ''}"
            search = f"{rounds}, {self._qubos} QUBOs solved, " if self._rounds else ""
            self._print(f"{self._name(event)} done: {search}mean relative error "
                        f"{float(event.get('error', 0.0)):.4f} {self._time()}")
        elif kind == "done":
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            self._print(f"done in {float(event.get('seconds', 0.0)):.1f} s")

    def _start(self, event: dict[str, Any]) -> None:
        self.blocks = int(event.get("blocks", 0))
        resumed = int(event.get("resumed_blocks", 0) or 0)
        note = f", resuming after transformer block {resumed}" if resumed else ""
        self._print(f"pruning {event.get('tensors')} linears in {self.blocks} transformer blocks "
                    f"({event.get('tokens')} calibration tokens{note})")
        if self.bar is not None:
            self.bar.close()
        # smoothing=0: the ETA comes from the mean time per transformer block so far (`initial`
        # blocks, finished before a resume, do not count). Off a terminal the bar is never drawn
        # (delay=inf); it only keeps the clock that the plain lines quote.
        self.bar = tqdm(total=self.blocks, initial=resumed, file=self.stream, leave=False, smoothing=0,
                        dynamic_ncols=True, bar_format=_BAR_FORMAT, desc="transformer blocks",
                        delay=0 if self.interactive else math.inf)

    def _round(self, event: dict[str, Any]) -> None:
        qubos = int(event.get("blocks", 0))
        self._rounds += 1
        self._qubos += qubos
        initial = event.get("initial_energy") or 0.0
        energy = float(event.get("energy", 0.0))
        change = f" ({100.0 * (energy / initial - 1.0):+.1f}%)" if initial else ""
        status = (f"epoch {event.get('epoch')}/{event.get('epochs')}, round {event.get('round')}: {qubos} QUBOs, "
                  f"{event.get('accepted')} accepted, energy {energy:.4g}{change}")
        if self.bar is not None:
            self.bar.set_postfix_str(status, refresh=self.interactive)
        if not self.interactive:
            now = self.bar.format_dict["elapsed"] if self.bar is not None else 0.0
            if now - self._last_log >= self.log_interval:
                self._last_log = now
                self._print(f"{self._name(event)}, {status} {self._time()}")

    def _name(self, event: dict[str, Any]) -> str:
        return f"transformer block {int(event['block']) + 1}/{self.blocks}"

    def _time(self) -> str:
        if self.bar is None:
            return ""
        return tqdm.format_meter(**{**self.bar.format_dict, "bar_format": _TIME_FORMAT, "postfix": None})

    def _print(self, line: str) -> None:
        if self.interactive and self.bar is not None:
            self.bar.write(line, file=self.stream)  # above the bar, which is redrawn below
        else:
            self.stream.write(line + "\n")
            self.stream.flush()


def _kernels_cached(kernels: list[Any]) -> bool:
    """Whether every numba dispatcher is compiled in this process or has a fresh on-disk cache index."""
    for kernel in kernels:
        if kernel.signatures:  # compiled (or loaded from the cache) in this process already
            continue
        cache = getattr(kernel, "_cache", None)
        try:
            # numba's own check: the index exists and its stamp matches the source file; {} if stale
            if not cache._cache_file._load_index():
                return False
        except Exception:  # numba internals moved: fall back to "an index file exists"
            name = kernel.py_func.__name__
            if not any(Path(getattr(cache, "cache_path", "")).glob(f"*.{name}-*.nbi")):
                return False
    return True


def kernel_compile_notice(method: str = "icbs", objective: str = "layerwise", solver: str = "auto") -> str | None:
    """A one-line notice if the numba kernels this iCBS run will call are not cached yet, else None.

    They are compiled with ``cache=True`` on their first call (the first iCBS round): the
    first run on a machine, or after their source changed, pays for it once; later runs
    load them from numba's cache. Other methods and solvers compile nothing of these.
    """
    if method != "icbs":
        return None
    try:
        import torch

        from qsurgeon.server.pruning import qubo
        from qsurgeon.worker.solvers import sa_cpu
    except ImportError:
        return None
    kernels: list[Any] = []
    if objective != "fisher":
        kernels.append(qubo._layerwise_kernel)  # builds the layer-wise QUBOs of a round
    if solver == "sa" and not torch.cuda.is_available():  # sa anneals with sa_cpu's kernels on the CPU
        kernels += ([sa_cpu.init_factored, sa_cpu.anneal_factored] if objective == "fisher"
                    else [sa_cpu.init_dense, sa_cpu.anneal_dense])
    # auto and swap-tabu: which kernels run depends on the block sizes; the QUBO kernel above
    # compiles on every first run, so the notice still shows when it matters
    if not kernels or _kernels_cached(kernels):
        return None
    return ("first run only: numba is compiling the iCBS kernels (QUBO construction, annealing) during the first "
            "round, about half a minute; they are cached for later runs")
