"""Loss functions (criterions): every valid `--criterion` value lives here.

Each entry is an `nn.Module` class registered in `CRITERIONS`. Its constructor takes
`(num_classes, class_counts=None, **kwargs)` plus the options it declares at registration, and
ignores what it does not use; `train.py` builds any of them the same way, through
`build_criterion(name, num_classes, class_counts=..., **options)`. `forward(logits, target)`
takes logits [N, C] and hard integer targets [N] (long) and returns the mean loss (a scalar).

Mixing contract: every criterion takes hard integer targets only. Batch mixing (CutMix, MixUp)
calls the criterion twice and combines the results,

    loss = lam * criterion(logits, y_a) + (1 - lam) * criterion(logits, y_b)

(`cutmix.mixed_loss`), so a criterion of your own needs nothing special to work with mixing.

Add your own loss with one decorated class in this file; an option it declares becomes a flag
of train.py (its default and type are the constructor's), is recorded in config.json, and is
passed to the constructor:

    @CRITERIONS.register("poly1", options={"poly_epsilon": "weight of the poly-1 term"})
    class Poly1Loss(nn.Module):
        def __init__(self, num_classes, poly_epsilon=1.0, **kwargs):
            super().__init__()
            self.epsilon = poly_epsilon

        def forward(self, logits, target):
            ce = F.cross_entropy(logits, target, reduction="none")
            pt = torch.exp(-ce)
            return (ce + self.epsilon * (1 - pt)).mean()

    python train.py --criterion poly1 --poly_epsilon 2

Example: `python train.py --criterion new_focal --focal_gamma 2`
"""
import inspect

import torch
import torch.nn as nn
import torch.nn.functional as F

from maskcls.cli import UserError
from maskcls.registry import Registry

CRITERIONS = Registry("criterion")


def build_criterion(name, num_classes, class_counts=None, smoothing=0.0, **options):
    """Build a criterion by registered name (or from a class passed in).

    `class_counts` are the per-class image counts of the training split (used by
    `weighted_cross_entropy`); options that are None are dropped so each loss's defaults win.
    `smoothing` (train.py's --smoothing) is label smoothing on top of any criterion: passed to
    a constructor that takes `smoothing` (it smooths natively), else `LabelSmoothed` wraps it.
    """
    if smoothing is not None and not 0.0 <= smoothing < 1.0:
        raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
    entry = CRITERIONS.get(name)
    if "smoothing" in inspect.signature(entry.__init__ if inspect.isclass(entry) else entry).parameters:
        return CRITERIONS.build(name, num_classes, class_counts=class_counts, smoothing=smoothing, **options)
    criterion = CRITERIONS.build(name, num_classes, class_counts=class_counts, **options)
    return LabelSmoothed(criterion, smoothing, num_classes) if smoothing else criterion


class LabelSmoothed(nn.Module):
    """Label smoothing on top of any criterion: the target is 1 - eps on the label and eps spread
    evenly over all classes, and since a criterion takes hard labels, the loss is the same mix of
    losses: (1 - eps) * L(logits, y) + eps * mean over classes c of L(logits, c). For cross-entropy
    that is exactly torch's label_smoothing. The class term is one call of the criterion on the
    batch repeated once per class (N x C rows: cheap for the tens of classes of this task)."""

    def __init__(self, criterion, smoothing, num_classes):
        super().__init__()
        self.criterion, self.smoothing, self.num_classes = criterion, float(smoothing), num_classes

    def forward(self, logits, target):
        loss = self.criterion(logits, target)
        every = torch.arange(self.num_classes, device=target.device).repeat(len(target))
        uniform = self.criterion(logits.repeat_interleave(self.num_classes, dim=0), every)
        return (1 - self.smoothing) * loss + self.smoothing * uniform


FOCAL_GAMMA = 2.0  # focal and new_focal: gamma 2 is the paper's choice
GAMMA_HELP = "focusing parameter: (1 - p_t) ** gamma down-weights easy samples (0: cross-entropy)"


def _check_gamma(gamma):
    if gamma < 0:
        raise UserError(f"--focal_gamma must be >= 0, got {gamma}")
    return float(gamma)


def _log_pt(logits, target):
    """log p_t (log-probability of the true class) per sample, and 1 - p_t.

    From log_softmax rather than softmax(...).log() so a confident wrong prediction gives a large
    finite loss instead of log(0). 1 - p_t via expm1 keeps precision when p_t is close to 1, and
    the clamp keeps the gradient of (1 - p_t) ** gamma finite for 0 < gamma < 1 at p_t == 1.
    """
    log_pt = F.log_softmax(logits, dim=1).gather(1, target.unsqueeze(1)).squeeze(1)
    one_minus_pt = (-torch.expm1(log_pt)).clamp(min=torch.finfo(log_pt.dtype).tiny)
    return log_pt, one_minus_pt


@CRITERIONS.register("cross_entropy")
class CrossEntropyLoss(nn.Module):
    """Cross-entropy (with --smoothing: torch's label smoothing)."""

    def __init__(self, num_classes, smoothing=0.0, **kwargs):
        super().__init__()
        self.smoothing = float(smoothing or 0.0)

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)


@CRITERIONS.register("weighted_cross_entropy")
class WeightedCrossEntropyLoss(nn.Module):
    """Cross-entropy weighted by inverse class frequency of the training split.

    weight_c = 1 / count_c, scaled so the weights average to 1 over the classes present in the
    training split (the loss then stays on the scale of plain cross-entropy, so the learning rate
    need not change). A class with no training images gets weight 0 instead of inf: it cannot be
    a target anyway.
    """

    def __init__(self, num_classes, class_counts=None, smoothing=0.0, **kwargs):
        super().__init__()
        self.smoothing = float(smoothing or 0.0)
        if class_counts is None:
            raise UserError("criterion 'weighted_cross_entropy' needs the class counts of the "
                            "training split (class_counts), got None")
        counts = torch.as_tensor(list(class_counts), dtype=torch.float64)
        if counts.shape != (num_classes,):
            raise UserError(f"class_counts must have one count per class ({num_classes}), "
                            f"got {counts.numel()}")
        if (counts < 0).any() or counts.sum() <= 0:
            raise UserError(f"class_counts must be non-negative with at least one image, "
                            f"got {counts.tolist()}")
        present = counts > 0
        weight = torch.where(present, 1.0 / counts.clamp(min=1), torch.zeros_like(counts))
        weight = weight * present.sum() / weight.sum()
        # A buffer, so `criterion.to(device)` moves the weights with it.
        self.register_buffer("weight", weight.float())

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, weight=self.weight.to(logits.dtype), label_smoothing=self.smoothing)


@CRITERIONS.register("focal", options={"focal_gamma": GAMMA_HELP})
class FocalLoss(nn.Module):
    """Focal loss (Lin et al., 2017): FL = (1 - p_t) ** gamma * CE, mean over the batch.

    gamma = `focal_gamma`; gamma 0 is plain cross-entropy. The factor keeps its gradient, as in
    the paper.
    """

    def __init__(self, num_classes, focal_gamma=FOCAL_GAMMA, **kwargs):
        super().__init__()
        self.gamma = _check_gamma(focal_gamma)

    def forward(self, logits, target):
        log_pt, one_minus_pt = _log_pt(logits, target)
        return (one_minus_pt ** self.gamma * -log_pt).mean()


@CRITERIONS.register("label_smoothing")
class LabelSmoothingLoss(nn.Module):
    """Cross-entropy with label smoothing (`--smoothing`, 0.1 if it is 0), as torch's `label_smoothing`:
    the seed's name; `cross_entropy` with --smoothing does the same."""

    def __init__(self, num_classes, smoothing=0.1, **kwargs):
        super().__init__()
        if not 0.0 <= smoothing < 1.0:
            raise UserError(f"--smoothing must be in [0, 1), got {smoothing}")
        self.smoothing = float(smoothing) or 0.1  # the name promises smoothing

    def forward(self, logits, target):
        return F.cross_entropy(logits, target, label_smoothing=self.smoothing)


@CRITERIONS.register("f1")
class F1Loss(nn.Module):
    """Soft macro-F1 loss: 1 - mean over classes of the soft F1 on this batch.

    With probabilities p = softmax(logits) and one-hot targets t, per class c:
    tp = sum(p * t), fp = sum(p * (1 - t)), fn = sum((1 - p) * t), precision = tp / (tp + fp),
    recall = tp / (tp + fn), F1 = 2 * precision * recall / (precision + recall), each with an
    epsilon. The mean runs over the classes present in the batch's targets: a batch lacks most
    of the classes, and an absent class's F1 is undefined (0/0); counting it as 0 would add a
    floor that depends only on which classes were drawn. Probability put on an absent class is
    still penalised, through the recall of the true class.
    """

    def __init__(self, num_classes, eps=1e-7, **kwargs):
        super().__init__()
        self.num_classes = num_classes
        self.eps = eps

    def forward(self, logits, target):
        probs = F.softmax(logits, dim=1)
        onehot = F.one_hot(target, self.num_classes).to(probs.dtype)
        tp = (probs * onehot).sum(dim=0)
        fp = (probs * (1 - onehot)).sum(dim=0)
        fn = ((1 - probs) * onehot).sum(dim=0)
        precision = tp / (tp + fp + self.eps)
        recall = tp / (tp + fn + self.eps)
        f1 = 2 * precision * recall / (precision + recall + self.eps)
        present = onehot.sum(dim=0) > 0
        return 1 - f1[present].mean()


@CRITERIONS.register("new_focal", options={
    "focal_gamma": GAMMA_HELP, "new_focal_threshold": "p_t at and above which a sample counts as learned"})
class NewFocalLoss(nn.Module):
    """Reduced focal loss: trains on what is not yet learned, leaves what is learned alone.

    Per sample, with p_t the probability of the true class, th = `new_focal_threshold` and
    gamma = `focal_gamma`:

        loss_i = CE_i                                if p_t <  th   (hard: full cross-entropy)
        loss_i = ((1 - p_t) / th) ** gamma * CE_i    if p_t >= th   (easy: down-weighted)

    and the loss is the mean over the batch. At p_t == th the factor is ((1 - th) / th) ** gamma:
    1 at the default th = 0.5, where the loss is continuous. Unlike focal loss, hard samples keep the full cross-entropy instead of being
    down-weighted too.
    """

    def __init__(self, num_classes, focal_gamma=FOCAL_GAMMA, new_focal_threshold=0.5, **kwargs):
        super().__init__()
        if not 0.0 < new_focal_threshold <= 1.0:
            raise UserError(f"--new_focal_threshold must be in (0, 1], got {new_focal_threshold}")
        self.gamma = _check_gamma(focal_gamma)
        self.threshold = float(new_focal_threshold)

    def forward(self, logits, target):
        log_pt, one_minus_pt = _log_pt(logits, target)
        # The factor keeps its gradient, as in `focal`: the loss is then one function of p_t whose
        # gradient is its true derivative (still pushing p_t up, since the loss falls as p_t rises).
        factor = (one_minus_pt / self.threshold) ** self.gamma
        easy = log_pt.exp() >= self.threshold
        factor = torch.where(easy, factor, torch.ones_like(factor))
        return (factor * -log_pt).mean()


def split_target(target, tasks):
    """Joint class index -> one index per task (mixed radix: label = (t0 * n1 + t1) * n2 + t2)."""
    parts, rest = [], target
    for size in reversed(tasks):
        parts.append(rest % size)
        rest = rest // size
    return parts[::-1]


def task_log_probs(logits, tasks):
    """Per-task log-probabilities, marginalised from joint logits over len(tasks) factors."""
    joint = F.log_softmax(logits.float(), dim=1).view(-1, *tasks)
    dims = range(1, len(tasks) + 1)
    return [torch.logsumexp(joint, dim=[d for d in dims if d != i + 1]) if len(tasks) > 1 else joint
            for i in range(len(tasks))]


class MultiTaskLoss(nn.Module):
    """One loss per task (mask, gender, age), weighted by `task_weights` and summed.

    Takes joint logits and joint targets like every criterion (so CutMix's mixing contract
    holds); each task's logits are the marginal log-probabilities of the joint softmax, which
    for `model.FactorizedHead` are exactly that head's own task log-softmax.
    """

    def __init__(self, criterion, num_classes, tasks, task_weights=None, class_counts=None, **options):
        super().__init__()
        if int(torch.tensor(tasks).prod()) != num_classes:
            raise UserError(f"tasks {tasks} do not factor {num_classes} classes")
        weights = list(task_weights) if task_weights else [1.0] * len(tasks)
        if len(weights) != len(tasks) or min(weights) < 0:
            raise UserError(f"--task_weights needs {len(tasks)} non-negative numbers, got {task_weights}")
        self.tasks, self.weights = tuple(tasks), weights
        counts = None if class_counts is None else torch.tensor(class_counts, dtype=torch.float64).view(*tasks)
        self.losses = nn.ModuleList()
        for i, size in enumerate(self.tasks):
            task_counts = None
            if counts is not None:
                task_counts = counts.sum(dim=[d for d in range(len(tasks)) if d != i]).tolist() if len(tasks) > 1 \
                    else counts.tolist()
            self.losses.append(build_criterion(criterion, size, class_counts=task_counts, **options))

    def task_losses(self, logits, target):
        return [loss(logp, t) for loss, logp, t in
                zip(self.losses, task_log_probs(logits, self.tasks), split_target(target, self.tasks))]

    def forward(self, logits, target):
        return sum(w * l for w, l in zip(self.weights, self.task_losses(logits, target)))


AGE_BETA = 1.0  # smooth L1's switch from squared to absolute error, in units of model.AGE_UNIT years


class AgeRegressionLoss(nn.Module):
    """--age_head regression: the criterion on the class logits plus `weight` x smooth L1 of the
    regressed age against the person's age, in units of `unit` years (images of unknown age,
    -1, e.g. pseudo-labelled ones, add no age term).

    In training the model gives [N, C + 1] outputs (the age last) and the loader [N, 2] targets
    (label, age); mixing keeps its contract, as both terms are per-target losses. At validation the
    model gives C folded logits and the loader plain labels: the criterion alone."""

    def __init__(self, criterion, num_classes, weight=1.0, unit=10.0):
        super().__init__()
        if weight < 0:
            raise UserError(f"--age_weight must be >= 0, got {weight}")
        self.criterion, self.num_classes, self.weight, self.unit = criterion, num_classes, float(weight), float(unit)

    def forward(self, outputs, target):
        if target.dim() == 1:
            return self.criterion(outputs[:, :self.num_classes], target)
        labels, ages = target[:, 0], target[:, 1].float()
        loss = self.criterion(outputs[:, :self.num_classes], labels)
        known = ages >= 0
        residual = (outputs[:, self.num_classes].float() - ages) / self.unit
        age_loss = F.smooth_l1_loss(residual[known], torch.zeros_like(residual[known]), beta=AGE_BETA,
                                    reduction="sum") / known.sum().clamp(min=1)
        return loss + self.weight * age_loss


class SoftTargetLoss(nn.Module):
    """--soft_oof: the criterion on the hard label, blended with the cross-entropy against soft
    targets (a k-fold run's out-of-fold probabilities): (1 - weight) x criterion + weight x
    soft CE. In training the loader gives [N, 1 + C] targets (label, then the C probabilities)
    and mixing keeps its contract (both terms are per-target losses); at validation the plain
    labels: the criterion alone."""

    def __init__(self, criterion, num_classes, weight=0.3):
        super().__init__()
        if not 0 <= weight <= 1:
            raise UserError(f"--soft_weight must be in [0, 1], got {weight}")
        self.criterion, self.num_classes, self.weight = criterion, num_classes, float(weight)

    def forward(self, logits, target):
        if target.dim() == 1:
            return self.criterion(logits, target)
        labels, soft = target[:, 0].long(), target[:, 1:1 + self.num_classes].float()
        soft_ce = -(soft * torch.log_softmax(logits[:, :self.num_classes].float(), 1)).sum(1).mean()
        return (1 - self.weight) * self.criterion(logits, labels) + self.weight * soft_ce
