"""Character-level text for the language-model problems: the two corpora in ``l2l_fused/corpora`` (CPython's
documentation and source, written by ``scripts/make_corpora.py``). Nothing is downloaded."""

from __future__ import annotations

import functools
import gzip
import os

import torch
from torch import Tensor

from .data import SPLITS, DataError, split_bounds

CORPORA_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "corpora")
CORPORA = ("python-docs", "python-source")
# Newline and the 95 printable ASCII characters; anything else reads as "?".
VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))
_UNKNOWN = VOCAB.index("?")


def encode(text: str) -> Tensor:
    """Token ids ``[len(text)]`` (int64) in ``[0, len(VOCAB))``."""
    table = torch.full((128,), _UNKNOWN, dtype=torch.int64)
    table[torch.tensor([ord(c) for c in VOCAB])] = torch.arange(len(VOCAB))
    codes = torch.tensor([min(ord(c), 127) for c in text], dtype=torch.int64)
    return table[codes]


@functools.lru_cache(maxsize=None)
def load_corpus(name: str) -> Tensor:
    """A shipped corpus (one of ``CORPORA``) as token ids."""
    if name not in CORPORA:
        raise ValueError(f"corpus must be one of {list(CORPORA)}, got {name!r}")
    path = os.path.join(CORPORA_DIR, f"{name}.txt.gz")
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            text = f.read()
    except (OSError, EOFError, UnicodeDecodeError) as error:
        raise DataError(f"{path}: cannot read the corpus ({error})") from error
    return encode(text)


def corpus_splits(name: str) -> dict[str, Tensor]:
    """Disjoint contiguous 60/20/20 stretches of a corpus for ``"train"``, ``"val"`` and ``"test"``."""
    tokens = load_corpus(name)
    return {split: tokens[a:b] for split, (a, b) in zip(SPLITS, split_bounds(len(tokens)))}
