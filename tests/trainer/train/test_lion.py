"""DecoupledLionW against the update rule written out by hand."""

from __future__ import annotations

import pytest
import torch

from kubetune_trainer.train.lion import DecoupledLionW

B1, B2, LR = 0.99, 0.95, 0.1


def lion_by_hand(p, m, g, lr=LR, wd=0.0, decay_factor=1.0):
    p = p * (1 - decay_factor * wd)
    update = torch.sign(B1 * m + (1 - B1) * g)
    return p - lr * update, B2 * m + (1 - B2) * g


def test_two_steps_follow_the_update_rule():
    torch.manual_seed(0)
    start = torch.randn(5, 3)
    grads = [torch.randn(5, 3), torch.randn(5, 3)]
    param = torch.nn.Parameter(start.clone())
    optimizer = DecoupledLionW([param], lr=LR, betas=(B1, B2))
    expected, momentum = start, torch.zeros_like(start)
    for grad in grads:
        param.grad = grad.clone()
        optimizer.step()
        expected, momentum = lion_by_hand(expected, momentum, grad)
        torch.testing.assert_close(param.detach(), expected)
        torch.testing.assert_close(optimizer.state[param]["exp_avg"], momentum)


def test_second_step_uses_momentum_not_just_the_gradient():
    """After one step m = (1-b2)*g1; a small opposite g2 must not flip the sign of the update."""
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = DecoupledLionW([param], lr=LR, betas=(B1, B2))
    param.grad = torch.tensor([1.0])
    optimizer.step()
    param.grad = torch.tensor([-0.5])  # b1*m + (1-b1)*g = 0.99*0.05 - 0.005 > 0
    optimizer.step()
    torch.testing.assert_close(param.detach(), torch.tensor([-2 * LR]))


def test_weight_decay_is_decoupled_and_follows_the_schedule():
    start = torch.tensor([1.0, -2.0, 3.0])
    grad = torch.tensor([0.5, 0.5, -0.5])
    param = torch.nn.Parameter(start.clone())
    optimizer = DecoupledLionW([param], lr=LR, betas=(B1, B2), weight_decay=0.1)
    optimizer.param_groups[0]["lr"] = LR / 4  # a scheduler lowered the LR to a quarter of its peak
    param.grad = grad
    optimizer.step()
    expected, _ = lion_by_hand(start, torch.zeros(3), grad, lr=LR / 4, wd=0.1, decay_factor=0.25)
    torch.testing.assert_close(param.detach(), expected)


def test_parameters_without_gradient_are_left_alone():
    trained, frozen = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    optimizer = DecoupledLionW([trained, frozen], lr=LR)
    trained.grad = torch.ones(2)
    optimizer.step()
    assert torch.equal(frozen.detach(), torch.ones(2)) and frozen not in optimizer.state
    assert torch.equal(trained.detach(), torch.full((2,), 1 - LR))


@pytest.mark.parametrize("kwargs", [{"lr": 0.0}, {"betas": (1.5, 0.9)}])
def test_rejects_bad_settings(kwargs):
    with pytest.raises(ValueError):
        DecoupledLionW([torch.nn.Parameter(torch.ones(1))], **kwargs)
