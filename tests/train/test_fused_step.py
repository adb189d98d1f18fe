"""Fused optimizer step and fused EMA against their plain loops.

- The EMA (albef_ds/train/ema.py, model.foreach_ema): torch._foreach_mul_/_foreach_add_ over
  every momentum pair does the per-parameter loop's two operations on each element: the
  same numbers bit for bit (a different momentum is caught).
- AdamW: torch's fused kernel (what build_optimizer takes on CUDA when DeepSpeed's FusedAdam
  is unavailable; it also runs on a CPU) against the foreach one the CPU takes: the same
  update up to float32 rounding (the fused kernel orders the update's operations its own
  way), ADAM_RTOL; a different learning rate is caught. DeepSpeed's FusedAdam builds on
  CUDA only: the GPU check times it (bench switch fused_adam).
"""

import pytest
import torch

from tests.support.tiny import (forward_backward, make_batch, make_model, one_thread, small_config,  # noqa: F401
                                stir)

from albef_ds.train.engines.deepspeed import param_groups
from albef_ds.train.ema import MomentumEMA

#: fused vs foreach AdamW, 3 steps on fixed gradients (float32 rounding of the update)
ADAM_RTOL, ADAM_ATOL = 1e-5, 1e-7


def ema_after(foreach: bool, momentum: float = 0.9):
    model = stir(make_model(small_config()))
    ema = MomentumEMA(model, momentum, foreach=foreach)
    for step in range(3):
        with torch.no_grad():  # the online weights move between updates, as training moves them
            g = torch.Generator().manual_seed(step)
            for _, p, _ in model.momentum_named_params():
                p.add_(0.01 * torch.randn(p.shape, generator=g))
        ema.update()
    return {n: p_m.detach().clone() for n, _, p_m in model.momentum_named_params()}


def test_the_foreach_ema_is_the_loop_bit_for_bit_and_a_changed_momentum_is_caught():
    loop, fused = ema_after(False), ema_after(True)
    assert all(torch.equal(loop[n], fused[n]) for n in loop)
    other = ema_after(True, momentum=0.9 + 1e-4)
    assert any(not torch.equal(loop[n], other[n]) for n in loop)


def adamw_after(fused: bool, lr: float = 1e-3):
    """Three AdamW steps from the same weights on the same gradients (one backward of the
    small model): the update alone, elementwise, without the chaos of retraining on it."""
    torch.manual_seed(0)
    model = stir(make_model(small_config()))
    _, grads = forward_backward(model, make_batch())
    opt = torch.optim.AdamW(param_groups(model, 0.02), lr=lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=fused, foreach=not fused)
    for step in range(3):
        for n, p in model.named_parameters():
            if n in grads:
                p.grad = grads[n] * (1 + step)
        opt.step()
    return {n: p.detach().clone() for n, p in model.named_parameters() if n in grads}


def test_fused_adamw_is_the_foreach_one_to_float32_rounding_and_a_changed_lr_is_caught():
    try:
        fused = adamw_after(True)
    except (RuntimeError, NotImplementedError) as e:  # an older torch: fused AdamW on CUDA only
        pytest.skip(f"torch's fused AdamW does not run on this CPU: {e}")
    plain = adamw_after(False)
    for n in plain:
        torch.testing.assert_close(fused[n], plain[n], rtol=ADAM_RTOL, atol=ADAM_ATOL, msg=n)
    other = adamw_after(False, lr=1e-3 * 1.01)
    with pytest.raises(AssertionError):
        for n in plain:
            torch.testing.assert_close(other[n], plain[n], rtol=ADAM_RTOL, atol=ADAM_ATOL)
