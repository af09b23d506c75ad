"""The ops, one readable home each (see docs/kernels.md):

* ``interface.py``: the entry point of every op, the single place where a backend is chosen, and the
  autograd Function of the fused backends;
* ``reference.py``: the specification, in plain PyTorch, with the fused entry points' signatures;
* ``triton/`` (``math.py``, ``forward.py``, ``backward.py``) and ``native.py`` (the C++/CUDA kernels of
  ``csrc/``): the fused backends;
* ``layout.py`` (φ packed as every kernel reads it), ``update.py`` (the optimizer's options of a step),
  ``launch_table.py`` (the device tables of a Triton launch), ``constants.py`` (shared with C++).
"""
