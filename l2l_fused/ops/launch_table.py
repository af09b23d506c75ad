"""The device tables a Triton forward launch reads, owned by whoever launches the same tensors again.

A launch covers every tensor of a param group through two small tables in device memory: one row per
tensor (the columns of :mod:`l2l_fused.ops.constants`) and a block→tensor map. They depend only on the
tensors' addresses, sizes and dtypes, so the optimizer keeps one :class:`LaunchTable` per param group and
device, and a step whose tensors did not move uploads nothing: it is one kernel launch. When they moved
(new gradient tensors at new addresses, say), the new table goes up asynchronously from pinned memory.

Under CUDA-graph capture (:mod:`l2l_fused.capture`) a graph reads a table's address at every replay, so:

* a table the capture uses is kept for as long as the :class:`LaunchTable` lives, whatever later steps
  need (its upload was enqueued before the capture, or is part of it);
* a table the capture has to make is uploaded inside the graph, from a host copy kept with it: every replay
  repeats the copy, from the same bytes. It is not served to an eager step, whose upload could not be
  relied on to have happened.

Kept tables are keyed by what they hold: capturing the same tensors again reuses one, so they grow with
the distinct sets of addresses captured, not with the number of captures.
"""

from __future__ import annotations

import itertools
import weakref
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor

from .. import capture
from .constants import DTYPE_CODES

_CODES = {getattr(torch, name): code for name, code in DTYPE_CODES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    return _CODES[dtype]


def supported_dtypes() -> list[torch.dtype]:
    return list(_CODES)


@dataclass
class _Entry:
    table: Tensor  # [tensors, columns] int64
    block_map: Tensor  # [blocks] int32: the tensor (row) of each block
    num_blocks: int
    host: tuple[Tensor, ...] = ()  # for an entry made under capture: the bytes its graph copies at each replay


class LaunchTable:
    """The launch tables of one param group on one device (see the module's docstring)."""

    _handles = itertools.count()
    _live: "weakref.WeakValueDictionary[int, LaunchTable]" = weakref.WeakValueDictionary()

    def __init__(self) -> None:
        self.key = None
        self.current: Optional[_Entry] = None
        self._derived: dict[object, tuple[Tensor, int, Tensor]] = {}  # what: (source, its version, derived)
        self.captured: dict[tuple, _Entry] = {}
        # torch.compile sees the optimizer's step as an opaque custom op whose arguments are tensors and
        # numbers: it passes this handle, and the op finds the table with :meth:`find`.
        self.handle = next(LaunchTable._handles)
        LaunchTable._live[self.handle] = self

    @classmethod
    def find(cls, handle: int) -> "LaunchTable":
        """The table of ``handle``, or a temporary one for a handle of no live table (-1, say)."""
        return cls._live.get(handle) or cls()

    def derived(self, source: Tensor, what: object, make: Callable[[], Tensor]) -> Tensor:
        """``make()``, a tensor the launch reads that follows from ``source`` alone (φ in the layout a kernel
        wants), kept until ``source`` is another tensor or changed in place. Under capture it is made
        afresh, in the graph: a replay then reads ``source`` as it is then, as the net's packed φ does."""
        if capture.capturing():
            return make()
        kept = self._derived.get(what)
        if kept is None or kept[0] is not source or kept[1] != source._version:
            kept = self._derived[what] = (source, source._version, make())
        return kept[2]

    def get(self, rows: list[tuple[Tensor, ...]], block_n: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
        """``(table, block→tensor map, number of blocks)`` for a launch over ``rows``, each
        ``(θ in, θ out, ∇, h in, h out, c in, c out)``, of ``block_n`` coordinates per program."""
        key = (device, block_n) + tuple((t.data_ptr(), t.numel(), t.dtype) for row in rows for t in row)
        if not capture.capturing():
            if key != self.key:
                self.key, self.current = key, self._make(rows, block_n, device, graph=False)
            return self.current.table, self.current.block_map, self.current.num_blocks
        entry = self.current if key == self.key else self.captured.get(key)
        if entry is None:
            entry = self._make(rows, block_n, device, graph=True)
        elif entry.host:  # made for an earlier capture: this graph, too, must write it when it replays
            entry.table.copy_(entry.host[0], non_blocking=True)
            entry.block_map.copy_(entry.host[1], non_blocking=True)
        self.captured[key] = entry
        return entry.table, entry.block_map, entry.num_blocks

    @staticmethod
    def _make(rows, block_n: int, device: torch.device, graph: bool) -> _Entry:
        sizes = [row[0].numel() for row in rows]
        counts = [-(-n // block_n) for n in sizes]
        firsts = [0] + list(itertools.accumulate(counts))[:-1]
        table = torch.tensor([[t.data_ptr() for t in row] + [n, dtype_code(row[0].dtype), first]
                              for row, n, first in zip(rows, sizes, firsts)], dtype=torch.int64)
        block_map = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(counts))
        if device.type != "cuda":
            return _Entry(table, block_map, sum(counts))
        if graph:  # the copy is recorded, and every replay reads these host bytes: they are kept with the entry
            host = (table, block_map)
        else:  # pinned, so the copy is asynchronous: a pageable one would wait for all queued GPU work
            host = (table.pin_memory(), block_map.pin_memory())
        return _Entry(host[0].to(device, non_blocking=True), host[1].to(device, non_blocking=True), sum(counts),
                      host if graph else ())
