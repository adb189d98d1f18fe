"""model.mlm_masked_bucket: the masked-token count padded up to a bucket (static shapes for
torch.compile / CUDA graphs) gives the unpadded losses bit for bit and the same gradients;
a padding row that leaked into the loss is caught.

Gradients: the padding rows' gradients are exact zeros, but the MLM head's weight and bias
gradients are sums over rows, which the CPU kernels block differently for another row
count: equal to float32 rounding (GRAD_RTOL), not bit for bit (measured: the head's bias)."""

import pytest
import torch

from tests.support.tiny import (forward_backward, make_batch, make_model, one_thread, small_config,  # noqa: F401
                                stir, twin)

from albef_ds import losses
from albef_ds.objectives import mlm


#: float32 rounding of a sum over a different number of rows (see above)
GRAD_RTOL, GRAD_ATOL = 1e-5, 1e-8


def assert_identical(a, b, grads_exact=True):
    (out_a, grads_a), (out_b, grads_b) = a, b
    for key in ("loss", "loss_itc", "loss_itm", "loss_mlm"):
        assert torch.equal(out_a[key], out_b[key]), (key, out_a[key].item(), out_b[key].item())
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 50
    for name in grads_a:
        if grads_exact:
            assert torch.equal(grads_a[name], grads_b[name]), name
        else:
            torch.testing.assert_close(grads_a[name], grads_b[name], rtol=GRAD_RTOL, atol=GRAD_ATOL, msg=name)


def test_bucketed_positions_pad_with_ignored_labels_to_a_multiple_of_the_bucket():
    labels = torch.full((3, 5), losses.IGNORE_INDEX)
    labels[0, 2], labels[1, 1], labels[2, 4] = 7, 8, 9
    positions, padded = mlm.bucketed_positions(labels, 4)
    assert positions.tolist() == [2, 6, 14, 0] and padded.tolist() == [7, 8, 9, losses.IGNORE_INDEX]
    assert mlm.bucketed_positions(labels, 3)[0].numel() == 3  # an exact multiple: no padding
    assert mlm.bucketed_positions(torch.full((2, 2), losses.IGNORE_INDEX), 4)[0].tolist() == [0] * 4


@pytest.mark.parametrize("bucket", [1, 7, 64])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_a_padded_masked_count_gives_the_unpadded_losses_and_gradients_bit_for_bit(bucket, alpha):
    exact = stir(make_model(small_config("model.mlm_masked_only=true", "model.mlm_masked_bucket=0")))
    padded = twin(exact, mlm_masked_bucket=bucket)
    batch = make_batch()
    a, b = forward_backward(exact, batch, alpha), forward_backward(padded, batch, alpha)
    assert a[0]["loss_mlm"].item() > 1.0
    assert_identical(a, b, grads_exact=False)


def test_a_padding_row_counted_in_the_loss_is_caught(monkeypatch):
    """Mutation check: pad labels that are not ignored (the padding rows predict token 5)
    must change the loss, so the equality above is not vacuous."""
    exact = stir(make_model(small_config("model.mlm_masked_bucket=0")))
    padded = twin(exact, mlm_masked_bucket=64)
    batch = make_batch()
    real = mlm.bucketed_positions

    def leaky(labels, bucket):
        positions, padded_labels = real(labels, bucket)
        return positions, torch.where(padded_labels == losses.IGNORE_INDEX, 5, padded_labels)

    monkeypatch.setattr(mlm, "bucketed_positions", leaky)
    a, b = forward_backward(exact, batch, 0.4), forward_backward(padded, batch, 0.4)
    assert not torch.equal(a[0]["loss_mlm"], b[0]["loss_mlm"])
    with pytest.raises(AssertionError):  # and the gradient tolerance is far tighter than the change
        assert_identical((b[0] | {"loss_mlm": a[0]["loss_mlm"], "loss": a[0]["loss"]}, b[1]), a, grads_exact=False)


def test_the_bucket_is_ignored_with_the_full_vocabulary_head():
    full = stir(make_model(small_config("model.mlm_masked_only=false")))
    bucketed = twin(full, mlm_masked_bucket=64)
    batch = make_batch()
    assert_identical(forward_backward(full, batch, 0.4), forward_backward(bucketed, batch, 0.4))
