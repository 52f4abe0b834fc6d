"""Optimizers, learning-rate schedules and backbone freezing: timm's own factories, so every
option means what it means in timm's train.py.

- `OPTIMIZERS`: every optimizer of `timm.optim.create_optimizer_v2` that runs in this loop
  (`sgd` is SGD with Nesterov momentum, `momentum` without; the seed's `Adam`, `SGD`, `AdamW`
  match in any case). Weight decay skips norm and bias parameters (timm's
  `filter_bias_and_bn`); `--layer_decay` scales each layer's lr (timm's param groups).
- `build_scheduler`: `timm.scheduler.create_scheduler_v2` (cosine, tanh, poly, step, multistep,
  plateau, constant; `none` is timm's constant), with warmup, min lr, per-epoch or per-update
  steps. `step(epoch, metric)` after each epoch, `step_update(updates)` after each update.
- `Freezer`: `--freeze_epochs N` trains the head alone for N epochs (the backbone's lr is scaled
  to 0 and its batch norms keep their statistics), then everything.

An optimizer of your own: `OPTIMIZERS.register("myopt")(factory)` with
`factory(model, lr=..., weight_decay=..., momentum=..., layer_decay=..., **kwargs) -> Optimizer`.

Example: python train.py --opt adamw --lr 1e-3 --weight_decay 0.05 --sched cosine --warmup_epochs 2
"""
import contextlib
import functools
import logging
import math
import warnings

import timm.optim
import timm.scheduler
import torch

from maskcls.cli import UserError
from maskcls.registry import Registry

OPTIMIZERS = Registry("optimizer")
# left out: bitsandbytes and apex builds (bnb*, fused*: packages this project does not install),
# kron (needs opt_einsum and compiles), adahessian (needs a second-order backward)
_LEFT_OUT = ("kron", "kronc", "kronw", "adahessian")
for _name in timm.optim.list_optimizers():
    if not _name.startswith(("bnb", "fused")) and _name not in _LEFT_OUT:
        OPTIMIZERS.register(_name)(functools.partial(timm.optim.create_optimizer_v2, opt=_name))

# Schedules: a factory (optimizer, epochs, updates_per_epoch, **timm's arguments) -> a timm-style
# scheduler (step(epoch, metric), step_update(updates)). `length=True`: its shape depends on
# --epochs (a resumed run cannot stretch it); `per_epoch_only=True`: it steps on validation
# metrics, once per epoch.
SCHEDULERS = Registry("scheduler")


def _timm_scheduler(sched, optimizer, epochs, updates_per_epoch, on_updates=False, warmup_epochs=0,
                    warmup_lr=1e-5, min_lr=0.0, decay_epochs=30, decay_milestones=(30, 60), decay_rate=0.1,
                    patience_epochs=10, cycle_limit=1, cycle_mul=1.0, cycle_decay=1.0, **kwargs):
    """timm's scheduler `sched`. Cosine and tanh take timm's cycle options: `cycle_limit` cycles
    (restarts), each `cycle_mul` times as long as the one before and its peak `cycle_decay`
    times as high, fitted into `epochs` (timm counts --epochs per cycle; here the run keeps
    its length)."""
    cycles = sum(cycle_mul ** i for i in range(cycle_limit)) if sched in ("cosine", "tanh") else 1
    with _quiet_timm_scheduler():
        scheduler, _ = timm.scheduler.create_scheduler_v2(
            optimizer, sched=sched, num_epochs=max(1, round(epochs / cycles)) if cycles != 1 else epochs,
            decay_epochs=decay_epochs, decay_milestones=list(decay_milestones), decay_rate=decay_rate,
            min_lr=min_lr, warmup_lr=warmup_lr, warmup_epochs=warmup_epochs, patience_epochs=patience_epochs,
            plateau_mode="max", cycle_limit=cycle_limit, cycle_mul=cycle_mul, cycle_decay=cycle_decay,
            step_on_epochs=not on_updates, updates_per_epoch=updates_per_epoch)
    return scheduler


@contextlib.contextmanager
def _quiet_timm_scheduler():
    """timm's cosine and poly schedules log a warning when a one-epoch run keeps its rate
    ("will have no effect"): true, harmless, and a stray line on stderr around a user error's
    one line. Muted while one is built. So is timm's FutureWarning on its plateau schedule: its
    reason, that a resumed run restarts the plateau logic, does not hold here (last.pth keeps
    the counters timm leaves out: SchedulerState), and its advice names a script that is not
    the project's."""
    loggers = [logging.getLogger(f"timm.scheduler.{name}") for name in ("cosine_lr", "poly_lr")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="PlateauLRScheduler is deprecated", category=FutureWarning)
            yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


class ShapedLR(timm.scheduler.scheduler.Scheduler):
    """A schedule given as the share of the peak rate at each point of the run (`shape(f)`, f in
    [0, 1)), after a linear warmup from `warmup_lr` over `warmup_t`; stepped per epoch or per
    update like timm's own. A floor of `min_lr`."""

    def __init__(self, optimizer, shape, total_t, warmup_t=0, warmup_lr=1e-5, min_lr=0.0, t_in_epochs=True):
        super().__init__(optimizer, param_group_field="lr", t_in_epochs=t_in_epochs)
        self.shape, self.total_t, self.warmup_t = shape, max(total_t, 1), warmup_t
        self.warmup_lr, self.min_lr = warmup_lr, min_lr
        super().update_groups(self._get_lr(0))  # the first epoch's rate from the start

    def state_dict(self):  # plain data for last.pth (weights_only loading): the shape is code, not state
        return {key: value for key, value in super().state_dict().items() if key != "shape"}

    def _get_lr(self, t):
        if t < self.warmup_t:
            return [self.warmup_lr + (peak - self.warmup_lr) * t / self.warmup_t for peak in self.base_values]
        fraction = min((t - self.warmup_t) / max(self.total_t - self.warmup_t, 1), 1.0)
        return [max(self.min_lr, peak * self.shape(fraction)) for peak in self.base_values]


ONE_CYCLE_RISE, ONE_CYCLE_DIV, ONE_CYCLE_FINAL_DIV = 0.3, 25.0, 1e4  # fastai's pct_start, div, div_final
FLAT_SHARE = 0.72  # fastai's fit_flat_cos: the share of the run at the peak before the cosine


def one_cycle(fraction):
    """fastai's one-cycle: from 1/25 of the peak up to it (cosine) over the first 30%, then
    (cosine) down to 1/10,000 of it."""
    if fraction < ONE_CYCLE_RISE:
        start = 1 / ONE_CYCLE_DIV
        return start + (1 - start) * (1 - math.cos(math.pi * fraction / ONE_CYCLE_RISE)) / 2
    end = 1 / ONE_CYCLE_FINAL_DIV
    return end + (1 - end) * (1 + math.cos(math.pi * (fraction - ONE_CYCLE_RISE) / (1 - ONE_CYCLE_RISE))) / 2


def flat_cosine(fraction):
    """fastai's fit_flat_cos: the peak for the first 72% of the run, then a cosine to 0."""
    if fraction < FLAT_SHARE:
        return 1.0
    return (1 + math.cos(math.pi * (fraction - FLAT_SHARE) / (1 - FLAT_SHARE))) / 2


def _shaped(shape, optimizer, epochs, updates_per_epoch, on_updates=False, warmup_epochs=0, warmup_lr=1e-5,
            min_lr=0.0, **kwargs):
    scale = updates_per_epoch if on_updates else 1
    return ShapedLR(optimizer, shape, epochs * scale, warmup_epochs * scale, warmup_lr, min_lr,
                    t_in_epochs=not on_updates)


for _name, _timm_name, _meta in (("none", "constant", {}), ("constant", "constant", {}), ("step", "step", {}),
                                 ("multistep", "multistep", {}), ("cosine", "cosine", {"length": True}),
                                 ("tanh", "tanh", {"length": True}), ("poly", "poly", {"length": True}),
                                 ("plateau", "plateau", {"per_epoch_only": True})):
    SCHEDULERS.register(_name, **_meta)(functools.partial(_timm_scheduler, _timm_name))
SCHEDULERS.register("onecycle", length=True)(functools.partial(_shaped, one_cycle))
SCHEDULERS.register("flatcos", length=True)(functools.partial(_shaped, flat_cosine))


def stretchable(sched):
    """Whether a resumed run may give this schedule another --epochs (its shape does not depend on it)."""
    return not SCHEDULERS.meta(sched).get("length")


def build_optimizer(name, model, lr, weight_decay=0.0, momentum=0.9, betas=None, eps=None, layer_decay=None,
                    extra=None):
    """The optimizer `name` over `model`'s parameters, through timm (its param groups: no weight
    decay on norm and bias, `layer_decay`). A keyword the optimizer does not take is one line."""
    kwargs = {k: v for k, v in (("betas", tuple(betas) if betas else None), ("eps", eps)) if v is not None}
    kwargs.update(extra or {})
    factory = functools.partial(OPTIMIZERS.get(name), model, lr=lr, weight_decay=weight_decay, momentum=momentum,
                                layer_decay=layer_decay)
    try:
        optimizer = factory(**kwargs)
    except TypeError as err:
        raise UserError(f"optimizer {name} refused its arguments ({err}); check --opt_betas, --opt_eps, "
                        f"--opt_kwargs") from None
    if layer_decay is not None and len({group.get("lr_scale", 1.0) for group in optimizer.param_groups}) < 2:
        raise UserError(f"--layer_decay: timm cannot split {type(model).__name__} into layers (it has no "
                        f"group_matcher), so every parameter would keep the same rate; drop --layer_decay")
    return fused_if_possible(optimizer, factory, kwargs)


def fused_if_possible(optimizer, factory, kwargs):
    """torch's Adam, AdamW, SGD and Adagrad have a fused kernel (one call per step instead of
    several per parameter tensor), on the CPU too, where torch does not pick it by itself: an
    AdamW step of resnet18 takes 10 ms instead of 61 here, the same update to float precision.
    Used unless --opt_kwargs sets fused or foreach, and where the parameters allow it."""
    if optimizer.defaults.get("fused", False) is not None or {"fused", "foreach"} & set(kwargs):
        return optimizer
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if not params or not all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in params):
        return optimizer
    try:
        return factory(**kwargs, fused=True)
    except (RuntimeError, ValueError, TypeError):  # a torch without that fused kernel: the loop
        return optimizer


def build_scheduler(optimizer, sched, epochs, updates_per_epoch, on_updates=False, **kwargs):
    """The schedule `sched` (SCHEDULERS) over `optimizer`; steps per update with `on_updates`.
    Plateau watches val F1."""
    if on_updates and SCHEDULERS.meta(sched).get("per_epoch_only"):
        raise UserError(f"--scheduler {sched} steps on validation metrics, once per epoch: drop --sched_on_updates")
    return SCHEDULERS.build(sched, optimizer, epochs, updates_per_epoch, on_updates=on_updates, **kwargs)


class SchedulerState:
    """A timm scheduler's state for last.pth, plus what timm's plateau scheduler leaves out of
    its own (the bad-epoch and cooldown counters of the torch ReduceLROnPlateau inside it), so a
    resumed plateau run decays at the epoch an uninterrupted one would."""

    COUNTERS = ("num_bad_epochs", "cooldown_counter")

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def state_dict(self):
        state = self.scheduler.state_dict()
        inner = getattr(self.scheduler, "lr_scheduler", None)
        if inner is not None:
            state["plateau_counters"] = {k: getattr(inner, k) for k in self.COUNTERS}
        return state

    def load_state_dict(self, state):
        state = dict(state)
        counters = state.pop("plateau_counters", None)
        self.scheduler.load_state_dict(state)
        for key, value in (counters or {}).items():
            setattr(self.scheduler.lr_scheduler, key, value)


def head_parameters(model):
    """The classifier's parameters (model.get_classifier(), as timm and BaseModel define it)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, torch.nn.Module):
        raise UserError(f"--freeze_epochs needs a model with a classifier (get_classifier()); "
                        f"{type(model).__name__} has none")
    return list(head.parameters())


class Freezer:
    """--freeze_epochs N: for the first N epochs only the head learns. The optimizer's groups
    are split into head and backbone twins (same settings) once; while frozen, a backbone
    group's `lr_scale` (which timm's schedulers multiply in) is 0 and the backbone's batch
    norms stay in eval mode. Zero learning rate rather than requires_grad=False: DDP and the
    optimizer state see the same parameters all along. Thawed, the backbone learns at
    1 / `backbone_ratio` of the head's rate (--backbone_lr_ratio: fastai's discriminative rates;
    with no frozen epochs, from the start)."""

    def __init__(self, model, optimizer, epochs, backbone_ratio=1.0):
        self.epochs, self.optimizer, self.backbone_ratio = epochs, optimizer, backbone_ratio
        head = {id(p) for p in head_parameters(model)}
        groups = []
        for group in optimizer.param_groups:
            for part in ([p for p in group["params"] if id(p) in head], [p for p in group["params"] if id(p) not in head]):
                if part:
                    groups.append({**group, "params": part, "backbone": id(part[0]) not in head})
        optimizer.param_groups[:] = groups
        self.norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                      and not any(id(p) in head for p in m.parameters())]
        self.scales = [group.get("lr_scale", 1.0) for group in groups]
        self.frozen = False

    def set_epoch(self, epoch):
        """Before epoch `epoch` (1-based): freeze or thaw the backbone's groups."""
        frozen, value = epoch <= self.epochs, self._scheduled()
        for group, scale in zip(self.optimizer.param_groups, self.scales):
            if group["backbone"]:
                group["lr_scale"] = 0.0 if frozen else scale / self.backbone_ratio
                group["lr"] = value * group["lr_scale"]
        self.frozen = frozen

    def _scheduled(self):
        """The schedule's current value, read off a head group (its lr over its own scale)."""
        for group, scale in zip(self.optimizer.param_groups, self.scales):
            if not group["backbone"]:
                return group["lr"] / scale
        raise AssertionError("a Freezer holds at least one head group")

    def norms_eval(self):
        """After model.train(): the frozen backbone's batch norms keep their running statistics."""
        if self.frozen:
            for module in self.norms:
                module.eval()
