"""Writes the two text corpora shipped in l2l_fused/corpora (run once, under Python 3.11.7; kept so their
provenance is checkable). Both are CPython's own text, under the PSF License:

- python-docs.txt.gz: the reference-manual topics that ``help()`` shows (``pydoc_data.topics``), English
  prose with code; the general optimizer's language models meta-train on it.
- python-source.txt.gz: the source of a dozen pure-Python standard-library modules; the held-out suite's
  language model trains on it (data the optimizer never saw).
"""

import gzip
import inspect
import os
import sys

import pydoc_data.topics

SOURCE_MODULES = ("json.decoder", "json.encoder", "textwrap", "heapq", "bisect", "fractions", "statistics",
                  "string", "shlex", "difflib", "calendar", "colorsys")


def main() -> None:
    out = os.path.join(os.path.dirname(__file__), "..", "l2l_fused", "corpora")
    docs = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    source = "\n".join(inspect.getsource(__import__(name, fromlist=["_"])) for name in SOURCE_MODULES)
    for name, text in (("python-docs", docs), ("python-source", source)):
        with gzip.GzipFile(os.path.join(out, f"{name}.txt.gz"), "wb", mtime=0) as f:
            f.write(text.encode("utf-8"))
        print(f"{name}: {len(text)} characters (Python {sys.version.split()[0]})")


if __name__ == "__main__":
    main()
