"""A plain PyTorch training loop with the shipped learned optimizer in AdamW's place.

    python examples/train_digits.py [--steps 300] [--compare-adamw]

Trains a small MLP classifier on scikit-learn's handwritten digits (1,797 8×8 images; 1,500 to train, the
rest held out) with ``L2LOptimizer(model.parameters(), net=l2l_fused.pretrained("mlp-digits"))``, the net
meta-trained on these digits. The loop is the one any model would use: forward, backward, ``opt.step()``, ``opt.zero_grad()``; AMP-style gradient
overflow is handled by the optimizer (NaN/inf coordinates are skipped and counted).
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from l2l_fused import L2LOptimizer, pretrained
from l2l_fused.meta import load_digits


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Sigmoid(), nn.Linear(32, 10))


def train(optimizer_name: str, steps: int, seed: int, batch_size: int = 128) -> dict:
    data = load_digits()
    split = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(data.labels), generator=split)
    train_idx, test_idx = order[:1500], order[1500:]
    torch.manual_seed(seed)
    model = make_model()
    if optimizer_name == "l2l":
        opt = L2LOptimizer(model.parameters(), net=pretrained("mlp-digits"))
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=3e-2)
    batches = torch.Generator().manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        index = train_idx[torch.randint(len(train_idx), (batch_size,), generator=batches)]
        loss = F.cross_entropy(model(data.images[index]), data.labels[index])
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    with torch.no_grad():
        logits = model(data.images[test_idx])
        accuracy = (logits.argmax(1) == data.labels[test_idx]).float().mean().item()
    result = {"optimizer": optimizer_name, "first_loss": losses[0], "last_loss": sum(losses[-10:]) / 10,
              "test_accuracy": accuracy}
    if optimizer_name == "l2l":
        result["skipped_coordinates"] = opt.skipped_coordinates().item()
    return result


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--compare-adamw", action="store_true", help="also train with AdamW (lr 3e-2)")
    args = parser.parse_args(argv)
    results = [train(name, args.steps, args.seed) for name in (["l2l", "adamw"] if args.compare_adamw else ["l2l"])]
    for r in results:
        print(f"{r['optimizer']:>6}: loss {r['first_loss']:.3f} -> {r['last_loss']:.3f} (mean of the last 10 "
              f"steps), held-out accuracy {r['test_accuracy']:.3f}")
    return results


if __name__ == "__main__":
    main()
