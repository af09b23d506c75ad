"""The Triton launcher's device tables: cached, and safe to use while a CUDA graph is captured.

A launch reads two small int64/int32 tables from device memory: one row per tensor (addresses, size,
dtype code, first block) and a block→tensor map. They depend only on addresses and sizes, so they are
cached; a step whose tensors did not move uploads nothing. Gradients that are new tensors each step (as
after ``zero_grad(set_to_none=True)``) usually come back at the same addresses from PyTorch's caching
allocator; when they do not, the new table goes up asynchronously, and the step is still one launch.

Under capture (:mod:`l2l_fused.capture`) a graph keeps reading a table's address at every replay, so:

* a cached table the capture uses is held from then on, whatever the cache evicts (its upload was
  enqueued before the capture, so its contents are there when the graph runs);
* a table the capture has to make is uploaded inside the graph, from a host copy held with it: every
  replay repeats the copy, from the same bytes. It is never served to an eager step, nor to another
  capture: its contents arrive only when its own graph runs.

Held tables live as long as the process; they are ten int64 per tensor per captured graph.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from typing import Callable

import torch
from torch import Tensor

from . import capture

# One row per tensor, ten int64 columns: addresses of θ in, θ out, ∇, h in, h out, c in, c out, then the
# size, the dtype code and the tensor's first block.
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2, torch.float64: 3}


class _LRU(OrderedDict):
    def __init__(self, capacity: int) -> None:
        super().__init__()
        self.capacity = capacity

    def put(self, key, value):
        self[key] = value
        if len(self) > self.capacity:
            self.popitem(last=False)
        return value

    def hit(self, key):
        value = self.get(key)
        if value is not None:
            self.move_to_end(key)
        return value


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


class LaunchTables:
    def __init__(self, capacity: int = 16) -> None:
        self.pointers = _LRU(capacity)
        self.blocks = _LRU(capacity)
        self.held: list = []  # what captured graphs read: tables, and the host copies they replay from

    def get(self, rows: list[tuple[Tensor, ...]], block_n: int, device: torch.device) -> tuple[Tensor, Tensor, int]:
        """``(table, block→tensor map, number of blocks)`` for a launch over ``rows``, each
        ``(θ in, θ out, ∇, h in, h out, c in, c out)``, of ``block_n`` coordinates per program."""
        graph = capture.capturing()
        sizes = tuple(row[0].numel() for row in rows)
        counts = [_cdiv(n, block_n) for n in sizes]

        def block_map() -> tuple[Tensor, int]:
            host = torch.repeat_interleave(torch.arange(len(rows), dtype=torch.int32), torch.tensor(counts))
            return self._upload(host, device, graph), sum(counts)

        def table() -> Tensor:
            firsts = [0] + list(itertools.accumulate(counts))[:-1]
            host = torch.tensor([[t.data_ptr() for t in row] + [n, DTYPE_CODES[row[0].dtype], first]
                                 for row, n, first in zip(rows, sizes, firsts)], dtype=torch.int64)
            return self._upload(host, device, graph)

        block_tensor, num_blocks = self._entry(self.blocks, (device, block_n, sizes), block_map, graph)
        key = (device, block_n) + tuple((t.data_ptr(), t.numel(), t.dtype) for r in rows for t in r)
        return self._entry(self.pointers, key, table, graph), block_tensor, num_blocks

    def _entry(self, cache: _LRU, key, make: Callable, graph: bool):
        entry = cache.hit(key)
        if not graph:
            return entry if entry is not None else cache.put(key, make())
        if entry is None:
            entry = make()  # for this capture only: not cached
        self.held.append(entry)
        return entry

    def _upload(self, host: Tensor, device: torch.device, graph: bool) -> Tensor:
        """Host → device without making the host wait for the device."""
        if device.type != "cuda":
            return host
        if graph:
            self.held.append(host)  # the captured copy reads these bytes at every replay
            return host.to(device, non_blocking=True)
        # Pinned, so the copy is asynchronous: a pageable one would wait for all queued GPU work.
        return host.pin_memory().to(device, non_blocking=True)
