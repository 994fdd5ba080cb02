"""StableLoss: shape errors are loud, non-finite losses are returned as they are, bounds keep gradients."""

import math

import pytest
import torch
import torch.nn.functional as F

from data import uniform_dice
from train_enhanced_adaptivestream import StableLoss, dice_from_sums, dice_sums


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
    total, parts = StableLoss(seg_weight=1.0, cls_weight=0.5, logit_bound=1e6, dice_weight=0.0)(seg, cls, seg_t, cls_t)
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


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_nan_logits_give_a_nan_loss_not_a_fallback_constant(dice_weight):
    seg = torch.full((1, 2, 4, 4), float("nan"))
    total, parts = StableLoss(dice_weight=dice_weight)(seg, torch.zeros(1, 2), torch.zeros(1, 4, 4, dtype=torch.long),
                                torch.zeros(1, dtype=torch.long))
    assert torch.isnan(total) and torch.isnan(parts["seg"])


@pytest.mark.parametrize("dice_weight", [0.0, 1.0])
def test_all_ignored_pixels_give_zero_seg_loss_not_nan(dice_weight):
    total, parts = StableLoss(dice_weight=dice_weight)(torch.randn(1, 2, 4, 4), torch.zeros(1, 2),
                                torch.full((1, 4, 4), 255, dtype=torch.long), torch.zeros(1, dtype=torch.long))
    assert parts["seg"].item() == 0.0 and math.isfinite(total.item())


def test_class_weights_match_torch_weighted_mean():
    torch.manual_seed(1)
    seg, target = torch.randn(2, 3, 5, 5), torch.randint(0, 3, (2, 5, 5))
    target[0, 0, :3] = 255
    weights = [0.2, 1.0, 3.0]
    _, parts = StableLoss(seg_class_weights=weights, logit_bound=1e6, dice_weight=0.0)(
        seg, torch.zeros(2, 2), target, torch.zeros(2, dtype=torch.long))
    expected = F.cross_entropy(seg, target, weight=torch.tensor(weights), ignore_index=255)
    assert parts["seg"].item() == pytest.approx(expected.item(), rel=1e-4)


def test_loss_is_float32_under_bf16_autocast():
    seg = torch.randn(1, 2, 4, 4).bfloat16()
    total, _ = StableLoss()(seg, torch.randn(1, 2).bfloat16(), torch.zeros(1, 4, 4, dtype=torch.long),
                            torch.zeros(1, dtype=torch.long))
    assert total.dtype == torch.float32


def seg_part(loss: StableLoss, seg: torch.Tensor, target: torch.Tensor) -> float:
    return loss(seg, torch.zeros(seg.shape[0], 2), target, torch.zeros(seg.shape[0], dtype=torch.long))[1]["seg"].item()


@pytest.mark.parametrize("dice_weight", [0.5, 2.0])
def test_equal_logits_cost_the_uniform_guess_the_baselines_use(dice_weight):
    # data.uniform_dice is what the verdict and diagnose expect of a model that learned nothing: it must be
    # what the loss gives equal logits, ignored pixels excluded.
    torch.manual_seed(2)
    target = torch.randint(0, 4, (3, 16, 16))
    target[target == 3] = torch.randint(0, 3, (int((target == 3).sum()),))  # class 3 rare, then absent
    target[0, :2] = 255
    scored = target[target != 255]
    expected = math.log(5) + dice_weight * uniform_dice(torch.bincount(scored, minlength=5).numpy())
    assert seg_part(StableLoss(dice_weight=dice_weight), torch.zeros(3, 5, 16, 16), target) == pytest.approx(expected,
                                                                                                              rel=1e-5)


def test_dice_is_0_for_a_right_and_1_for_a_wrong_prediction():
    target = torch.randint(0, 3, (2, 8, 8))
    right = 100 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    wrong = 100 * F.one_hot((target + 1) % 3, 3).permute(0, 3, 1, 2).float()
    for seg, dice in ((right, 0.0), (wrong, 1.0)):
        with_dice = seg_part(StableLoss(dice_weight=1.0), seg, target)
        assert with_dice - seg_part(StableLoss(dice_weight=0.0), seg, target) == pytest.approx(dice, abs=1e-5)


def test_dice_counts_a_small_missed_class_like_a_large_one():
    # Cross-entropy weighs a missed class by its pixels; the Dice term by 1 / (classes present) whatever its size.
    target = torch.zeros(1, 32, 32, dtype=torch.long)
    target[0, :16] = 1  # half the image
    target[0, 30:, 30:] = 2  # 4 pixels
    seg = 100 * F.one_hot(target, 3).permute(0, 3, 1, 2).float()
    seg[0, :, 30:, 30:] = 100 * torch.tensor([1.0, 0, 0]).view(3, 1, 1)  # the small class predicted as background
    dice = seg_part(StableLoss(dice_weight=1.0), seg, target) - seg_part(StableLoss(dice_weight=0.0), seg, target)
    background = 1 - 2 * 508 / (512 + 508)  # 512 predicted, 508 true, all 508 found
    assert dice == pytest.approx((background + 0 + 1) / 3, abs=1e-4)


def test_dice_ignores_what_the_logits_say_on_ignored_pixels():
    torch.manual_seed(3)
    seg, target = torch.randn(2, 3, 8, 8), torch.randint(0, 3, (2, 8, 8))
    target[:, :, :3] = 255
    other = seg.clone()
    other[:, :, :, :3] = 50 * torch.randn(2, 3, 8, 3)
    loss = StableLoss(dice_weight=1.0)
    assert seg_part(loss, seg, target) == pytest.approx(seg_part(loss, other, target), rel=1e-6)


def test_dice_gradient_is_finite_on_scored_pixels_and_zero_on_ignored_ones():
    torch.manual_seed(4)
    probs = torch.randn(2, 3, 8, 8).softmax(1).requires_grad_()
    target = torch.randint(0, 3, (2, 8, 8))
    target[:, :2] = 255
    dice_from_sums(dice_sums(probs, target, target != 255)).backward()
    assert torch.isfinite(probs.grad).all()
    assert (probs.grad[:, :, 2:] != 0).all() and (probs.grad[:, :, :2] == 0).all()


def test_dice_passes_a_nan_on_to_the_guard():
    probs = torch.full((1, 2, 4, 4), 0.5)
    probs[0, 1, 3, 3] = float("nan")
    target = torch.zeros(1, 4, 4, dtype=torch.long)
    assert torch.isnan(dice_from_sums(dice_sums(probs, target, target != 255)))
