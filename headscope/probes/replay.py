"""Block replay: skip recomputing the blocks an intervention cannot change.

An intervention inside layer l (a head ablated, a query scaled) cannot change
what blocks 0..l-1 compute on the same inputs. ``BlockReplay`` records every
block's output on one clean pass; inside ``below(l)`` those blocks return
their recorded output without running. The result is exact: the very tensors
a full forward would produce. Head importance (one forward per head) and the
safety-head sweeps (``headscope.probes.last_position``) use it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from headscope.errors import HeadscopeError


class BlockReplay:
    """Records every block's output on one pass; later passes can replay the blocks below a layer.

    Inside ``below(l)`` blocks 0..l-1 return their recorded output without
    running (their ``forward`` is swapped for a lookup on the instance, and
    put back on exit). Valid only for the very inputs that were recorded (the
    same batch, and the same cached prefix when a KV cache is used: a replayed
    block does not append to the cache, which only the blocks that run read).
    """

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        self.blocks = blocks
        self.outputs: list[Any] = [None] * len(blocks)

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Record this batch's block outputs (the previous batch's are dropped first)."""
        self.outputs = [None] * len(self.blocks)

        def keep(layer: int) -> Callable:
            def hook(_module, _inputs, output) -> None:
                self.outputs[layer] = output

            return hook

        removers = [block.register_forward_hook(keep(i)) for i, block in enumerate(self.blocks)]
        try:
            yield
        finally:
            for remover in removers:
                remover.remove()

    @contextlib.contextmanager
    def below(self, layer: int) -> Iterator[None]:
        if any(output is None for output in self.outputs[:layer]):
            raise HeadscopeError("block outputs were not recorded before replaying them")
        swapped = []
        try:
            for i in range(layer):
                block = self.blocks[i]
                swapped.append((block, block.__dict__.get("forward")))
                block.forward = _returning(self.outputs[i])
            yield
        finally:
            for block, previous in swapped:
                if previous is None:
                    del block.forward
                else:
                    block.forward = previous


def _returning(output: Any) -> Callable:
    def forward(*_args, **_kwargs):
        return output

    return forward
