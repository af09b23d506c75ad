"""Every Triton kernel configuration the backends launch, ready to compile for Hopper (sm_90) on any
machine: the one list that bench/perf_model.py compiles, reports and models (and CI with it).

Triton's interpreter runs kernels without compiling them, so it accepts code the compiler rejects (a
variable of two types across a runtime branch, say): compiling every configuration catches that.
"""

from __future__ import annotations

import os
import sys
from typing import NamedTuple

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("kernel_configs: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from l2l_fused.ops.layout import NetShape  # noqa: E402
from l2l_fused.ops.precision import PRECISIONS  # noqa: E402
from l2l_fused.ops.triton import backward as triton_backward  # noqa: E402
from l2l_fused.ops.triton import forward as triton_forward  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
HOPPER_SHARED_PER_BLOCK = 227 * 1024  # an H100 block's opt-in maximum; a kernel asking more fails to launch


def forward_signature() -> dict:
    return {"table_ptr": "*i64", "block_tensor_ptr": "*i32", "t_ptr": "*fp32", "skipped_ptr": "*i64", "lr_ptr": "*fp32",
            "num_blocks": "i32", "output_scale": "fp32", "inv_p": "fp32", "threshold": "fp32", "exp_p": "fp32",
            "lr": "fp32", "weight_decay": "fp32"}


def forward_configs():
    """(name, constexprs, signature): the default launch (aligned tensors) over the nets the tests and the
    paper use, in both precisions; the optimizer's (group=True: skipping, lr, weight decay; a float lr
    unless lr=tensor), and meta-training's forward (group=False) for the paper's net."""
    for layers, hidden, features, state, group, lr_tensor in [
        (2, 20, 2, torch.float32, True, False), (2, 20, 2, torch.float32, True, True),
        (2, 20, 2, torch.bfloat16, True, False), (1, 20, 1, torch.float32, True, False),
        (3, 64, 2, torch.float32, True, False), (1, 33, 2, torch.bfloat16, True, False),
        (2, 5, 2, torch.float32, True, False), (2, 20, 2, torch.float32, False, False),
    ]:
        for precision in PRECISIONS:
            shape = NetShape(layers, hidden, features, 10.0 if features == 2 else None, 0.1)
            block_n, _, _ = triton_forward.launch_config(shape, precision)
            constexprs = {**triton_forward.kernel_constants(shape, state, precision, block_n), "GROUP_STEP": group,
                          "LR_TENSOR": lr_tensor, "MAXIMIZE": lr_tensor, "ALIGNED": True}
            lr = " lr=tensor maximize" if lr_tensor else ""
            yield (f"forward {precision} L={layers} H={hidden} in={features} state={constexprs['STATE_DTYPE']} "
                   f"group={group}{lr}", constexprs, forward_signature())


def backward_configs():
    """(name, constexprs, signature): the backward over the nets the tests and the paper use, in both
    precisions; the paper's net also from a bfloat16 saved state (meta-training's saved_state_dtype)."""
    for layers, hidden, features, state in [(2, 20, 2, torch.float32), (2, 20, 2, torch.bfloat16), (1, 20, 1, torch.float32),
                                            (3, 64, 2, torch.float32), (2, 5, 2, torch.float32)]:
        for precision in PRECISIONS:
            shape = NetShape(layers, hidden, features, 10.0 if features == 2 else None, 0.1)
            constexprs = {**triton_backward.kernel_constants(shape, state, precision), "ALIGNED": True}
            state_type = "*bf16" if state == torch.bfloat16 else "*fp32"
            signature = {"grad_ptr": "*fp32", "h_ptr": state_type, "c_ptr": state_type}
            signature.update({name: "*fp32" for name in ("dtheta_ptr", "dh_next_ptr", "dc_next_ptr", "dh_ptr", "dc_ptr",
                                                         "partial_ptr")})
            signature["tiles_ptr"] = "*i64"
            signature.update(n_coords="i32", num_blocks="i32", output_scale="fp32", inv_p="fp32", threshold="fp32",
                             exp_p="fp32")
            yield (f"backward {precision} L={layers} H={hidden} in={features} state={state_type[1:]}", constexprs,
                   signature)


class Job(NamedTuple):
    name: str
    kernel: object  # the @triton.jit function
    options: dict  # triton.compile options
    constexprs: dict
    signature: dict  # every argument, the constexprs marked "constexpr"
    is_default: bool  # the paper's net with float32 state, as the optimizer and meta-training launch it
    block_n: int
    num_warps: int


PAPER_NET = {"L": 2, "H": 20, "IN": 2}  # layers, hidden size, input features (preprocessed gradient)


def jobs() -> list[Job]:
    """Every Triton kernel configuration of forward_configs() and backward_configs(), ready to compile: the
    one list this report and bench/perf_model.py read."""
    def job(kernel, options, name, constexprs, signature):
        default = (all(constexprs[k] == v for k, v in PAPER_NET.items())
                   and constexprs.get("STATE_DTYPE", tl.float32) == tl.float32 and signature.get("h_ptr", "*fp32") == "*fp32"
                   and not constexprs.get("LR_TENSOR", False))
        return Job(name, kernel, options, constexprs, {**signature, **{k: "constexpr" for k in constexprs}}, default,
                   constexprs["BLOCK_N"], options["num_warps"])

    def forward_options(constexprs):
        shape = NetShape(constexprs["L"], constexprs["H"], constexprs["IN"], 10.0 if constexprs["PREPROCESS"] else None, 0.1)
        _, warps, stages = triton_forward.launch_config(shape, "exact" if constexprs["EXACT"] else "fast")
        return {"num_warps": warps, "num_stages": stages}

    backward_options = {"num_warps": triton_backward.NUM_WARPS, "num_stages": triton_backward.NUM_STAGES}
    return ([job(triton_forward._l2l_fwd_kernel, forward_options(config[1]), *config) for config in forward_configs()]
            + [job(triton_backward._l2l_bwd_kernel, backward_options, *config) for config in backward_configs()])
