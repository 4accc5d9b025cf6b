"""The plan of an iCBS run: which lines get a block in each epoch, how steps group into rounds, the seeds.

All randomness is keyed by (config.seed, what it is for, tensor name, epoch/round index)
instead of coming from a running generator: a run resumed at any round draws exactly
what an uninterrupted run would have drawn there.
"""

from __future__ import annotations

import math
import zlib
from typing import Any

import torch

from qsurgeon.server.engine.icbs.state import TensorContext
from qsurgeon.server.engine.options import ICBSConfig

#: Bytes of float32 block matrices one round may hold; a sweep is cut into rounds below this.
ROUND_BYTES = 256 << 20


def keyed_generator(seed: int, *parts: Any) -> torch.Generator:
    """A generator keyed by (seed, parts): no state is shared between rounds or tensors."""
    key = zlib.crc32(repr((int(seed),) + tuple(parts)).encode())
    return torch.Generator().manual_seed(key)


def round_seed(seed: int, round_index: int) -> int:
    """The solver's seed for one round."""
    return zlib.crc32(repr(("solver", int(seed), int(round_index))).encode()) & 0x7FFFFFFF


def plan_epoch(contexts: list[TensorContext], config: ICBSConfig, epoch: int) -> list[tuple[int, int]]:
    """The epoch's steps as (tensor index, line): a full sweep, or steps ∝ log10(size)."""
    couples_tensor = config.objective != "layerwise"
    if config.steps_per_epoch is None:
        passes = [_passes(context, config) for context in contexts]
        per_tensor = [list(range(context.lines)) * count for context, count in zip(contexts, passes)]
        if not couples_tensor and not any(context.by_column for context in contexts):
            # pass by pass: every line once, then the lines of wide tensors again
            return [(t, line) for repeat in range(max(passes)) for t, context in enumerate(contexts)
                    if repeat < passes[t] for line in range(context.lines)]
        steps = []  # interleave tensors so consecutive steps rarely conflict
        for position in range(max(len(lines) for lines in per_tensor)):
            steps.extend((t, lines[position]) for t, lines in enumerate(per_tensor) if position < len(lines))
        return steps
    sizes = [math.log10(max(10, context.task.weight.numel())) for context in contexts]
    share = [max(1, int(round(config.steps_per_epoch * size / sum(sizes)))) for size in sizes]
    steps = []
    for t, (context, count) in enumerate(zip(contexts, share)):
        generator = keyed_generator(config.seed, "lines", context.task.name, epoch)
        lines = torch.cat([torch.randperm(context.lines, generator=generator)
                           for _ in range(-(-count // context.lines))])[:count]
        steps.extend((t, int(line)) for line in lines)
    order = torch.randperm(len(steps), generator=keyed_generator(config.seed, "order", epoch))
    return [steps[int(i)] for i in order]


def _passes(context: TensorContext, config: ICBSConfig) -> int:
    """Blocks per line in a full sweep: enough to put ``coverage`` of each line's weights in blocks."""
    length = context.rank.shape[1]
    return max(1, int(round(config.coverage * length / context.block)))


def _round_limit(config: ICBSConfig) -> int:
    if config.round_blocks is not None:
        return config.round_blocks
    return max(1, ROUND_BYTES // (4 * config.block_size * config.block_size))


def round_end(plan: list[tuple[int, int]], cursor: int, contexts: list[TensorContext], config: ICBSConfig) -> int:
    """End of the round that starts at ``cursor``: consecutive steps while they stay independent."""
    limit = _round_limit(config)
    couples_tensor = config.objective != "layerwise"
    taken: set[tuple[int, int]] = set()
    per_tensor: dict[int, int] = {}
    end = cursor
    while end < len(plan) and end - cursor < limit:
        t, line = plan[end]
        context = contexts[t]
        if couples_tensor:
            cap = 1
        elif context.by_column:
            cap = max(1, context.task.weight.shape[0] // context.block)
        else:
            cap = context.lines
        if (t, line) in taken or per_tensor.get(t, 0) >= cap:
            break
        taken.add((t, line))
        per_tensor[t] = per_tensor.get(t, 0) + 1
        end += 1
    return end


__all__ = ["ROUND_BYTES", "keyed_generator", "plan_epoch", "round_end", "round_seed"]
