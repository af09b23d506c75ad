"""The ``"triton"`` backend: ``math.py`` (per-coordinate device functions), ``forward.py`` (the step's kernel,
its launcher, meta-training's out-of-place step and the optimizer's in-place custom op), ``backward.py``
(the fused backward). Importing either imports triton, which ``import l2l_fused`` does not do."""
