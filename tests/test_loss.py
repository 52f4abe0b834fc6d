"""Every registered criterion: finite loss and gradients, the mixing contract, and the maths."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from cutmix import mixed_loss
from loss import CRITERIONS, build_criterion
from maskcls.cli import UserError
from maskcls.registry import Registry

NUM_CLASSES = 18
# Unbalanced like the competition's training split; class 5 is rare.
CLASS_COUNTS = [400, 300, 80, 500, 350, 4, 90, 60, 20, 100, 75, 16, 80, 60, 16, 100, 75, 16]


def batch(n=32, num_classes=NUM_CLASSES, seed=0, scale=2.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (scale * torch.randn(n, num_classes, generator=gen)).requires_grad_()
    target = torch.randint(num_classes, (n,), generator=gen)
    return logits, target


def build(name, **options):
    return build_criterion(name, NUM_CLASSES, class_counts=CLASS_COUNTS, **options)


def inverse_frequency_weights(counts):
    counts = torch.tensor(counts, dtype=torch.float64)
    weight = 1.0 / counts
    return (weight * len(counts) / weight.sum()).float()


@pytest.mark.parametrize("name", CRITERIONS.names())
def test_every_criterion_gives_finite_loss_and_grads(name):
    criterion = build(name)
    assert isinstance(criterion, nn.Module)
    logits, target = batch()
    loss = criterion(logits, target)
    assert loss.dim() == 0 and torch.isfinite(loss)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
    assert logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", CRITERIONS.names())
def test_every_criterion_is_finite_on_extreme_logits(name):
    logits, target = batch(scale=1e4)
    loss = build(name)(logits, target)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name", CRITERIONS.names())
def test_every_criterion_follows_the_mixing_contract(name):
    criterion = build(name)
    logits, y_a = batch()
    y_b = y_a.roll(1)
    lam = 0.3
    loss = mixed_loss(criterion, logits, y_a, y_b, lam)
    expected = lam * criterion(logits, y_a) + (1 - lam) * criterion(logits, y_b)
    assert torch.allclose(loss, expected)
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    # An unmixed batch (lam == 1) is the criterion itself.
    assert torch.allclose(mixed_loss(criterion, logits, y_a, y_b, 1.0), criterion(logits, y_a))


def test_focal_with_gamma_0_is_cross_entropy():
    logits, target = batch()
    focal = build("focal", focal_gamma=0.0)(logits, target)
    assert torch.allclose(focal, F.cross_entropy(logits, target), atol=1e-6)


def test_focal_is_below_cross_entropy():
    logits, target = batch()
    focal = build("focal", focal_gamma=2.0)(logits, target)
    assert 0 < focal < F.cross_entropy(logits, target)


def test_focal_matches_formula():
    logits, target = batch()
    p_t = F.softmax(logits, 1)[torch.arange(len(target)), target]
    expected = ((1 - p_t) ** 2 * -p_t.log()).mean()
    assert torch.allclose(build("focal", focal_gamma=2.0)(logits, target), expected, atol=1e-6)


def per_sample(criterion, logits, target):
    return torch.stack([criterion(logits[i:i + 1], target[i:i + 1]) for i in range(len(target))])


def test_new_focal_is_cross_entropy_on_hard_samples_and_smaller_on_easy_ones():
    logits, target = batch(n=64)
    with torch.no_grad():  # make every other sample easy: a large logit on its true class
        logits[::2][torch.arange(32), target[::2]] += 6.0
    criterion = build("new_focal", focal_gamma=2.0, new_focal_threshold=0.5)
    p_t = F.softmax(logits, 1)[torch.arange(len(target)), target].detach()
    ce = F.cross_entropy(logits, target, reduction="none").detach()
    loss = per_sample(criterion, logits, target).detach()
    hard, easy = p_t < 0.5, p_t >= 0.5
    assert hard.any() and easy.any(), "the test batch must hold both kinds"
    assert torch.equal(loss[hard], ce[hard])
    assert (loss[easy] < ce[easy]).all()


def test_new_focal_matches_the_formula_by_hand():
    # Three classes; sample 0 is hard (p_t = 0.2), samples 1 and 2 are easy (p_t = 0.6, 0.9).
    probs = torch.tensor([[0.2, 0.5, 0.3], [0.1, 0.6, 0.3], [0.05, 0.05, 0.9]])
    target = torch.tensor([0, 1, 2])
    criterion = build_criterion("new_focal", 3, focal_gamma=2.0, new_focal_threshold=0.5)
    by_hand = [-math.log(0.2),
               ((1 - 0.6) / 0.5) ** 2 * -math.log(0.6),
               ((1 - 0.9) / 0.5) ** 2 * -math.log(0.9)]
    loss = criterion(probs.log(), target)
    assert loss.item() == pytest.approx(sum(by_hand) / 3, rel=1e-5)
    # gamma 0 or threshold 1 turn it into cross-entropy.
    ce = F.cross_entropy(probs.log(), target)
    assert torch.allclose(build_criterion("new_focal", 3, focal_gamma=0.0)(probs.log(), target), ce)
    threshold_1 = build_criterion("new_focal", 3, new_focal_threshold=1.0)
    assert torch.allclose(threshold_1(probs.log(), target), ce)


def test_new_focal_is_continuous_at_the_threshold():
    probs = torch.tensor([[0.5, 0.5]])
    target = torch.tensor([0])
    criterion = build_criterion("new_focal", 2, new_focal_threshold=0.5)
    assert criterion(probs.log(), target).item() == pytest.approx(math.log(2), rel=1e-6)


@pytest.mark.parametrize("smoothing,applied", [(0.0, 0.1), (0.1, 0.1), (0.3, 0.3)])
def test_label_smoothing_matches_torch(smoothing, applied):
    # --smoothing's default is 0 (none, for every criterion); the one named for it smooths by 0.1 then
    logits, target = batch()
    loss = build("label_smoothing", smoothing=smoothing)(logits, target)
    assert torch.allclose(loss, F.cross_entropy(logits, target, label_smoothing=applied))


def test_weighted_cross_entropy_matches_torch_with_inverse_frequency():
    logits, target = batch()
    weight = inverse_frequency_weights(CLASS_COUNTS)
    assert weight.mean().item() == pytest.approx(1.0)
    criterion = build("weighted_cross_entropy")
    assert torch.allclose(criterion.weight, weight)
    assert torch.allclose(criterion(logits, target), F.cross_entropy(logits, target, weight=weight))


def test_weighted_cross_entropy_up_weights_a_rare_class():
    criterion = build("weighted_cross_entropy")
    rare, common = 5, 3
    assert criterion.weight[rare] > 1 > criterion.weight[common]
    # The rare sample is misclassified, the common one is right: weighting raises the loss and
    # puts more of the gradient on the rare sample than plain cross-entropy does.
    target = torch.tensor([rare, common])
    logits = torch.zeros(2, NUM_CLASSES)
    logits[0, common] = logits[1, common] = 4.0
    logits.requires_grad_()
    weighted = criterion(logits, target)
    assert weighted > F.cross_entropy(logits, target)
    weighted.backward()
    assert logits.grad[0].abs().sum() > 10 * logits.grad[1].abs().sum()


def test_weighted_cross_entropy_with_an_empty_class_is_finite():
    counts = list(CLASS_COUNTS)
    counts[7] = 0
    criterion = build_criterion("weighted_cross_entropy", NUM_CLASSES, class_counts=counts)
    assert criterion.weight[7] == 0
    assert torch.isfinite(criterion.weight).all()
    assert criterion.weight[torch.arange(NUM_CLASSES) != 7].mean().item() == pytest.approx(1.0)
    logits, target = batch()
    assert torch.isfinite(criterion(logits, target))


def test_weighted_cross_entropy_needs_class_counts():
    with pytest.raises(UserError, match="class_counts"):
        build_criterion("weighted_cross_entropy", NUM_CLASSES)
    with pytest.raises(UserError, match="one count per class"):
        build_criterion("weighted_cross_entropy", NUM_CLASSES, class_counts=[1, 2, 3])


def test_weighted_cross_entropy_moves_with_the_module():
    criterion = build("weighted_cross_entropy").to(torch.float64)
    assert "weight" in dict(criterion.named_buffers())


def test_f1_is_near_zero_for_perfect_predictions_and_larger_for_wrong_ones():
    target = torch.arange(NUM_CLASSES).repeat(2)
    perfect = 50.0 * F.one_hot(target, NUM_CLASSES).float()
    wrong = 50.0 * F.one_hot((target + 1) % NUM_CLASSES, NUM_CLASSES).float()
    criterion = build("f1")
    assert criterion(perfect, target).item() < 1e-3
    assert criterion(wrong, target).item() > 0.99
    logits, _ = batch(n=len(target))
    assert 0 < criterion(logits, target).item() < 1


def test_f1_counts_only_classes_in_the_batch():
    # Two of 18 classes in the batch: perfect predictions still give ~0, not 16/18.
    target = torch.tensor([0, 0, 4, 4])
    perfect = 50.0 * F.one_hot(target, NUM_CLASSES).float()
    assert build("f1")(perfect, target).item() < 1e-3


def test_f1_uses_num_classes():
    assert build("f1").num_classes == NUM_CLASSES
    target = torch.tensor([17, 3])
    logits = torch.randn(2, NUM_CLASSES, requires_grad=True)
    build("f1")(logits, target).backward()


def test_unknown_name_lists_valid_names():
    with pytest.raises(UserError) as err:
        build_criterion("focall", NUM_CLASSES)
    message = str(err.value)
    assert "did you mean 'focal'" in message
    for name in CRITERIONS.names():
        assert name in message


def test_registering_an_instance_is_refused():
    # A fresh registry of the same helper, so a failure cannot leave an entry in CRITERIONS.
    criterions = Registry("criterion")
    with pytest.raises(TypeError, match="not instances"):
        criterions.register("instance")(nn.CrossEntropyLoss())
    assert "instance" not in criterions


def test_every_entry_is_a_class():
    for name in CRITERIONS.names():
        entry = CRITERIONS.get(name)
        assert isinstance(entry, type) and issubclass(entry, nn.Module), name


def test_a_class_can_be_passed_instead_of_a_name():
    class MyLoss(nn.Module):
        def __init__(self, num_classes, **kwargs):
            super().__init__()
            self.num_classes = num_classes

        def forward(self, logits, target):
            return F.cross_entropy(logits, target)

    criterion = build_criterion(MyLoss, NUM_CLASSES, class_counts=CLASS_COUNTS)
    assert criterion.num_classes == NUM_CLASSES


@pytest.mark.parametrize("name,options", [("focal", {"focal_gamma": -1.0}),
                                          ("new_focal", {"new_focal_threshold": 0.0}),
                                          ("label_smoothing", {"smoothing": 1.0})])
def test_bad_options_raise_a_user_error(name, options):
    with pytest.raises(UserError):
        build(name, **options)
