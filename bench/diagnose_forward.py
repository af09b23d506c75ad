"""Where a forward configuration goes wrong on a GPU: the elements of θ', h' and c' (per layer) that miss
the float64 reference, over repeated runs and over precisions, block sizes and warps.

    python bench/diagnose_forward.py --layers 3 --hidden 64 --p 3.0 --n 777
"""

from __future__ import annotations

import argparse
import copy
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
from helpers import adversarial_grad, random_net, random_state  # noqa: E402

from l2l_fused import l2l_update_ref  # noqa: E402
from l2l_fused.ops.layout import NetShape  # noqa: E402
from l2l_fused.ops.triton import forward as triton_forward  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--p", type=float, default=3.0)
    parser.add_argument("--n", type=int, default=777)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    net = random_net(args.hidden, args.layers, args.p, 0.5).cuda()
    n = args.n
    theta = torch.randn(n, device="cuda")
    grad = adversarial_grad(n, args.p).cuda()
    h, c = (s.cuda() for s in random_state(net, n))
    net64 = copy.deepcopy(net).double().cpu()
    with torch.no_grad():
        delta, h64, c64 = l2l_update_ref(grad.double().cpu(), h.double().cpu(), c.double().cpu(), net64.cell_weights(),
                                         net64.head.weight, net64.head.bias, preprocess_p=args.p, output_scale=0.5)
    weights = net.kernel_weights(theta.device)
    for precision, block_n, warps in [("exact", None, None), ("fast", None, None), ("exact", 64, 4), ("exact", 128, 8),
                                      ("fast", 64, 4)]:
        for _ in range(args.repeats):
            outs = [torch.full_like(theta, float("nan")), torch.full_like(h, float("nan")), torch.full_like(c, float("nan"))]
            triton_forward.launch_forward([(theta, outs[0], grad, h, outs[1], c, outs[2])], weights, NetShape.of(net),
                                          precision=precision, block_n=block_n, num_warps=warps)
            torch.cuda.synchronize()
            d = (outs[0].double().cpu() - theta.double().cpu()) - delta
            bad_theta = (d.abs() > 1e-3).nonzero().flatten().tolist()
            per_layer = []
            for layer in range(args.layers):
                eh = (outs[1][layer].double().cpu() - h64[layer]).abs().amax(1)
                ec = (outs[2][layer].double().cpu() - c64[layer]).abs().amax(1)
                per_layer.append(f"L{layer}: h bad {int((eh > 1e-3).sum())} c bad {int((ec > 1e-3).sum())} "
                                 f"nan {int(outs[1][layer].isnan().any(1).sum())}")
            print(f"{precision:>5} BLOCK_N={block_n} warps={warps}: θ' bad {len(bad_theta)} {bad_theta[:8]} | "
                  + " | ".join(per_layer), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
