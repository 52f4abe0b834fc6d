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
import functools

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
                    patience_epochs=10):
    scheduler, _ = timm.scheduler.create_scheduler_v2(
        optimizer, sched=sched, num_epochs=epochs, decay_epochs=decay_epochs,
        decay_milestones=list(decay_milestones), decay_rate=decay_rate, min_lr=min_lr, warmup_lr=warmup_lr,
        warmup_epochs=warmup_epochs, patience_epochs=patience_epochs, plateau_mode="max",
        step_on_epochs=not on_updates, updates_per_epoch=updates_per_epoch)
    return scheduler


for _name, _timm_name, _meta in (("none", "constant", {}), ("constant", "constant", {}), ("step", "step", {}),
                                 ("multistep", "multistep", {}), ("cosine", "cosine", {"length": True}),
                                 ("tanh", "tanh", {"length": True}), ("poly", "poly", {"length": True}),
                                 ("plateau", "plateau", {"per_epoch_only": True})):
    SCHEDULERS.register(_name, **_meta)(functools.partial(_timm_scheduler, _timm_name))


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
    optimizer state see the same parameters all along."""

    def __init__(self, model, optimizer, epochs):
        self.epochs, self.optimizer = epochs, optimizer
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
                group["lr_scale"] = 0.0 if frozen else scale
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
