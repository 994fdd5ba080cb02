"""StableLoss: shape errors are loud, non-finite losses are returned as they are, bounds keep gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from train_enhanced_adaptivestream import StableLoss


def test_32x32_logits_for_a_224_target_raise_naming_both_shapes():
    loss = StableLoss()
    with pytest.raises(ValueError, match=r"\(2, 3, 32, 32\).*\(2, 224, 224\)"):
        loss(torch.zeros(2, 3, 32, 32), torch.zeros(2, 4), torch.zeros(2, 224, 224, dtype=torch.long),
             torch.zeros(2, dtype=torch.long))


def test_classification_shape_mismatch_raises():
    with pytest.raises(ValueError, match="classification logits"):
        StableLoss()(torch.zeros(2, 3, 8, 8), torch.zeros(3, 4), torch.zeros(2, 8, 8, dtype=torch.long),
                     torch.zeros(2, dtype=torch.long))


def test_total_is_weighted_sum_and_parts_are_detached():
    torch.manual_seed(0)
    seg = torch.randn(2, 3, 8, 8, requires_grad=True)
    cls = torch.randn(2, 4, requires_grad=True)
    seg_t, cls_t = torch.randint(0, 3, (2, 8, 8)), torch.randint(0, 4, (2,))
    total, parts = StableLoss(seg_weight=1.0, cls_weight=0.5, logit_bound=1e6)(seg, cls, seg_t, cls_t)
    assert not parts["seg"].requires_grad and not parts["cls"].requires_grad
    assert torch.allclose(parts["seg"], F.cross_entropy(seg, seg_t), atol=1e-4)
    assert torch.allclose(total, parts["seg"] + 0.5 * parts["cls"])


def test_a_logit_far_past_the_bound_still_gets_a_gradient():
    logits = torch.tensor([[1e4, 0.0, -1e4]], requires_grad=True)
    bounded = StableLoss(logit_bound=10.0).bound(logits)
    assert bounded.abs().max() < 10.0
    bounded.sum().backward()
    assert (logits.grad != 0).all()
    # The tanh bound this replaces has exactly zero gradient there in float32:
    x = torch.tensor(1e4, requires_grad=True)
    (10 * torch.tanh(x / 10)).backward()
    assert x.grad == 0


def test_nan_logits_give_a_nan_loss_not_a_fallback_constant():
    seg = torch.full((1, 2, 4, 4), float("nan"))
    total, parts = StableLoss()(seg, torch.zeros(1, 2), torch.zeros(1, 4, 4, dtype=torch.long),
                                torch.zeros(1, dtype=torch.long))
    assert torch.isnan(total) and torch.isnan(parts["seg"])


def test_all_ignored_pixels_give_zero_seg_loss_not_nan():
    total, parts = StableLoss()(torch.randn(1, 2, 4, 4), torch.zeros(1, 2),
                                torch.full((1, 4, 4), 255, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert parts["seg"].item() == 0.0 and math.isfinite(total.item())


def test_class_weights_match_torch_weighted_mean():
    torch.manual_seed(1)
    seg, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    target[0, 0, :3] = 255
    weights = [0.2, 1.0, 3.0]
    _, parts = StableLoss(seg_class_weights=weights, logit_bound=1e6)(
        seg, torch.zeros(2, 2), target, torch.zeros(2, dtype=torch.long))
    expected = F.cross_entropy(seg, target, weight=torch.tensor(weights), ignore_index=255)
    assert parts["seg"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_loss_is_float32_under_bf16_autocast():
    seg = torch.randn(1, 2, 4, 4).bfloat16()
    total, _ = StableLoss()(seg, torch.randn(1, 2).bfloat16(), torch.zeros(1, 4, 4, dtype=torch.long),
                            torch.zeros(1, dtype=torch.long))
    assert total.dtype == torch.float32
