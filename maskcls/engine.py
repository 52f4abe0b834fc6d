"""The training step and the two loops over it, `train_one_epoch` and `evaluate`: what
train.py's `fit` runs each epoch, and what bench.py times.

One optimisation step (`Step` holds its parts): mix the batch (CutMix / MixUp), forward and loss
under autocast, backward with the loss divided over `accum` micro-batches (DDP syncs only on
the last of them), then one update: unscale (AMP), clip, optimizer and scaler step, zero the
gradients, update the EMA and, with per-update schedules, the learning rate.

Example: python train.py --grad_accum_steps 4 --clip_grad 1.0 --sched_on_updates True
"""
import contextlib
import dataclasses
import math

import torch
from timm.utils import dispatch_clip_grad

from augmentation import tta_logits
from cutmix import BatchMixer, mixed_loss
from maskcls import cli
from maskcls import distributed
from maskcls.metrics import macro_f1, task_f1
from maskcls.runtime import unwrap
from model import regressed_ages

NOT_FINITE = "training loss is not finite (NaN or inf): lower --lr, or check the data; best.pth is left as it was"


@dataclasses.dataclass
class Step:
    """What one optimisation step needs besides the model and the batch."""
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: object  # runtime.Precision: autocast dtype and memory format
    mixer: BatchMixer = dataclasses.field(default_factory=BatchMixer)
    ema: object = None         # timm.utils.ModelEmaV3, updated after every update
    accum: int = 1             # --grad_accum_steps: micro-batches per update
    clip: float = None         # --clip_grad (None: off) ...
    clip_mode: str = "norm"    # ... as timm's dispatch_clip_grad: norm, value or agc
    scheduler: object = None   # a timm scheduler, stepped per update when on_updates
    on_updates: bool = False
    updates: int = 0           # updates so far in the run (the per-update schedule's clock)
    freezer: object = None     # optim.Freezer (--freeze_epochs), or None
    teacher: object = None     # distill.Teacher (--teacher): blends its soft targets into the loss
    classes: int = None        # class logits of the model's output (an age head adds one more)


def _syncing(model, sync):
    """DDP's no_sync() on micro-batches before the last of an update: one all-reduce per update."""
    inner = getattr(model, "_orig_mod", model)
    if sync or not isinstance(inner, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return inner.no_sync()


def forward_backward(model, images, labels, step, share=1.0, sync=True):
    """Mix, forward and loss under autocast, backward of `share` (1 / micro-batches) of the loss.
    Returns the loss and logits (detached) and the mixing lambda (1.0: unmixed)."""
    images, y_a, y_b, lam = step.mixer(images, labels)
    with _syncing(model, sync):
        with step.precision.autocast():
            logits = model(images)
            loss = mixed_loss(step.criterion, logits, y_a, y_b, lam)
            if step.teacher is not None:
                loss = step.teacher.blend(loss, logits, images)
        step.scaler.scale(loss * share if share != 1.0 else loss).backward()
    return loss.detach(), logits.detach(), lam


def optimizer_update(model, step):
    """One update from the gradients gathered: unscale before clipping (AMP), clip, step, zero,
    EMA, and the per-update learning rate."""
    if step.clip is not None:
        step.scaler.unscale_(step.optimizer)
        dispatch_clip_grad(model.parameters(), value=step.clip, mode=step.clip_mode)
    step.scaler.step(step.optimizer)
    step.scaler.update()
    step.optimizer.zero_grad(set_to_none=True)
    step.updates += 1
    if step.ema is not None:
        step.ema.update(unwrap(model))
    if step.on_updates and step.scheduler is not None:
        step.scheduler.step_update(num_updates=step.updates)


def train_step(model, images, labels, step):
    """One update on one batch (no accumulation): forward_backward, then optimizer_update."""
    out = forward_backward(model, images, labels, step)
    optimizer_update(model, step)
    return out


def updates_per_epoch(batches, accum):
    return math.ceil(batches / accum)


def train_one_epoch(model, loader, step, device, desc, context=distributed.Context()):
    """One pass over the training side, `step.accum` batches per update (the last update of the
    epoch takes what is left); returns mean loss and accuracy on unmixed batches (over every
    rank under torchrun)."""
    model.train()
    if step.freezer is not None:
        step.freezer.norms_eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = unmixed = 0
    batches = len(loader)
    bar = cli.progress(loader, desc=desc, unit="batch", disable=not context.is_main)
    for i, (images, labels) in enumerate(bar):
        first = i // step.accum * step.accum
        size = min(step.accum, batches - first)  # micro-batches in this update
        last = i == first + size - 1
        images = step.precision.batch(images.to(device, non_blocking=True))
        labels = labels.to(device, non_blocking=True)
        loss, logits, lam = forward_backward(model, images, labels, step, share=1.0 / size, sync=last)
        if last:
            optimizer_update(model, step)
        loss_sum += loss * len(labels)
        seen += len(labels)
        if lam == 1.0:  # accuracy of a mixed batch means nothing: count unmixed batches only
            if labels.dim() == 2:  # (label, age) or (label, soft targets): the label first
                logits, labels = logits[:, :step.classes], labels[:, 0].long()
            correct += (logits.argmax(1) == labels).sum()
            unmixed += len(labels)
        if i % 10 == 0 and not math.isfinite(loss_sum.item()):  # a sync every 10 steps, not every step
            raise cli.UserError(NOT_FINITE)
        cli.live_postfix(bar, lambda: {"loss": f"{loss_sum.item() / seen:.4f}",  # the running mean so far
                                       "acc": f"{correct.item() / max(unmixed, 1):.3f}"}, i)
    loss_total, seen, correct_total, unmixed = distributed.sum_all(context, loss_sum.item(), seen, correct.item(),
                                                                   unmixed)
    if not math.isfinite(loss_total):
        raise cli.UserError(NOT_FINITE)
    return loss_total / max(seen, 1), correct_total / unmixed if unmixed else float("nan")


@torch.no_grad()
def evaluate(model, loader, criterion, device, precision, num_classes, views=(), per_task=False,
             context=distributed.Context()):
    """Loss, accuracy and macro F1 over the WHOLE validation set: predictions are concatenated
    first (and gathered from every rank under torchrun, the sampler's padding dropped).

    With TTA `views`, predictions come from the softmax averaged over the views; the loss stays
    that of the plain images. `per_task` adds the macro F1 of mask, gender and age. A model with
    an age head adds "ages": its regressed age per image (averaged over the views).
    """
    model.eval()
    logits_all, logp_all, labels_all, ages_all = [], [], [], []
    for images, labels in loader:
        images = precision.batch(images.to(device, non_blocking=True))
        with precision.autocast(), regressed_ages(model) as ages:
            logits, logp = tta_logits(model, images, views)
        logits_all.append(logits.float().cpu())
        logp_all.append(logp.cpu())
        labels_all.append(labels)
        ages_all.append(torch.stack(ages).mean(0).cpu() if ages else torch.full((len(labels),), float("nan")))
    logits, logp, labels, ages = torch.cat(logits_all), torch.cat(logp_all), torch.cat(labels_all), torch.cat(ages_all)
    if context.enabled:  # each rank saw a padded shard: merge by dataset index
        shards = distributed.gather(context, (list(loader.sampler), logits, logp, labels, ages))
        merged = {}
        for order, *rows in shards:
            for position, index in enumerate(order):
                merged.setdefault(index, [r[position] for r in rows])
        logits, logp, labels, ages = (torch.stack(column) for column in zip(*(merged[i] for i in sorted(merged))))
    preds = logp.argmax(1)
    result = {
        "val_loss": criterion(logits.to(device), labels.to(device)).item(),
        "val_acc": (preds == labels).float().mean().item(),
        "val_f1": macro_f1(labels.numpy(), preds.numpy(), num_classes),
        "probs": logp.exp().numpy(), "preds": preds, "labels": labels,
        "ages": None if torch.isnan(ages).all() else ages.numpy(),
    }
    if per_task:
        result.update({f"val_f1_{task}": f1 for task, f1 in task_f1(labels.tolist(), preds.tolist()).items()})
    return result


def is_better(val, best):
    """Higher macro F1 wins, and a tie goes to the newcomer: the later epoch (or the EMA weights
    against the raw ones of the same epoch). Once a small validation set saturates, every epoch
    ties; the later one has seen more of the schedule (a smaller learning rate, more averaging),
    while the lower val loss, the other candidate, moves on noise there."""
    return val["val_f1"] >= best["val_f1"]
