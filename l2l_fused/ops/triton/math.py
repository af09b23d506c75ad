"""Per-coordinate math of the step as Triton device functions, shared by the forward and backward kernels.

Every function works on a block of coordinates: gradients ``[BLOCK_N]``, states ``[BLOCK_N, HP]`` with the
hidden size H padded to HP (a power of two, at least 16) in registers; padded columns hold zeros. φ is
read as host-made tensor-core tiles (:func:`l2l_fused.ops.triton.forward.tensor_core_weights`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from ..interface import TRITON_INTERPRETED


# Whether the kernels run on a GPU, where they use PTX's approximate instructions (one MUFU operation
# each), or in Triton's interpreter, which runs no inline PTX: there the same formulas use numpy's exp,
# log and division, which differ from the instructions by their ≤ 2 ulp (ex2, rcp, lg2; tanh.approx:
# docs/kernels.md).
HARDWARE = tl.constexpr(not TRITON_INTERPRETED)


@triton.jit
def _unary_ptx(x, instruction: tl.constexpr):
    return tl.inline_asm_elementwise(instruction + " $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _exp2(x):
    if HARDWARE:
        y = _unary_ptx(x, "ex2.approx.ftz.f32")
    else:
        y = tl.exp2(x)
    return y


@triton.jit
def _rcp(x):
    if HARDWARE:
        y = _unary_ptx(x, "rcp.approx.ftz.f32")
    else:
        y = 1.0 / x
    return y


@triton.jit
def _log(x):
    if HARDWARE:
        y = _unary_ptx(x, "lg2.approx.ftz.f32") * 0.6931471805599453
    else:
        y = tl.log(x)
    return y


LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _logistic2(y):
    """1 / (1 + 2^y): one ``ex2.approx`` and one ``rcp.approx`` (each ≤ 2 ulp; flushing subnormals changes
    nothing here, 1 + 2^y ≥ 1), no IEEE division. σ(x) is this at y = −x·log₂e. NaN stays NaN."""
    return _rcp(1.0 + _exp2(y))


@triton.jit
def _tanh(x):
    """2σ(2x) − 1: never overflows (2^y = inf gives −1). Absolute error ~1e-7 near 0, where the
    subtraction cancels; relative ~1e-7 elsewhere."""
    return 2.0 * _logistic2(x * (-2.0 * LOG2E)) - 1.0


@triton.jit
def _tanh_fast(x):
    """``tanh.approx.f32``: one MUFU operation, relative error ≤ 2⁻¹⁰·⁹⁸⁷ (PTX ISA), the fast mode's activation."""
    if HARDWARE:
        y = _unary_ptx(x, "tanh.approx.f32")
    else:
        y = _tanh(x)
    return y


@triton.jit
def _to_bf16(x):
    """float32 → bfloat16, rounded to nearest even (NaN stays NaN). On the GPU the conversion instruction
    does it; Triton's interpreter truncates in ``.to(tl.bfloat16)``, so there it is written out: CI tests
    the rounding the GPU does."""
    if HARDWARE:
        y = x.to(tl.bfloat16, fp_downcast_rounding="rtne")
    else:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # keep NaN a NaN (the carry could make it inf)
        y = rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return y


@triton.jit
def _to_state(x, STATE_DTYPE: tl.constexpr):
    if STATE_DTYPE == tl.bfloat16:
        y = _to_bf16(x)
    else:
        y = x
    return y


@triton.jit
def _load_f32(addr, offs, mask, code):
    """Values of a float32/bfloat16/float16/float64 tensor at ``addr``, as float32."""
    if code == 0:
        v = tl.load(addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask, other=0.0)
    elif code == 1:
        v = tl.load(addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask, other=0.0).to(tl.float32)
    elif code == 2:
        v = tl.load(addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask, other=0.0).to(tl.float32)
    else:
        v = tl.load(addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask, other=0.0).to(tl.float32)
    return v


@triton.jit
def _store_theta_plus(in_addr, out_addr, offs, mask, code, decay, delta):
    """θ' = θ·decay + Δ, in float32 (float64 for float64 θ) and rounded once to θ's dtype.

    Nothing is assigned inside the branches: compiled Triton needs one type per variable across them."""
    if code == 0:
        tl.store(out_addr.to(tl.pointer_type(tl.float32)) + offs,
                 tl.load(in_addr.to(tl.pointer_type(tl.float32)) + offs, mask=mask) * decay + delta, mask=mask)
    elif code == 1:
        tl.store(out_addr.to(tl.pointer_type(tl.bfloat16)) + offs,
                 _to_bf16(tl.load(in_addr.to(tl.pointer_type(tl.bfloat16)) + offs, mask=mask).to(tl.float32) * decay
                          + delta),
                 mask=mask)
    elif code == 2:
        tl.store(out_addr.to(tl.pointer_type(tl.float16)) + offs,
                 (tl.load(in_addr.to(tl.pointer_type(tl.float16)) + offs, mask=mask).to(tl.float32) * decay
                  + delta).to(tl.float16),
                 mask=mask)
    else:
        tl.store(out_addr.to(tl.pointer_type(tl.float64)) + offs,
                 tl.load(in_addr.to(tl.pointer_type(tl.float64)) + offs, mask=mask) * decay + delta.to(tl.float64),
                 mask=mask)


@triton.jit
def _features(g, inv_p, threshold, exp_p, PREPROCESS: tl.constexpr):
    """The first layer's input (docs/spec.md §1): ``(log|g|/p, sign g)`` or ``(-1, e^p g)``, or g alone."""
    if PREPROCESS:
        mag = tl.abs(g)
        large = mag >= threshold
        x0 = tl.where(large, _log(tl.where(large, mag, 1.0)) * inv_p, -1.0)
        x1 = tl.where(large, tl.where(g > 0, 1.0, -1.0), g * exp_p)
    else:
        x0 = g
        x1 = g
    return x0, x1


@triton.jit
def _truncate_tf32(x):
    """x with its 13 low mantissa bits cleared: what the tensor cores read of a float32 operand."""
    return (x.to(tl.uint32, bitcast=True) & 0xFFFFE000).to(tl.float32, bitcast=True)


@triton.jit
def _tf32(x):
    """An operand as the tensor cores multiply it: on the GPU they truncate it themselves; the interpreter's
    dot computes in float32, so there it is truncated here, and CI runs the products the GPU computes."""
    if HARDWARE:
        y = x
    else:
        y = _truncate_tf32(x)
    return y


@triton.jit
def _dot_tf32(a, b_hi, b_lo, acc, EXACT: tl.constexpr, INF: tl.constexpr):
    """acc + a·b on the tensor cores, from b's TF32 split made on the host (``forward.tensor_core_weights``;
    b_lo unused unless EXACT).

    Fast: one pass; a truncated to TF32 (≤ 2⁻¹⁰ relative), b rounded (≤ 2⁻¹¹): each product within
    1.5·2⁻¹⁰ of float32's. Exact: three passes, a = a_hi + a_lo with a_hi truncated (one LOP3) and a_lo
    exact, small terms first; a_lo's truncation (≤ 2⁻²⁰|a|), b's split (≤ 2⁻²²|b|) and the dropped
    a_lo·b_lo (≤ 2⁻²¹|ab|) leave each product within 1.75·2⁻²⁰ ≈ 1.7e-6 of float32's, about float32's
    own rounding of these few-dozen-term sums (docs/kernels.md, "Arithmetic modes"). INF: a may hold ±inf,
    whose a_lo must be 0, not inf − inf (a NaN stays NaN either way, through a_lo)."""
    if EXACT:
        a_hi = _truncate_tf32(a)
        if INF:
            a_lo = tl.where(a_hi == a, 0.0, a - a_hi)
        else:
            a_lo = a - a_hi
        acc = tl.dot(_tf32(a_lo), b_hi, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_lo, acc, input_precision="tf32")
        acc = tl.dot(a_hi, b_hi, acc, input_precision="tf32")
    else:
        acc = tl.dot(_tf32(a), b_hi, acc, input_precision="tf32")
    return acc


@triton.jit
def _dot_data(a, b, acc, EXACT: tl.constexpr, INF: tl.constexpr):
    """acc + a·b on the tensor cores where both operands are data (the backward's weight gradients): as
    :func:`_dot_tf32`, b split in the kernel. Fast: each product within 2·2⁻¹⁰ of float32's (both operands
    truncated). Exact: b_lo's truncation adds ≤ 2⁻²⁰|ab| to :func:`_dot_tf32`'s bound, ≤ 2.75·2⁻²⁰ per product."""
    if EXACT:
        b_hi = _truncate_tf32(b)
        acc = _dot_tf32(a, b_hi, _tf32(b - b_hi), acc, True, INF)
    else:
        acc = _dot_tf32(a, _tf32(b), b, acc, False, INF)
    return acc


@triton.jit
def _join_gates(i, f, g, o, BLOCK_N: tl.constexpr, HP: tl.constexpr):
    """``[BLOCK_N, 4·HP]``, columns gate·HP + unit, from four ``[BLOCK_N, HP]`` gates: :func:`_split_gates`
    undone."""
    t = tl.join(tl.join(i, g), tl.join(f, o))  # [n, unit, a, b]: gate 2a + b
    return tl.reshape(tl.permute(t, (0, 2, 3, 1)), [BLOCK_N, 4 * HP])


@triton.jit
def _split_gates(z, BLOCK_N: tl.constexpr, HP: tl.constexpr):
    """The four gates ``[BLOCK_N, HP]`` of pre-activations ``[BLOCK_N, 4·HP]`` whose columns are gate·HP + unit."""
    t = tl.permute(tl.reshape(z, [BLOCK_N, 2, 2, HP]), (0, 3, 1, 2))  # [n, unit, a, b]: gate 2a + b
    even, odd = tl.split(t)  # b = 0: gates 0 (i) and 2 (g); b = 1: gates 1 (f) and 3 (o)
    i, g = tl.split(even)
    f, o = tl.split(odd)
    return i, f, g, o
