"""Decoupled Lion (Chen et al. 2023) with llm-foundry's `DecoupledLionW` semantics.

Composer does not ship it and llm-foundry's dependency set is heavy, so it lives here: per
parameter, `update = sign(beta1*m + (1-beta1)*g)`, `p -= lr*update`, then
`m = beta2*m + (1-beta2)*g`. Weight decay is decoupled from the gradient and scaled by
`lr / initial_lr`, so it follows the schedule instead of the raw learning rate.
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer


class DecoupledLionW(Optimizer):
    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.99, 0.95),
        weight_decay: float = 0.0,
    ):
        if lr <= 0.0:
            raise ValueError(f"learning rate must be positive, got {lr}")
        if not all(0.0 <= beta <= 1.0 for beta in betas):
            raise ValueError(f"betas must lie in [0, 1], got {betas}")
        super().__init__(params, {"lr": lr, "betas": betas, "weight_decay": weight_decay})
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]  # the schedule's peak, reference for the decay

    @staticmethod
    def lionw(p, grad, exp_avg, lr: float, initial_lr: float, wd: float, beta1: float, beta2: float):
        if wd != 0:
            decay_factor = (lr / initial_lr) if initial_lr else 1.0
            p.mul_(1 - decay_factor * wd)
        update = exp_avg.lerp(grad, 1 - beta1).sign_()
        p.add_(update, alpha=-lr)
        exp_avg.lerp_(grad, 1 - beta2)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p)
                self.lionw(p, p.grad, state["exp_avg"], group["lr"], group["initial_lr"],
                           group["weight_decay"], beta1, beta2)
        return loss
