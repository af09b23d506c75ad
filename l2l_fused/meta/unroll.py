"""Running an optimizee's training under the learned optimizer (the unrolled graph of docs/spec.md §3)."""

from __future__ import annotations

import torch
from torch import Tensor

from ..net import State
from ..net import Nets
from .nets import net_parts
from .tasks import Problem


class Trajectory:
    """One batch of functions being optimized: per parameter group (one group unless the net is a
    ``ModuleDict``), its flat θ, its detached gradient and its net's LSTM state.

    The gradient ∇f(θ_t) is taken from the same evaluation of f that enters the meta-loss, and it is
    detached: no second derivatives (the paper's assumption).
    """

    def __init__(self, net: Nets, problem: Problem, backend: str = "auto") -> None:
        self.problem, self.backend = problem, backend
        self.parts = net_parts(net, len(problem.params), problem.groups)
        # Per group: (index, size, shape) of each of its parameters, to rebuild them from the flat θ.
        self.layout = [[(i, problem.params[i].numel(), problem.params[i].shape) for i in indices]
                       for _, indices in self.parts]
        self.step = 0
        self.thetas = [torch.cat([problem.params[i].reshape(-1) for i in indices]).detach()
                       for _, indices in self.parts]
        self.states: list[State] = [member.init_state(theta.numel(), device=theta.device)
                                    for (member, _), theta in zip(self.parts, self.thetas)]
        with torch.enable_grad():
            self.initial_loss, self.grads = self._loss_and_grads([t.requires_grad_() for t in self.thetas])
        self.thetas = [t.detach() for t in self.thetas]

    def _params(self, thetas: list[Tensor]) -> list[Tensor]:
        params: list[Tensor] = [None] * len(self.problem.params)
        for layout, theta in zip(self.layout, thetas):
            for (i, _, shape), flat in zip(layout, theta.split([size for _, size, _ in layout])):
                params[i] = flat.view(shape)
        return params

    def _loss_and_grads(self, thetas: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        loss = self.problem.loss(self._params(thetas), self.step)
        grads = torch.autograd.grad(loss.sum(), thetas, retain_graph=True)
        return loss, [g.detach() for g in grads]

    def advance(self, steps: int) -> Tensor:
        """Take ``steps`` optimizer steps; return the losses ``[steps, B]`` after each step.

        Under grad mode the losses carry the graph back to φ (and to θ and the state at the start of this
        call, which :meth:`detach` cuts).
        """
        losses = []
        for _ in range(steps):
            thetas = []
            for k, (member, _) in enumerate(self.parts):
                theta, self.states[k] = member(self.thetas[k], self.grads[k], self.states[k], backend=self.backend)
                thetas.append(theta)
            self.step += 1
            with torch.enable_grad():
                # In evaluation there is no graph to φ, but f's gradient is still needed.
                thetas = [t if t.requires_grad else t.requires_grad_() for t in thetas]
                loss, self.grads = self._loss_and_grads(thetas)
            self.thetas = thetas if torch.is_grad_enabled() else [t.detach() for t in thetas]
            losses.append(loss if torch.is_grad_enabled() else loss.detach())
        return torch.stack(losses)

    def detach(self) -> None:
        """End a truncation: later losses no longer backpropagate into earlier steps."""
        self.thetas = [t.detach() for t in self.thetas]
        self.states = [(h.detach(), c.detach()) for h, c in self.states]


@torch.no_grad()
def learned_losses(net: Nets, problem: Problem, steps: int, backend: str = "auto") -> Tensor:
    """Losses ``[steps + 1, B]`` (step 0 = initial) of the learned optimizer, no graph kept."""
    trajectory = Trajectory(net, problem, backend)
    return torch.cat([trajectory.initial_loss.detach()[None], trajectory.advance(steps)])
