"""Model registry, weight loading and checkpoints.

Seed names map onto timm models through one preset table; any other timm model name passes
straight through (`--model convnext_tiny`). Every model is built with its head sized to the
dataset's class count. Each entry knows its default input size (used when `--resize` is not
given).

Add your own model in this file; an option it declares becomes a flag of train.py (default and
type from the factory's signature), is recorded in config.json, and inference rebuilds the model
with it (`build_from_config`):

    @MODELS.register("myNet", input_size=(224, 224), options={"my_width": "channels of the first block"})
    def my_net(num_classes, pretrained=False, my_width=32, **kwargs):
        return MyNet(num_classes, my_width)

    python train.py --model myNet --my_width 64

Weights: `--pretrained` downloads timm's weights (a user's machine, with network);
`--weights PATH` loads a local state dict, timm checkpoint, or .safetensors file. Checkpoints
are read with `torch.load(weights_only=True)`: a file that would run code is refused.

Example: python train.py --model efficientNet_b3 --pretrained True
"""
import contextlib
import functools
import inspect
import os
import pickle

import numpy as np
import timm
import torch
from timm.layers import SelectAdaptivePool2d
from torch import nn

from maskcls.atomic import replacing
from maskcls.cli import UserError
from maskcls.labels import AGE_BINS
from maskcls.registry import Registry

MODELS = Registry("model")
MSD_P = 0.25  # multi-sample dropout: the rate of each dropout sample around the head
GLOBAL_POOLS = ("avg", "max", "avgmax", "catavgmax")  # --gp for a CNN (timm's names); ViTs take token, map...
BASE_POOL = "catavgmax"  # BaseModel's own --gp; runs from before --gp existed pooled by average (LEGACY_POOL)
LEGACY_POOL = {"BaseModel": "avg"}


class BaseModel(nn.Module):
    """A small CNN (four conv blocks, global pooling): fast on a CPU, for demos and debugging.

    Pooled by average and maximum side by side (`pool` "catavgmax", fastai's concat pool): a small
    cue such as the mouth a mask hides moves the maximum of a feature map, where it shifts the
    average by its share of the map. On 120 sample persons (10 epochs, batches of 21), average
    pooling never learned the mask sub-task; the concat pool did (README, default recipe)."""

    def __init__(self, num_classes, width=16, drop_rate=0.25, pool=BASE_POOL):
        super().__init__()
        blocks, channels = [], 3
        for out in (width, width * 2, width * 4, width * 8):
            blocks += [nn.Conv2d(channels, out, 3, padding=1, bias=False), nn.BatchNorm2d(out),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*blocks)
        try:
            self.pool = SelectAdaptivePool2d(pool_type=pool, flatten=True)
        except AssertionError:
            raise UserError(f"BaseModel cannot pool by {pool!r} (--gp): expected {', '.join(GLOBAL_POOLS)}") from None
        self.dropout = nn.Dropout(drop_rate)
        self.fc = nn.Linear(channels * self.pool.feat_mult(), num_classes)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.dropout(self.pool(self.features(x))))


@MODELS.register("BaseModel", input_size=(256, 192))  # the photos' 4:3 portrait shape, halved
def base_model(num_classes, pretrained=False, drop_rate=0.25, global_pool=None, **kwargs):
    if pretrained:
        print("note: BaseModel has no pretrained weights; starting from random init")
    return BaseModel(num_classes, drop_rate=drop_rate, pool=global_pool or BASE_POOL)


def timm_model(timm_name, num_classes, pretrained=False, drop_rate=None, drop_path_rate=None, global_pool=None,
               **kwargs):
    """One wrapper behind every preset: timm builds the model with a num_classes-way head (and
    --drop / --drop_path / --gp where given; None: the model's own)."""
    rates = {k: v for k, v in (("drop_rate", drop_rate), ("drop_path_rate", drop_path_rate),
                               ("global_pool", global_pool)) if v is not None}
    flags = {"drop_rate": "--drop", "drop_path_rate": "--drop_path", "global_pool": "--gp"}
    try:
        return timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes, **rates)
    except TypeError as err:
        taken = [k for k in rates if k in str(err)]
        if taken:
            raise UserError(f"model {timm_name} does not take {flags[taken[0]]} ({err})") from None
        raise
    except AssertionError as err:  # timm's pools assert on a pool type the model cannot use
        if global_pool is not None:
            raise UserError(f"model {timm_name} cannot pool by --gp {global_pool!r}: {err}") from None
        raise
    except (OSError, RuntimeError, ValueError) as err:
        if pretrained:  # no network, no hub cache: say what to do instead
            raise UserError(f"cannot get pretrained weights for {timm_name} ({type(err).__name__}: "
                            f"{str(err).splitlines()[0] if str(err) else ''}); "
                            f"download them elsewhere and pass --weights PATH") from None
        raise


# seed name -> (timm model, default input size H, W)
PRESETS = {
    "imgInceptionV3": ("inception_v3", (299, 299)),
    "denseNet": ("densenet121", (224, 224)),
    "mobileNet": ("mobilenetv3_large_100", (224, 224)),
    "resnet18": ("resnet18", (224, 224)),
    "resnet34": ("resnet34", (224, 224)),
    "resnet50": ("resnet50", (224, 224)),
    "efficientNet_b0": ("efficientnet_b0", (224, 224)),
    "efficientNet_b1": ("efficientnet_b1", (240, 240)),
    "efficientNet_b2": ("efficientnet_b2", (256, 256)),
    "efficientNet_b3": ("efficientnet_b3", (288, 288)),
    "efficientNet_b4": ("efficientnet_b4", (320, 320)),
    "efficientNet_b5": ("efficientnet_b5", (448, 448)),
    "efficientNet_b6": ("efficientnet_b6", (528, 528)),
    "efficientNet_b7": ("efficientnet_b7", (600, 600)),
}
for _name, (_timm_name, _size) in PRESETS.items():
    MODELS.register(_name, input_size=_size, timm_name=_timm_name)(functools.partial(timm_model, _timm_name))


# ---------------------------------------------------------------- heads
class FactorizedHead(nn.Module):
    """Multi-task head: one linear layer per task (e.g. mask 3, gender 2, age 3) whose
    log-softmaxes are summed into the joint classes (label = ((t0 * n1) + t1) * n2 + t2 ...).

    The output is a valid logit vector over the joint classes (its softmax is the product of
    the task probabilities), so metrics, checkpoints, ensembles and submissions stay joint;
    `loss.MultiTaskLoss` recovers each task by marginalising."""

    def __init__(self, in_features, tasks):
        super().__init__()
        self.tasks = tuple(tasks)
        self.fc = nn.Linear(in_features, sum(self.tasks))

    def forward(self, features):
        parts = torch.split(self.fc(features), self.tasks, dim=-1)
        joint = None
        for part in parts:
            logp = torch.log_softmax(part.float(), dim=-1)
            joint = logp if joint is None else (joint.unsqueeze(-1) + logp.unsqueeze(-2)).flatten(-2)
        return joint


class MultiSampleDropout(nn.Module):
    """Multi-sample dropout: in training, the head's output averaged over `samples` dropout
    masks of the features; at eval, one pass without dropout."""

    def __init__(self, head, samples=4, p=MSD_P):
        super().__init__()
        self.head, self.samples, self.dropout = head, samples, nn.Dropout(p)

    def forward(self, features):
        if not self.training:
            return self.head(features)
        return torch.stack([self.head(self.dropout(features)) for _ in range(self.samples)]).mean(0)


# --age_head regression: the regressed age in years is AGE_CENTER + AGE_UNIT * (the head's output)
AGE_CENTER, AGE_UNIT = 40.0, 10.0
AGE_WIDTH = 4.0  # years: how soft the age band of a regressed age is, before it is fitted on held-out data


def age_band_logits(years, cuts, width):
    """[N] regressed ages -> [N, bands] logits: minus the distance in years from the age to each band
    (edges `cuts`), over `width`. The band holding the age scores 0 and wins; how close the age is
    to an edge sets how sure the band is."""
    inf = years.new_tensor([float("inf")])
    edges = torch.cat([-inf, cuts.to(years.dtype), inf])
    low, high = edges[:-1], edges[1:]
    years = years.unsqueeze(-1)
    return -((low - years).clamp(min=0) + (years - high).clamp(min=0)) / width


def fold_age(logits, years, cuts, width, tasks):
    """Joint logits whose age factor (the last of `tasks`) comes from the regressed age: the
    softmax is p(the other factors) from `logits` times p(age band) from `age_band_logits`."""
    joint = torch.log_softmax(logits.float(), dim=-1)
    rest = torch.logsumexp(joint.unflatten(-1, (-1, tasks[-1])), dim=-1)
    band = torch.log_softmax(age_band_logits(years.float(), cuts, width), dim=-1)
    return (rest.unsqueeze(-1) + band.unsqueeze(-2)).flatten(-2)


class AgeRegressionHead(nn.Module):
    """--age_head regression: the classifier plus a linear layer regressing the age in years.

    In training the output is [N, C + 1]: the classifier's C logits and the age
    (`loss.AgeRegressionLoss` splits them). In eval it is the C joint logits with the age band
    taken from the regressed age and the cut points `cuts` (`fold_age`), so validation,
    inference, TTA and ensembles see ordinary logits. The cut points and `width` are set after
    training from held-out predictions (`set_age_cuts`, agecuts.py); the age itself passes
    through `self.years`, where `regressed_ages` reads it."""

    def __init__(self, classifier, in_features, tasks, cuts=AGE_BINS, width=AGE_WIDTH):
        super().__init__()
        self.classifier, self.tasks = classifier, tuple(tasks)
        self.age = nn.Linear(in_features, 1)
        self.years = nn.Identity()
        self.register_buffer("cuts", torch.tensor(cuts, dtype=torch.float32), persistent=False)
        self.register_buffer("width", torch.tensor(float(width)), persistent=False)

    def forward(self, features):
        logits = self.classifier(features)
        years = self.years(AGE_CENTER + AGE_UNIT * self.age(features).squeeze(-1).float())
        if self.training:
            return torch.cat([logits.float(), years.unsqueeze(-1)], dim=-1)
        return fold_age(logits, years, self.cuts, self.width, self.tasks)


def age_heads(model):
    return [m for m in model.modules() if isinstance(m, AgeRegressionHead)]


def set_age_cuts(model, cuts, width):
    """Age band edges (years) and softness for every age head of `model`."""
    for head in age_heads(model):
        head.cuts.copy_(torch.as_tensor(cuts, dtype=torch.float32))
        head.width.fill_(float(width))
    return model


@contextlib.contextmanager
def regressed_ages(model):
    """Collect the regressed ages (years) of every forward pass of `model` inside the block: yields
    a list that gets one [N] tensor per pass (empty for a model without an age head)."""
    found, hooks = [], []
    for head in age_heads(model):
        hooks.append(head.years.register_forward_hook(lambda module, args, out: found.append(out.detach().float())))
    try:
        yield found
    finally:
        for hook in hooks:
            hook.remove()


def replace_classifier(model, build):
    """Swap the model's classifier (any depth, e.g. `head.fc`) for `build(old_classifier)`."""
    old = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is old and name:
            parent_name, _, attr = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, attr, build(old))
            return model
    raise UserError(f"{type(model).__name__} has no classifier layer that a custom head can replace")


def check_model_name(name):
    """The model's canonical name (registered spelling, or timm's own); fails early, before any
    data is read, on a name that is neither registered nor timm's (case is not significant)."""
    if callable(name):
        return name
    if name in MODELS:
        return MODELS.canonical(name)
    for candidate in (name, str(name).lower()):
        if timm.is_model(candidate):
            return candidate
    raise MODELS.unknown(name, extra_choices=timm.list_models(),
                         hint=" (or any timm model name: timm.list_models())")


HEADS = ("linear", "multitask")
AGE_HEADS = ("none", "regression")


def create_model(name, num_classes, pretrained=False, head="linear", tasks=None, msd=0, msd_p=MSD_P, drop=None,
                 drop_path=None, age_head="none", gp=None, **options):
    """A registered model, or a timm model by its own name, with a num_classes-way output.

    head="multitask": a FactorizedHead over `tasks` (their product must be num_classes);
    age_head="regression": an AgeRegressionHead around the classifier (the competition's tasks);
    msd > 1: multi-sample dropout with `msd` samples of rate `msd_p` around the head;
    drop / drop_path: timm's dropout and stochastic-depth rates (None: the model's own);
    gp: timm's global pool type (avg, max, avgmax, catavgmax; None: the model's own);
    `options`: the entry's own (see MODELS.register's `options`).
    """
    name = check_model_name(name)
    rates = {"drop_rate": drop, "drop_path_rate": drop_path, "global_pool": gp}
    if callable(name) or name in MODELS:
        factory = MODELS.get(name)
        takes = inspect.signature(factory).parameters
        for key, flag in (("drop_rate", "--drop"), ("drop_path_rate", "--drop_path"), ("global_pool", "--gp")):
            if rates[key] is not None and key not in takes:
                raise UserError(f"model {name if isinstance(name, str) else factory.__name__} does not take {flag}")
        model = MODELS.build(name, num_classes=num_classes, pretrained=pretrained, **rates, **options)
    else:
        model = timm_model(name, num_classes, pretrained=pretrained, **rates)
    if head == "multitask":
        if not tasks or int(np.prod(tasks)) != num_classes:
            raise UserError(f"--head multitask needs the competition's label scheme (tasks {tasks} for "
                            f"{num_classes} classes)")
        replace_classifier(model, lambda old: FactorizedHead(old.in_features, tasks))
    if age_head == "regression":
        if not tasks or int(np.prod(tasks)) != num_classes:
            raise UserError(f"--age_head regression needs the competition's label scheme (tasks {tasks} for "
                            f"{num_classes} classes)")
        replace_classifier(model, lambda old: AgeRegressionHead(old, getattr(old, "in_features", None)
                                                                or old.fc.in_features, tasks))
    if msd and msd > 1:
        replace_classifier(model, lambda old: MultiSampleDropout(old, msd, msd_p))
    return model


# what config.json holds about the model, besides the entry's own options
MODEL_KEYS = ("head", "tasks", "msd", "msd_p", "drop", "drop_path", "age_head", "gp")


def build_from_config(config, pretrained=False, source=None):
    """The model a run's config (train.py's flags, or a run folder's config.json) describes: the one
    place a model is built, for training, resuming and inference alike. Keys a run from before
    an option existed lacks take the option's default. `source`: the config was read from that
    file (readers.read_config checked its own keys), so the model's plug-in options are parsed
    again as their flags would be."""
    keys = {k: config[k] for k in MODEL_KEYS if config.get(k) is not None}
    if "gp" not in config:  # a run from before --gp: the model's pool of that time
        keys.update(gp=legacy_pool(config["model"]))
    return create_model(config["model"], config["num_classes"], pretrained=pretrained, **keys,
                        **MODELS.values_for(config["model"], config, source))


def legacy_pool(name):
    """The --gp a run from before the flag existed was trained with (None: the model's own, unchanged)."""
    return LEGACY_POOL.get(name) if isinstance(name, str) else None


def input_size_of(name):
    """(H, W): the entry's own size, else the timm model's pretrained config, else 224."""
    size = MODELS.meta(name).get("input_size")
    if size is None and isinstance(name, str) and timm.is_model(name):
        cfg = timm.get_pretrained_cfg(name)
        size = cfg.input_size[1:] if cfg is not None else None
    return tuple(size or (224, 224))


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(obj, path):
    """Write to a temporary name, then rename: a crash mid-write never leaves a broken file."""
    with replacing(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path):
    """A checkpoint as plain data; files carrying code (pickled objects) are refused."""
    if not os.path.isfile(path):
        raise UserError(f"checkpoint {path} not found")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error types
            raise UserError(f"cannot read {path}: {err}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise UserError(f"refusing to load {path}: it holds more than weights and could run code "
                        f"({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as err:
        raise UserError(f"cannot read checkpoint {path}: {err}") from None


def state_dict_of(checkpoint):
    """The model weights inside a checkpoint of ours, of timm's train.py, or a bare state dict."""
    if isinstance(checkpoint, dict):
        for key in ("model", "state_dict", "model_state_dict", "state_dict_ema"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, dict) or not all(torch.is_tensor(v) for v in checkpoint.values()):
        raise UserError("the checkpoint holds no state dict of tensors")
    prefixes = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
    cleaned = {}
    for key, value in checkpoint.items():
        while key.startswith(prefixes):
            key = key.split(".", 1)[1]
        cleaned[key] = value
    return cleaned


def _head_prefix(model):
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    for name, module in model.named_modules():
        if module is head and name:
            return name + "."
    return None


def load_weights(model, path, model_name="model", allow_new_head=False):
    """Load weights from `path` into `model`; any mismatch is a UserError naming both sides.

    With `allow_new_head` (fine-tuning from `--weights`), a classifier of another class count
    is skipped and the model's freshly initialised head kept.
    """
    return load_state(model, read_checkpoint(path), path, model_name, allow_new_head)


def load_state(model, checkpoint, path, model_name="model", allow_new_head=False):
    """load_weights() for a checkpoint already read (read_checkpoint) from `path`."""
    state = state_dict_of(checkpoint)
    own = model.state_dict()
    head = _head_prefix(model)
    wrong_shape = [k for k in own if k in state and state[k].shape != own[k].shape]
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    skipped = []
    if allow_new_head and head:
        skipped = [k for k in wrong_shape if k.startswith(head)]
        wrong_shape = [k for k in wrong_shape if k not in skipped]
    if wrong_shape or missing or unexpected:
        classes = [tuple(state[k].shape)[0] for k in state if head and k.startswith(head) and k.endswith("weight")]
        theirs = f" (its head has {classes[0]} outputs)" if classes else ""
        ours = getattr(model.get_classifier(), "out_features", "?") if hasattr(model, "get_classifier") else "?"
        detail = (wrong_shape and f"{len(wrong_shape)} tensor(s) of another shape, first {wrong_shape[0]}"
                  or missing and f"{len(missing)} missing, first {missing[0]}"
                  or f"{len(unexpected)} unexpected, first {unexpected[0]}")
        raise UserError(f"checkpoint {path}{theirs} does not fit model {model_name} with {ours} classes: {detail}")
    for key in skipped:
        state[key] = own[key]
    model.load_state_dict(state)
    if skipped:
        print(f"note: {path}: head of another class count skipped; {head.rstrip('.')} starts from random init")
    return model
