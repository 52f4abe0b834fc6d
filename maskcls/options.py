"""What train.py's flags mean beyond their types, checked before any work: registry names in
any case, combinations that cannot work, values a later step would trip on; timm's spellings of
the same options (`TIMM_FLAGS`); and a warning for a plug-in option the chosen entry ignores.

Example: python train.py --model-ema --input-size 3 224 224 --opt-betas 0.9 0.999
"""
import argparse
import os
import sys

import torch

from augmentation import AUGMENTATIONS, auto_augment_policy, parse_tta
from dataset import DATASETS
from loss import CRITERIONS
from maskcls import cli
from maskcls.fold import optimizer_for, scheduler_for
from maskcls.optim import OPTIMIZERS, SCHEDULERS, stretchable
from maskcls.readers import read_config
from maskcls.runfolder import require_wandb
from model import MODELS, check_model_name, legacy_pool


TIMM_EMA_DECAY = 0.9998  # timm's --model-ema-decay default


AMP_DTYPES = {"bfloat16": "bf16", "float16": "fp16"}  # timm's --amp-dtype -> --precision


def _timm_ema(words, argv):
    """timm's --model-ema: EMA at timm's decay, unless a decay is given too."""
    given = any(token.split("=", 1)[0] in ("--ema", "--model_ema_decay") for token in argv)
    return [] if given else ["--ema", str(TIMM_EMA_DECAY)]


def _timm_input_size(words, argv):
    if words[0] != "3":
        raise cli.UserError(f"--input-size {' '.join(words)}: images are read as RGB, so C is 3 (--resize H,W "
                            f"sets the rest)")
    return ["--resize", *words[1:]]


def _timm_amp_dtype(words, argv):
    if words[0] not in AMP_DTYPES:
        raise cli.UserError(f"--amp-dtype {words[0]}: expected bfloat16 or float16 (--precision bf16 or fp16)")
    return ["--precision", AMP_DTYPES[words[0]]]


# timm train.py flags without a twin of the same name here: translated where they mean the same,
# else refused with the flag to use (timm flags with a twin, --drop-path or --warmup-epochs, just work)
TIMM_FLAGS = {
    "model_ema": cli.Foreign(0, _timm_ema),
    "input_size": cli.Foreign(3, _timm_input_size),
    "torchcompile": cli.Foreign("?", lambda words, argv: ["--compile", "True"]),
    "amp_dtype": cli.Foreign(1, _timm_amp_dtype),
    "lr_base": cli.Foreign(1, hint="it scales the rate with the batch size (lr = lr_base x batch / 256); here "
                                   "give the rate itself: --lr"),
    "lr_base_size": cli.Foreign(1, hint="rates are not scaled with the batch size here: give --lr"),
    "lr_base_scale": cli.Foreign(1, hint="rates are not scaled with the batch size here: give --lr"),
    "num_classes": cli.Foreign(1, hint="the class count comes from the data (the competition's 18, or the class "
                                       "folders) and config.json records it: drop it"),
    "mixup_mode": cli.Foreign(1, hint="mixing is per batch here (timm's batch mode); --cutmix_alpha, "
                                      "--mixup_alpha and --cutmix_prob set it"),
    "bce_loss": cli.Foreign(0, hint="--criterion picks the loss (python train.py --help lists them)"),
    "crop_pct": cli.Foreign(1, hint="validation resizes the whole (face-cropped) image to --resize, no centre "
                                    "crop"),
}


PLUGIN_FLAGS = (("--criterion", "criterion", CRITERIONS), ("--model", "model", MODELS),
                ("--augmentation", "augmentation", AUGMENTATIONS), ("--dataset", "dataset", DATASETS))


def warn_ignored_options(args, given):
    """One line for a plug-in option typed on the command line that the chosen entry does not take
    (`--focal_gamma 3` with `--criterion cross_entropy`): it would change nothing."""
    for flag, dest, registry in PLUGIN_FLAGS:
        name = getattr(args, dest)
        if name not in registry:
            continue  # an unknown name fails later with its own message
        taken = registry.options(name)
        for option, (_, users) in registry.all_options().items():
            if option in given and option not in taken:
                print(f"warning: --{option} is ignored: {flag} {name} does not take it "
                      f"(it is for {', '.join(users)})", file=sys.stderr)


def check_flags(args):
    """Fail on a typo or an impossible value before any work, and before the run folder exists.
    Returns a copy of `args` with names (taken in any case) in their registered spelling, and
    what --overfit_batches implies."""
    args = argparse.Namespace(**vars(args))
    for registry, dest in ((DATASETS, "dataset"), (CRITERIONS, "criterion"), (OPTIMIZERS, "optimizer"),
                           (SCHEDULERS, "scheduler")):
        setattr(args, dest, registry.canonical(getattr(args, dest)))
    if args.augmentation is not None:
        args.augmentation = AUGMENTATIONS.canonical(args.augmentation)
    args.model = check_model_name(args.model)
    parse_tta(args.val_tta)
    if args.aa:
        auto_augment_policy(args.aa, (224, 224), (0.5, 0.5, 0.5))
    for flag, value in (("--scale", args.scale), ("--ratio", args.ratio), ("--opt_betas", args.opt_betas)):
        if value is not None and len(value) != 2:
            raise cli.UserError(f"{flag} takes two numbers, MIN,MAX, got {','.join(map(str, value))}")
    check_optimizer_flags(args)
    check_schedule_flags(args)
    check_run_modes(args)
    if args.amp is False and args.precision not in ("auto", "fp32"):
        raise cli.UserError(f"--amp False asks for fp32, --precision {args.precision} for {args.precision}: "
                            f"give one of the two")
    if args.amp is True and args.precision == "fp32":
        raise cli.UserError("--amp True asks for mixed precision, --precision fp32 for none: give one of the two")
    if args.pseudo_soft and not args.pseudo_labels:
        raise cli.UserError("--pseudo_soft needs --pseudo_labels PROBS_CSV")
    if args.wandb:
        require_wandb()
    if args.resume:
        check_resume(args)
    return args


def check_schedule_flags(args):
    """Milestones in order, a freeze shorter than the run, a plateau schedule with validation; the
    optimizer's and schedule's arguments tried on a probe (whether the model splits into layers
    for --layer_decay is known once it is built)."""
    if args.decay_milestones != sorted(set(args.decay_milestones)) or min(args.decay_milestones, default=1) < 1:
        raise cli.UserError(f"--decay_milestones {','.join(map(str, args.decay_milestones))}: epochs from 1 up, "
                            f"each once, in increasing order (e.g. 30,60)")
    if args.freeze_epochs and args.freeze_epochs >= args.epochs:
        raise cli.UserError(f"--freeze_epochs {args.freeze_epochs} with --epochs {args.epochs}: the backbone would "
                            f"never train; freeze fewer epochs than the run has")
    if args.aug_off_epoch > args.epochs:
        raise cli.UserError(f"--aug_off_epoch {args.aug_off_epoch} with --epochs {args.epochs}: it would never take "
                            f"effect; give an epoch of the run (or 0: never)")
    if args.swa_start and not args.freeze_epochs < args.swa_start <= args.epochs:
        raise cli.UserError(f"--swa_start {args.swa_start}: an epoch of the run (--epochs {args.epochs}) after the "
                            f"frozen ones (--freeze_epochs {args.freeze_epochs})")
    if args.ema_bn_refresh and not args.ema:
        raise cli.UserError("--ema_bn_refresh refreshes the EMA's BatchNorm statistics: give --ema DECAY too")
    if (args.swa_lr or args.swa_anneal_epochs) and not args.swa_start:
        raise cli.UserError("--swa_lr and --swa_anneal_epochs shape SWA: give --swa_start E too")
    cycles = (args.cycle_limit, args.cycle_mul, args.cycle_decay) != (1, 1.0, 1.0)
    if cycles and args.scheduler not in ("cosine", "tanh"):
        raise cli.UserError(f"--cycle_limit/--cycle_mul/--cycle_decay shape cosine or tanh restarts; "
                            f"--scheduler {args.scheduler} has no cycles")
    if args.val_ratio == 0 and args.scheduler == "plateau":
        raise cli.UserError("--scheduler plateau follows val F1: it needs validation (--val_ratio > 0)")
    probe = argparse.Namespace(**{**vars(args), "layer_decay": None})
    scheduler_for(probe, optimizer_for(probe, torch.nn.Linear(2, 2)), 1)


def check_run_modes(args):
    """What kind of run: folds, seeds, a shortcut, a teacher, out-of-fold targets, a fixed set of
    batches (which drops augmentation and mixing from `args`)."""
    if args.kfold == 1:
        raise cli.UserError(f"--kfold needs K >= 2 (or 0 for one split), got {args.kfold}")
    if args.folds and (not args.kfold or not all(1 <= f <= args.kfold for f in args.folds)):
        raise cli.UserError(f"--folds {','.join(map(str, args.folds))}: fold numbers 1..K of --kfold K")
    if args.seeds is not None and (not args.seeds or len(set(args.seeds)) != len(args.seeds) or min(args.seeds) < 0):
        raise cli.UserError(f"--seeds {','.join(map(str, args.seeds))}: distinct whole numbers >= 0, e.g. 0,1,2")
    shortcut = next((f for f in ("smoke", "dry_run", "lr_find") if getattr(args, f)), None)
    if shortcut and (args.resume or args.seeds):
        raise cli.UserError(f"--{shortcut} tries the run's parts without training it: not with --resume or --seeds")
    low, high = args.lr_find_range if len(args.lr_find_range) == 2 else (0, 0)
    if not 0 < low < high:
        raise cli.UserError(f"--lr_find_range {','.join(map(str, args.lr_find_range))}: MIN,MAX with 0 < MIN < MAX")
    if args.teacher:
        read_config(args.teacher)  # a run folder, checked
    if args.soft_oof:
        if args.age_head == "regression":
            raise cli.UserError("--soft_oof and --age_head regression both add to the training targets: give one")
        if not os.path.isfile(os.path.join(args.soft_oof, "oof.csv")):
            raise cli.UserError(f"--soft_oof {args.soft_oof}: no oof.csv; it takes a --kfold run's out-of-fold "
                                f"predictions")
    if args.refit:
        for reason, refused in (("it learns its epoch count from validation: give --val_ratio > 0",
                                 args.val_ratio == 0 and not args.kfold),
                                ("--scheduler plateau follows val F1, and the refit has none",
                                 args.scheduler == "plateau"),
                                ("--overfit_batches trains a fixed set of batches", args.overfit_batches)):
            if refused:
                raise cli.UserError(f"--refit: {reason}")
    if args.overfit_batches:
        if args.kfold or args.seeds:
            raise cli.UserError("--overfit_batches trains one fixed set of batches: not with --kfold or --seeds")
        # the same images every epoch, as they are: no augmentation, no mixing
        args.augmentation, args.aa, args.reprob = "BaseAugmentation", None, 0.0
        args.cutmix = args.mixup = False
        args.cutmix_alpha = args.mixup_alpha = None


OWN_FLAGS = {"lr": "--lr", "weight_decay": "--weight_decay", "momentum": "--momentum", "betas": "--opt_betas",
             "eps": "--opt_eps", "layer_decay": "--layer_decay"}  # optimizer keywords that have a flag


def check_optimizer_flags(args):
    """Betas in [0, 1); --opt_kwargs never sets what a flag sets (config.json would record the
    flag's value while the optimizer used the other)."""
    if args.opt_betas is not None and not all(0 <= b < 1 for b in args.opt_betas):
        raise cli.UserError(f"--opt_betas {','.join(f'{b:g}' for b in args.opt_betas)}: each beta is a decay "
                            f"rate in [0, 1) (Adam's are 0.9,0.999)")
    for key in sorted(set(args.opt_kwargs or {}) & set(OWN_FLAGS)):
        raise cli.UserError(f"--opt_kwargs {key}={args.opt_kwargs[key]}: {key} has its own flag, {OWN_FLAGS[key]} "
                            f"(config.json records that one); give it there")


def check_resume(args):
    """--resume RUN: a run with a last.pth, or a k-fold parent; a new --epochs only where the
    schedule does not depend on the length (a cosine schedule built for 25 epochs cannot become
    an 8-epoch one)."""
    saved = read_config(args.resume)
    if "select" not in saved and args.select == "auto":  # a run from before --select chose its best epoch
        args.select = "best"
    if "gp" not in saved and args.gp is None:  # a run from before --gp: the pool it was trained with
        args.gp = legacy_pool(saved.get("model"))
    if not (saved.get("kfold") or saved.get("seeds")) and not os.path.isfile(os.path.join(args.resume, "last.pth")):
        raise cli.UserError(f"--resume {args.resume}: no last.pth to continue from")
    if saved.get("epochs") not in (None, args.epochs) and not stretchable(args.scheduler):
        raise cli.UserError(f"--resume {args.resume} --epochs {args.epochs}: its {args.scheduler} schedule spans "
                            f"{saved['epochs']} epochs and cannot be stretched; resume without --epochs, or "
                            f"start a new run")

