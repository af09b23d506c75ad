"""CUDA-graph capture as the step sees it.

While a graph is captured, host code runs once and only the GPU work it enqueues is recorded: a replay
repeats that work, never the host's decisions. So whatever the step reads at replay (state, counters,
launch tables, φ) must outlive the capture, hold at replay what the captured work expects, and must not be
made by the captured work itself (a captured ``torch.zeros`` would reset the state at every replay).
"""

from __future__ import annotations

import torch


def capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph.

    Never without CUDA (a CPU build of torch raises on the question itself), nor while torch.compile
    traces: the traced step must not branch on a host query, and inductor's CUDA graphs check their
    own inputs, as ``torch.optim`` leaves them to."""
    if torch.compiler.is_compiling():
        return False
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()
