"""Learning-rate schedules against torch's own schedulers and hand-worked values."""

from __future__ import annotations

import math

import pytest
import torch

from rlkit.lr_schedule import ParamGroupLR, warmup_decay_schedule


def _torch_lrs(scheduler_cls, num_steps: int, **kwargs) -> list[float]:
    """The lr of steps 0..num_steps-1 under one of torch's built-in schedulers (base lr 1)."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = scheduler_cls(optimizer, **kwargs)
    lrs = []
    for _ in range(num_steps):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_warmup_is_linear_from_one_over_w_to_one():
    # W = 4: steps 0..3 at 1/4, 2/4, 3/4, 4/4; then constant 1
    factor = warmup_decay_schedule(num_steps=10, warmup_steps=4)
    assert [factor(s) for s in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    # torch's LinearLR from 1/W to 1 over W-1 steps is the same ramp
    want = _torch_lrs(torch.optim.lr_scheduler.LinearLR, 4, start_factor=0.25, end_factor=1.0, total_iters=3)
    assert [factor(s) for s in range(4)] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("warmup_steps", [0, 3])
def test_cosine_decay_is_torch_cosine_annealing_after_warmup(warmup_steps):
    num_steps = 20
    decay = num_steps - warmup_steps
    factor = warmup_decay_schedule(num_steps=num_steps, warmup_steps=warmup_steps, decay_style="cosine")
    want = _torch_lrs(torch.optim.lr_scheduler.CosineAnnealingLR, decay + 1, T_max=decay, eta_min=0.0)
    got = [factor(warmup_steps + t) for t in range(decay + 1)]
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert got[0] == 1.0 and got[-1] == pytest.approx(0.0, abs=1e-15)
    assert factor(num_steps + 5) == got[-1]  # stays at the end value (CosineAnnealingLR would rise again)


def test_linear_decay_is_torch_linear_lr_after_warmup():
    num_steps, warmup_steps = 12, 2
    factor = warmup_decay_schedule(num_steps=num_steps, warmup_steps=warmup_steps, decay_style="linear")
    want = _torch_lrs(torch.optim.lr_scheduler.LinearLR, 11, start_factor=1.0, end_factor=0.0, total_iters=10)
    assert [factor(warmup_steps + t) for t in range(11)] == pytest.approx(want, rel=1e-9, abs=1e-12)
    # midway, hand-worked: p = (7 - 2) / 10 = 0.5, so 1 - p = 0.5 (linear) and (1 + cos(pi/2)) / 2 = 0.5 (cosine)
    assert factor(7) == 0.5
    cosine = warmup_decay_schedule(num_steps=num_steps, warmup_steps=warmup_steps, decay_style="cosine")
    assert cosine(7) == pytest.approx(0.5 * (1 + math.cos(math.pi / 2)), abs=1e-15)


def test_bad_arguments_name_the_field():
    with pytest.raises(ValueError, match="decay_style='exp'.*constant"):
        warmup_decay_schedule(num_steps=10, decay_style="exp")
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        warmup_decay_schedule(num_steps=10, warmup_steps=-1)


def test_param_group_lr_matches_lambda_lr_and_resumes():
    factor = warmup_decay_schedule(num_steps=8, warmup_steps=2, decay_style="cosine")
    params = [torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))]
    reference = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=3e-4)
    lambda_lr = torch.optim.lr_scheduler.LambdaLR(reference, factor)
    optimizer = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=3e-4)
    param_group_lr = ParamGroupLR(optimizer, 3e-4, factor)
    for _ in range(5):
        assert [g["lr"] for g in optimizer.param_groups] == pytest.approx([g["lr"] for g in reference.param_groups])
        assert param_group_lr.get_last_lr()[0] == pytest.approx(lambda_lr.get_last_lr()[0], rel=1e-12)
        reference.step()
        lambda_lr.step()
        param_group_lr.step()
    resumed_optimizer = torch.optim.AdamW(params, lr=3e-4)
    resumed = ParamGroupLR(resumed_optimizer, 3e-4, factor)
    resumed.load_state_dict(param_group_lr.state_dict())
    assert resumed.num_steps == 5 and resumed_optimizer.param_groups[0]["lr"] == pytest.approx(3e-4 * factor(5))
