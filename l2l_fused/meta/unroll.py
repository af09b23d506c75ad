"""Running an optimizee's training under the learned optimizer (the unrolled graph of SPEC §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..net import LSTMOptimizerNet, State
from .tasks import Problem


def _unflatten(theta: Tensor, like: list[Tensor]) -> list[Tensor]:
    return [t.view_as(p) for t, p in zip(theta.split([p.numel() for p in like]), like)]


class Trajectory:
    """One batch of functions being optimized by a net: flat θ, its (detached) gradient, the LSTM state.

    The gradient ∇f(θ_t) is taken from the same evaluation of f that enters the meta-loss, and it is
    detached: no second derivatives (the paper's assumption).
    """

    def __init__(self, net: LSTMOptimizerNet, problem: Problem, backend: str = "auto") -> None:
        self.net, self.problem, self.backend = net, problem, backend
        self.step = 0
        self.theta = torch.cat([p.reshape(-1) for p in problem.params]).detach()
        self.state: State = net.init_state(self.theta.numel(), device=self.theta.device)
        with torch.enable_grad():
            self.initial_loss, self.grad = self._loss_and_grad(self.theta.requires_grad_())
        self.theta = self.theta.detach()

    def _loss_and_grad(self, theta: Tensor) -> tuple[Tensor, Tensor]:
        loss = self.problem.loss(_unflatten(theta, self.problem.params), self.step)
        (grad,) = torch.autograd.grad(loss.sum(), theta, retain_graph=True)
        return loss, grad.detach()

    def advance(self, steps: int) -> Tensor:
        """Take ``steps`` optimizer steps; return the losses ``[steps, B]`` after each step.

        Under grad mode the losses carry the graph back to φ (and to θ and the state at the start of this
        call, which :meth:`detach` cuts).
        """
        losses = []
        for _ in range(steps):
            theta, self.state = self.net(self.theta, self.grad, self.state, backend=self.backend)
            self.step += 1
            with torch.enable_grad():
                if not theta.requires_grad:  # evaluation: no graph to φ, but f's gradient is needed
                    theta = theta.requires_grad_()
                loss, self.grad = self._loss_and_grad(theta)
            self.theta = theta if torch.is_grad_enabled() else theta.detach()
            losses.append(loss if torch.is_grad_enabled() else loss.detach())
        return torch.stack(losses)

    def detach(self) -> None:
        """End a truncation: later losses no longer backpropagate into earlier steps."""
        self.theta = self.theta.detach()
        self.state = (self.state[0].detach(), self.state[1].detach())


@torch.no_grad()
def learned_losses(net: LSTMOptimizerNet, problem: Problem, steps: int, backend: str = "auto") -> Tensor:
    """Losses ``[steps + 1, B]`` (step 0 = initial) of the learned optimizer, no graph kept."""
    trajectory = Trajectory(net, problem, backend)
    return torch.cat([trajectory.initial_loss.detach()[None], trajectory.advance(steps)])
