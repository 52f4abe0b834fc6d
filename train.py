"""Train a classifier and write a run folder (runs/<name>): config.json, split.csv, best.pth,
last.pth, metrics.csv and TensorBoard events.

The recipe reads top-down in `run_training`: check the flags, read the data (face crops, the
cache), make the run folder, then per split `train_fold`: `build_fold` (the one place the flags
become a model, loaders, criterion, optimizer and schedule), resume or start the run folder,
`fit` (the epoch loop over `train_one_epoch` + `evaluate`; the best macro-F1 epoch becomes
best.pth), the final figures. Plug-ins (model, loss, augmentation, dataset) add their own flags
where they are registered (registry.py); nothing here names one.

Example:
    python train.py --epochs 10 --augmentation AlbuAugmentation --model imgInceptionV3 \\
        --criterion new_focal --lr 1e-4 --batch_size 16 --valid_batch_size 64 \\
        --dataset datasetSplitByClasses --optimizer Adam --cutmix True --resize 299,299
"""
import copy
import csv
import dataclasses
import json
import math
import os
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pandas as pd
import timm.utils
import torch

import agecuts
import cli
import distributed
import plots
from atomic import replacing, write_json
from augmentation import (AUGMENTATIONS, KNOBS, TTA_VIEWS, auto_augment_policy, eval_transform, knobs_taken, parse_tta,
                          prepared_size, train_transform)
from cutmix import MODES as CUTMIX_MODES, BatchMixer
from dataset import DATASETS, class_counts, read_extra, read_pseudo_labels, write_split_csv
from engine import Step, evaluate, is_better, train_one_epoch, updates_per_epoch
from facecrop import FACE_MARGIN, face_regions
from heldout import AGE_COLUMNS, macro_f1, read_heldout
from images import EpochSampler, ImageDataset, cache_shape, load_image, make_loader, open_cache, shared_memory_free
from labels import TASKS, training_label
from loss import CRITERIONS, AgeRegressionLoss, MultiTaskLoss, build_criterion
from model import (AGE_HEADS, AGE_UNIT, HEADS, MODELS, MSD_P, build_from_config, check_model_name, compile_model,
                   input_size_of, load_weights, read_checkpoint, resolve_device, resolve_precision, save_checkpoint)
from optim import (LENGTH_SCHEDULES, OPTIMIZERS, SCHEDULERS, Freezer, SchedulerState, build_optimizer,
                   build_scheduler)
from readers import read_json
from runfolder import (PREVIEW_IMAGES, Checkpoint, RunLock, RunLog, TopCheckpoints, best_epoch_figures,
                       clear_leftovers, discard_unstarted, final_figures, make_run_dir, require_wandb, spread)

# The recipe: what a user who gives only data, model, input size and epochs gets (README "The
# default recipe" says why each, and bench.py's quality section measures it against timm's).
DEFAULT_OPTIMIZER = "adamw"     # Adam with decoupled weight decay: trains from scratch as well as Adam
DEFAULT_LR = 1e-3               # Adam-family's usual rate at batch 64
DEFAULT_WEIGHT_DECAY = 0.05     # decoupled, not on norm and bias (timm's param groups)
DEFAULT_SCHEDULER = "cosine"    # anneals to --min_lr over --epochs: the last epochs are the best-trained
DEFAULT_WARMUP_EPOCHS = 0       # none: Adam-family needs little, and short runs would spend their start on it
DEFAULT_BATCH = 64               # images per step, unless the training side has under 4 batches of it
MIN_UPDATES_PER_EPOCH = 4        # a small dataset gets smaller batches instead of 1-2 updates an epoch
DEFAULT_SMOOTHING = 0.0         # off: it caps confidence, which --pseudo_threshold and TTA read

FIGURE_REFRESH_SECONDS = 300  # best-epoch figures take ~2 s: redrawn on a new best at most every 5 minutes
# what config.json records beside the flags: skipped when it is read back with --config / --resume
DERIVED_KEYS = ("input_size", "prepared_size", "num_classes", "classes", "mean", "std", "label_scheme", "tasks",
                "train_images", "val_images", "world_size", "fold_dirs")


# ---------------------------------------------------------------- the flags
def get_args_parser():
    parser = cli.ArgumentParser(description="Train an image classifier into a run folder.",
                                epilog="Every flag also has a kebab-case spelling (--batch-size).",
                                derived_keys=DERIVED_KEYS, after_parse=warn_ignored_options, foreign=TIMM_FLAGS)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML/JSON of options (a run's config.json repeats that run); flags override it")
    parser.add_argument("--resume", default=None, metavar="RUN",
                        help="continue RUN from its last.pth, in the same folder, with its options")
    add_data_flags(parser.add_argument_group("Data"))
    add_model_flags(parser.add_argument_group("Model"))
    add_loss_flags(parser.add_argument_group("Loss and augmentation"))
    add_optimizer_flags(parser.add_argument_group("Optimization"))
    add_schedule_flags(parser.add_argument_group("Schedule"))
    add_runtime_flags(parser.add_argument_group("Precision and devices"))
    add_output_flags(parser.add_argument_group("Output"))
    return parser


def add_data_flags(data):
    data.add_argument("--data_dir", default=os.path.join("data", "train"),
                      help="training data: the competition layout (train.csv + images/) or a folder per class")
    data.add_argument("--dataset", default="datasetSplitByClasses", help=DATASETS.help())
    data.add_argument("--val_ratio", type=cli.number(float, 0, 1, high_open=True), default=0.2,
                      help="share of people (or images) held out; 0: no validation, train on everything (the "
                           "final retrain): the last epoch is the result")
    data.add_argument("--val_every", type=cli.positive_int, default=1, help="validate every N epochs (and the last)")
    cli.size_flag(data, "--resize", "--img_size", default=None,
                  help="input size, H,W or H W (one number: square); default: the model's own")
    data.add_argument("--num_workers", "--workers", "-j", type=cli.number(int, 0), default=min(4, os.cpu_count() or 1),
                      help="DataLoader worker processes (0: load in the main process)")
    data.add_argument("--cache", choices=("auto", "none", "ram", "disk"), default="auto",
                      help="keep decoded (face-cropped) images from the first epoch: in shared memory (ram), "
                           "or in a memory-mapped file in the run folder for data larger than RAM (disk); "
                           "auto: ram when it takes under half of the free shared memory, else none")
    data.add_argument("--seed", type=cli.number(int, 0), default=42, help="seeds the split, init, shuffling, augmentation")
    data.add_argument("--kfold", type=cli.number(int, 0), default=0, metavar="K",
                      help="train K models on person-grouped, class-stratified folds (0: one split)")
    data.add_argument("--folds", type=cli.parse_ints, default=None, metavar="I,J",
                      help="with --kfold: train only these folds (1-based), e.g. 1,3")
    cli.bool_flag(data, "--skip_bad_images", help="check every image first; leave out (and count) unreadable ones")
    cli.bool_flag(data, "--facecrop", help="crop to the MTCNN face box (cached on disk) in training and inference")
    data.add_argument("--face_margin", type=cli.number(float, 0, 2), default=FACE_MARGIN,
                      help="face box grown by this share of its size")
    data.add_argument("--sampler", choices=("none", "weighted"), default="none",
                      help="weighted: draw training images with inverse class frequency")
    data.add_argument("--age_bins", type=cli.parse_ints, default=None, metavar="A,B",
                      help="age band edges for TRAINING labels only (e.g. 30,58); metrics keep 30,60")
    data.add_argument("--extra_data", action="append", default=None, metavar="DIR",
                      help="more training images (same layout, or folders 0..17); training side only")
    data.add_argument("--relabel", default=None, metavar="CSV", help="label fixes applied when the data is read")
    data.add_argument("--pseudo_labels", default=None, metavar="PROBS_CSV",
                      help="eval probabilities (inference.py --save_probs): confident images join training")
    data.add_argument("--pseudo_threshold", type=cli.ratio, default=0.9, help="top probability needed")
    cli.bool_flag(data, "--pseudo_soft", help="train on the pseudo-labels' probabilities (a label drawn from them "
                                              "each epoch) instead of their argmax")
    data.add_argument("--pseudo_data_dir", default=os.path.join("data", "eval"),
                      help="the eval folder the pseudo-label ImageIDs refer to")
    DATASETS.add_arguments(data)


def add_model_flags(model):
    rate = cli.number(float, 0, 1, high_open=True)
    model.add_argument("--model", default="BaseModel", help=f"{MODELS.help()}, or any timm model name")
    cli.bool_flag(model, "--pretrained", help="start from timm's pretrained weights (needs network)")
    model.add_argument("--weights", "--initial_checkpoint", default=None, metavar="PATH",
                       help="start from a local state dict / timm checkpoint / .safetensors")
    model.add_argument("--head", choices=HEADS, default="linear",
                       help="multitask: mask/gender/age heads combined into the 18 classes")
    model.add_argument("--task_weights", type=cli.parse_floats, default=None, metavar="M,G,A",
                       help="multitask: loss weight per head (default 1,1,1)")
    model.add_argument("--age_head", choices=AGE_HEADS, default="none",
                       help="regression: also regress the age in years; the age band comes from it and cut "
                            "points fitted on held-out predictions (age_cuts.json)")
    model.add_argument("--age_weight", type=cli.number(float, 0), default=1.0,
                       help="age_head regression: loss weight of the age (smooth L1 in 10-year units)")
    model.add_argument("--msd", type=cli.number(int, 0), default=0, metavar="N",
                       help="multi-sample dropout: N samples (0: off)")
    model.add_argument("--msd_p", type=rate, default=MSD_P, help="multi-sample dropout rate")
    model.add_argument("--drop", type=rate, default=None, help="dropout before the classifier (timm's drop_rate); "
                                                               "default: the model's own")
    model.add_argument("--drop_path", type=rate, default=None, help="stochastic depth (timm's drop_path_rate); "
                                                                    "default: the model's own")
    cli.bool_flag(model, "--grad_checkpointing", help="recompute activations in backward: less memory, slower")
    cli.bool_flag(model, "--sync_bn", help="under torchrun on CUDA: batch norm statistics over every process")
    model.add_argument("--ema", "--model_ema_decay", type=cli.number(float, 0, 1, high_open=True), default=0.0,
                       metavar="DECAY",
                       help="keep an exponential moving average of the weights (e.g. 0.999); saved as best "
                            "when it scores at least as high (0: off)")
    MODELS.add_arguments(model)


def add_loss_flags(loss):
    share, positive = cli.number(float, 0, 1), cli.number(float, 0)
    loss.add_argument("--criterion", default="cross_entropy", help=CRITERIONS.help())
    loss.add_argument("--smoothing", type=cli.number(float, 0, 1, high_open=True), default=DEFAULT_SMOOTHING,
                      help="label smoothing on top of any criterion (also under mixing)")
    loss.add_argument("--augmentation", default=None, help=f"{AUGMENTATIONS.help()}; default: AlbuAugmentation "
                                                           f"for the competition layout, TimmAugmentation otherwise")
    loss.add_argument("--aa", default=None, metavar="POLICY", help="timm's auto-augment: rand-m9-mstd0.5 (RandAugment), "
                                                                   "augmix-m5-w4-d2, original, trivial")
    loss.add_argument("--reprob", type=share, default=0.0, help="random erasing probability")
    loss.add_argument("--hflip", type=share, default=None, help="horizontal flip probability; default: the pipeline's own")
    loss.add_argument("--vflip", type=share, default=None, help="vertical flip probability; default: the pipeline's own")
    cli.words_flag(loss, "--scale", parse=cli.parse_floats, default=None, metavar="MIN,MAX",
                   help="random resized crop: area range; default: the pipeline's own (timm's 0.08,1)")
    cli.words_flag(loss, "--ratio", parse=cli.parse_floats, default=None, metavar="MIN,MAX",
                   help="random resized crop: aspect range; default: the pipeline's own (timm's 0.75,1.33)")
    loss.add_argument("--color_jitter", type=positive, default=None,
                      help="brightness/contrast(/saturation) jitter; default: the pipeline's own")
    cli.bool_flag(loss, "--cutmix", alpha="--cutmix_alpha",
                  help="CutMix on training batches (lambda ~ Beta(beta, beta))")
    cli.bool_flag(loss, "--mixup", alpha="--mixup_alpha",
                  help="MixUp on training batches (with --cutmix: one of the two per batch)")
    loss.add_argument("--cutmix_alpha", type=positive, default=None, help="CutMix's Beta alpha (> 0 turns it on)")
    loss.add_argument("--mixup_alpha", type=positive, default=None, help="MixUp's Beta alpha (> 0 turns it on)")
    loss.add_argument("--cutmix_prob", "--mixup_prob", type=share, default=0.5, help="share of batches mixed")
    loss.add_argument("--mix_switch_prob", "--mixup_switch_prob", type=share, default=0.5,
                      help="both on: chance a mixed batch uses CutMix")
    loss.add_argument("--mix_off_epoch", "--mixup_off_epoch", type=cli.number(int, 0), default=0,
                      help="stop mixing from this epoch (0: never)")
    loss.add_argument("--beta", type=cli.number(float, 0, low_open=True), default=1.0, help="lambda ~ Beta(beta, beta)")
    loss.add_argument("--cutmix_mode", choices=CUTMIX_MODES, default="box",
                      help="box, or vertical: a full-height strip (faces are centred)")
    loss.add_argument("--val_tta", default="none", metavar="VIEWS",
                      help=f"test-time augmentation for validation, e.g. hflip,zoom ({TTA_VIEWS.help()})")
    CRITERIONS.add_arguments(loss)
    AUGMENTATIONS.add_arguments(loss)


def add_optimizer_flags(optim):
    optim.add_argument("--epochs", type=cli.positive_int, default=10, help="epochs to train")
    optim.add_argument("--batch_size", "-b", type=cli.positive_int, default=None,
                       help=f"training images per step (per process under torchrun); default: {DEFAULT_BATCH}, or "
                            f"1/{MIN_UPDATES_PER_EPOCH} of the training images when that is fewer")
    optim.add_argument("--valid_batch_size", type=cli.positive_int, default=128, help="validation images per batch")
    optim.add_argument("--grad_accum_steps", type=cli.positive_int, default=1, help="batches per optimizer update")
    optim.add_argument("--optimizer", "--opt", default=DEFAULT_OPTIMIZER, help="timm's: " + OPTIMIZERS.help())
    optim.add_argument("--lr", type=cli.number(float, 0, low_open=True), default=DEFAULT_LR, help="learning rate")
    optim.add_argument("--weight_decay", type=cli.number(float, 0), default=DEFAULT_WEIGHT_DECAY,
                       help="weight decay (not on norm and bias parameters)")
    optim.add_argument("--momentum", type=cli.number(float, 0, 1), default=0.9, help="SGD-family momentum")
    cli.words_flag(optim, "--opt_betas", parse=cli.parse_floats, default=None, metavar="B1,B2",
                   help="Adam-family betas, each in [0, 1)")
    optim.add_argument("--opt_eps", type=cli.number(float, 0, low_open=True), default=None, help="optimizer epsilon")
    optim.add_argument("--opt_kwargs", type=cli.parse_kwargs, default=None, metavar="K=V,...",
                       help="more optimizer arguments, e.g. nesterov=False")
    optim.add_argument("--layer_decay", type=cli.number(float, 0, 1, low_open=True), default=None,
                       help="layer-wise lr decay: each layer's lr is this times the next one's (timm)")
    optim.add_argument("--clip_grad", type=cli.number(float, 0, low_open=True), default=None,
                       help="clip gradients to this (off unless given)")
    optim.add_argument("--clip_mode", choices=("norm", "value", "agc"), default="norm", help="how --clip_grad clips")
    optim.add_argument("--freeze_epochs", type=cli.number(int, 0), default=0,
                       help="train only the head for the first N epochs")


def add_schedule_flags(sched):
    sched.add_argument("--scheduler", "--sched", choices=SCHEDULERS, default=DEFAULT_SCHEDULER,
                       help="timm's learning-rate schedule (none: constant after warmup)")
    sched.add_argument("--warmup_epochs", type=cli.number(int, 0), default=DEFAULT_WARMUP_EPOCHS,
                       help="linear warmup from --warmup_lr")
    sched.add_argument("--warmup_lr", type=cli.number(float, 0), default=1e-5, help="learning rate warmup starts at")
    sched.add_argument("--min_lr", type=cli.number(float, 0), default=0.0, help="floor of the decaying schedules")
    cli.bool_flag(sched, "--sched_on_updates", help="step the schedule after every update, not every epoch")
    sched.add_argument("--lr_decay_step", "--decay_epochs", type=cli.number(float, 0, low_open=True), default=20,
                       help="step: epochs between decays")
    cli.words_flag(sched, "--decay_milestones", parse=cli.parse_ints, default=[30, 60], metavar="E1,E2",
                   help="multistep: the epochs (counting from 1) that start at the lower rate")
    sched.add_argument("--gamma", "--decay_rate", type=cli.number(float, 0, low_open=True), default=0.5,
                       help="step, multistep, plateau: lr multiplier at each decay")
    sched.add_argument("--patience_epochs", type=cli.number(int, 0), default=10,
                       help="plateau: epochs without a better val F1 before a decay")
    sched.add_argument("--patience", type=cli.number(int, 0), default=0,
                       help="early stopping: stop after this many epochs without a better val F1 (0: never, so "
                            "an annealing schedule always runs to its end)")


def add_runtime_flags(optim):
    optim.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="auto: bf16 autocast where the CPU/GPU has native bf16, fp16 on older GPUs, else fp32")
    cli.bool_flag(optim, "--channels_last", default=None,
                  help="NHWC memory format (default: on with bf16/fp16)")
    cli.bool_flag(optim, "--amp", default=None, help="the seed's flag: True = --precision auto, False = fp32")
    cli.bool_flag(optim, "--compile", help="torch.compile the training step: the first steps take a minute or "
                                           "more to compile, later ones run faster (see README, Performance)")
    optim.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                       help="auto: CUDA where there is a GPU")


def add_output_flags(out):
    out.add_argument("--model_dir", default="runs", help="parent folder of run folders")
    out.add_argument("--name", "--experiment", default="exp", help="run folder name; exp2, exp3, ... when taken")
    out.add_argument("--checkpoint_hist", type=cli.number(int, 0), default=0, metavar="K",
                     help="keep the K best epochs' weights (top-<epoch>.pth)")
    out.add_argument("--average_top", type=cli.number(int, 0), default=0, metavar="K",
                     help="average the K best epochs' weights into averaged.pth (inference --checkpoint averaged.pth)")
    out.add_argument("--wandb", default=None, metavar="PROJECT",
                     help="also log to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works)")


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
    if args.augmentation in AUGMENTATIONS:
        for knob in sorted(set(KNOBS) & given - set(knobs_taken(args.augmentation))):
            print(f"warning: --{knob} is ignored: --augmentation {args.augmentation} does not take it",
                  file=sys.stderr)


# ---------------------------------------------------------------- set-up helpers
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def optimizer_for(args, model):
    """--optimizer with its arguments, over `model` (timm's param groups)."""
    return build_optimizer(args.optimizer, model, args.lr, args.weight_decay, args.momentum, args.opt_betas,
                           args.opt_eps, args.layer_decay, args.opt_kwargs)


def scheduler_for(args, optimizer, per_epoch):
    """--scheduler with its arguments (timm's create_scheduler_v2)."""
    return build_scheduler(optimizer, args.scheduler, args.epochs, per_epoch, args.sched_on_updates,
                           args.warmup_epochs, args.warmup_lr, args.min_lr, args.lr_decay_step, args.decay_milestones,
                           args.gamma, args.patience_epochs)


# ---------------------------------------------------------------- data
@dataclasses.dataclass
class TrainingData:
    """What every fold trains on."""
    source: object   # the dataset entry: samples, classes, mean/std, split()/folds()
    extra: list      # Samples with full paths for the training side only (--extra_data, --pseudo_labels)
    regions: dict    # full image path -> face crop region (--facecrop), else empty
    cache: object = None  # an images.ImageCache over every image (--cache), shared by all folds
    prepared: tuple = None  # (H, W) images are prepared to (augmentation.prepared_size) and cached at
    train_prepared: tuple = None  # the same for the training side; None: its pipeline gets full photos
    slots: dict = dataclasses.field(default_factory=dict)  # full image path -> its cache slot

    def all_paths(self):
        """Every image the folds use: the data folder's, then the extra training images."""
        return self.source.all_paths() + [s.path for s in self.extra]

    def dataset(self, paths, labels, transform, prepare_to, soft=None, ages=None):
        """An ImageDataset over `paths` with this data's face crops and cache. prepare_to None: the
        transform gets full-size photos (a pipeline that does not resize first), never cached."""
        regions = [self.regions[p] for p in paths] if self.regions else None
        cache = self.cache if prepare_to is not None else None
        slots = [self.slots[p] for p in paths] if cache is not None else None
        return ImageDataset(paths, labels, transform, prepare_to=prepare_to, regions=regions, cache=cache,
                            cache_slots=slots, soft=soft, ages=ages)


def drop_unreadable(source, extra):
    """--skip_bad_images: decode every image once (small) and leave out, and count, those that fail."""
    def readable(path):
        try:
            load_image(path, min_size=(32, 32))
            return True
        except cli.UserError:
            return False
    paths = source.all_paths() + [s.path for s in extra]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        ok = dict(zip(paths, pool.map(readable, paths)))
    bad = [p for p in paths if not ok[p]]
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), first: {bad[0]}")
    source.samples = [s for s, p in zip(source.samples, paths) if ok[p]]
    return [s for s in extra if ok[s.path]]


def read_source(args):
    """The dataset entry over --data_dir, checked against the flags that need the competition layout."""
    source = DATASETS.build(args.dataset, args.data_dir, val_ratio=args.val_ratio, seed=args.seed,
                            relabel=args.relabel, **DATASETS.values_for(args.dataset, vars(args)))
    if args.relabel and source.label_scheme != "mask":
        raise cli.UserError("--relabel applies to the competition layout only")
    if source.label_scheme != "mask":
        for flag, value in (("--head multitask", args.head == "multitask"), ("--age_bins", args.age_bins),
                            ("--age_head regression", args.age_head == "regression"),
                            ("--extra_data", args.extra_data), ("--pseudo_labels", args.pseudo_labels)):
            if value:
                raise cli.UserError(f"{flag} needs the competition's 18-class layout, not {args.dataset}")
    return source


def load_training_data(args, context=distributed.Context()):
    """The data folder, the extra training images, and their face crops (--facecrop)."""
    source = read_source(args)
    groups = [(source.root, source.all_paths())]  # (folder, its image paths)
    extra = []
    for folder in args.extra_data or []:
        found = read_extra(folder)
        print(f"extra data: {len(found)} training images from {folder}")
        extra += found
        groups.append((folder, [s.path for s in found]))
    if args.pseudo_labels:
        pseudo = read_pseudo_labels(args.pseudo_labels, args.pseudo_data_dir, args.pseudo_threshold, source.classes,
                                    soft=args.pseudo_soft)
        soft = ", soft (each epoch a label drawn from an image's probabilities)" if args.pseudo_soft else ""
        print(f"pseudo labels: {len(pseudo)} eval images at top probability >= {args.pseudo_threshold}{soft}")
        extra += pseudo
        groups.append((args.pseudo_data_dir, [s.path for s in pseudo]))
    if args.skip_bad_images:
        extra = drop_unreadable(source, extra)
        kept = set(source.all_paths()) | {s.path for s in extra}
        groups = [(folder, [p for p in paths if p in kept]) for folder, paths in groups]
    regions = {}
    if args.facecrop:  # one face box cache per data folder, filled by rank 0 alone
        if not context.is_main:
            distributed.barrier(context)
        for folder, paths in groups:
            regions.update(zip(paths, face_regions(paths, folder, args.face_margin)))
        if context.is_main:
            distributed.barrier(context)
    return TrainingData(source, extra, regions)


def choose_prepared_sizes(data, args, resize, context=distributed.Context()):
    """What images are prepared to, for training (when its pipeline resizes first) and validation."""
    probe = train_transform(args.augmentation, resize, data.source.mean, data.source.std, vars(args))
    data.train_prepared = prepared_size(probe, resize)
    data.prepared = data.train_prepared or resize
    if data.train_prepared is None and context.is_main:
        print(f"note: --augmentation {args.augmentation} does not start with a resize: training gets full-size "
              f"photos, decoded every epoch (only validation images are prepared and cached)")


def attach_cache(data, kind, size, run_dir):
    """--cache: one ImageCache of prepared images (`size`, H x W) over every image the folds use
    (kind "auto": "ram" when it fits)."""
    paths = data.all_paths()
    if kind == "auto":
        # under torchrun every process on this machine holds its own cache
        need = int(np.prod(cache_shape(len(paths), size))) * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        free, where = shared_memory_free()
        if need > free / 2:
            print(f"cache: off (decoded images would take {need / 2**30:.1f} GiB, {where} has "
                  f"{free / 2**30:.1f} GiB free; --cache disk keeps them in a file)")
            return
        kind = "ram"
    data.slots = {p: i for i, p in enumerate(paths)}
    data.cache = open_cache(len(paths), size, kind, path=os.path.join(run_dir, f".image_cache{os.getpid()}.npy"))
    print(f"cache: {len(paths)} decoded images at {data.cache.shape[1]}x{data.cache.shape[2]} in {kind}")


def write_val_predictions(path, rows, labels, probs, classes, ages_pred=None):
    """val_predictions.csv of the best epoch: path, person, label, pred, (with an age head: the age
    and the regressed age) and one probability per class (what the mistakes grid, bias tuning, the
    label audit, agecuts.py and oof.csv read)."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "person", "label", "pred", *(AGE_COLUMNS if ages_pred is not None else ()),
                         *classes])
        for k, ((image, person, age), label, p) in enumerate(zip(rows, labels, probs)):
            regressed = () if ages_pred is None else (age, round(float(ages_pred[k]), 2))
            writer.writerow([image, person, int(label), int(p.argmax()), *regressed, *p.round(6)])


def write_oof(run_dir, source, fold_dirs):
    """oof.csv (one row per held-out image of the folds trained: its fold's prediction, from the
    fold's val_predictions.csv, read back checked) and kfold.json."""
    helds = [read_heldout(os.path.join(run_dir, fold_dir), refolded=False) for fold_dir in fold_dirs]
    frames = []
    for fold_dir, held in zip(fold_dirs, helds):
        ages = {} if held.ages_pred is None else {"age": held.ages, "age_pred": held.ages_pred}
        frame = pd.DataFrame({"path": held.paths, "person": held.persons, "fold": int(fold_dir[len("fold"):]),
                              "label": held.labels, "pred": held.preds, **ages})
        frames.append(pd.concat([frame, pd.DataFrame(held.probs, columns=held.classes)], axis=1))
    oof = pd.concat(frames).sort_values("path", kind="stable")
    with replacing(os.path.join(run_dir, "oof.csv")) as tmp:
        oof.to_csv(tmp, index=False)
    summary = {"oof_f1": macro_f1(oof["label"], oof["pred"], source.num_classes),
               "fold_f1": [macro_f1(h.labels, h.preds, source.num_classes) for h in helds],
               "fold_dirs": list(fold_dirs)}
    write_json(os.path.join(run_dir, "kfold.json"), summary)
    return summary


# ---------------------------------------------------------------- one fold: from the flags to its parts
@dataclasses.dataclass
class Side:
    """One side of a split: its images, labels, face crop regions (or None), transform and loader
    (None: no validation side, --val_ratio 0)."""
    paths: list
    labels: list
    regions: list
    transform: object
    dataset: ImageDataset
    loader: torch.utils.data.DataLoader
    rows: list = None  # (path as in split.csv, person) per image: val_predictions.csv


@dataclasses.dataclass
class Fold:
    """Everything one model's training uses, built from the flags by `build_fold`."""
    config: dict       # what config.json records
    net: torch.nn.Module          # the model itself: what is saved
    model: torch.nn.Module        # what validation runs (the DDP wrapper under torchrun)
    train_model: torch.nn.Module  # what the training step runs (compiled with --compile)
    step: Step
    sampler: EpochSampler
    train: Side
    val: Side
    views: list        # validation TTA
    device: torch.device

    @property
    def tasks(self):
        return self.config["tasks"]

    @property
    def validates(self):
        return bool(self.val.paths)

    def checkpoint_parts(self):
        """What last.pth holds besides the progress (its keys are the format of last.pth)."""
        step = self.step
        return {"model": self.net, "optimizer": step.optimizer, "scheduler": SchedulerState(step.scheduler),
                "scaler": step.scaler, "ema": step.ema.module if step.ema is not None else None,
                "mixer_rng": step.mixer}


def fold_config(args, data, train_count, val_count, resize, precision, context):
    """config.json: every resolved flag, plus what inference needs to rebuild the model."""
    source = data.source
    tasks = list(TASKS.values()) if source.label_scheme == "mask" else None
    return {**vars(args), "resume": None, "resize": list(resize), "input_size": list(resize),
            "prepared_size": list(data.prepared), "num_classes": source.num_classes, "classes": source.classes,
            "mean": list(source.mean), "std": list(source.std), "label_scheme": source.label_scheme, "tasks": tasks,
            "data_dir": source.root, "train_images": train_count, "val_images": val_count,
            "precision": precision.name, "channels_last": precision.channels_last, "world_size": context.world_size}


def build_sides(args, data, train_idx, val_idx, resize, device, context):
    """The training side (with --extra_data / --pseudo_labels and --age_bins labels) and the
    validation side, each with its own transform, sampler and loader; and the training sampler."""
    source = data.source
    train_samples = [source.samples[i] for i in train_idx] + data.extra
    train_paths = source.paths(train_idx) + [s.path for s in data.extra]
    train_labels = [training_label(s, args.age_bins) for s in train_samples]
    val_paths, val_labels = source.paths(val_idx), source.labels(val_idx)
    train_tf = train_transform(args.augmentation, resize, source.mean, source.std, vars(args))
    val_tf = eval_transform(resize, source.mean, source.std)
    train_set = data.dataset(train_paths, train_labels, train_tf, data.train_prepared,
                             soft=[s.soft for s in train_samples],
                             ages=[s.age for s in train_samples] if args.age_head == "regression" else None)
    val_set = data.dataset(val_paths, val_labels, val_tf, data.prepared)
    counts = class_counts(train_labels, source.num_classes)
    # --sampler weighted: each image drawn with weight 1/count of its class, so classes come up about equally
    draw_weights = [1.0 / counts[label] for label in train_labels] if args.sampler == "weighted" else None
    sampler = EpochSampler(len(train_set), args.seed, draw_weights, context.rank, context.world_size)
    val_sampler = torch.utils.data.DistributedSampler(val_set, shuffle=False) if context.enabled and val_paths else None
    # drop_last keeps BatchNorm and pairwise mixing away from a 1-image last batch
    train_loader = make_loader(train_set, args.batch_size, args.num_workers, device,
                               drop_last=len(sampler) > args.batch_size, sampler=sampler)
    val_loader = make_loader(val_set, args.valid_batch_size, args.num_workers, device, sampler=val_sampler) \
        if val_paths else None
    regions = {"train": [data.regions[p] for p in train_paths], "val": [data.regions[p] for p in val_paths]} \
        if data.regions else {"train": None, "val": None}
    train = Side(train_paths, train_labels, regions["train"], train_tf, train_set, train_loader)
    val_rows = [(source.samples[i].path, source.samples[i].person, source.samples[i].age) for i in val_idx]
    return train, Side(val_paths, val_labels, regions["val"], val_tf, val_set, val_loader, val_rows), sampler


def build_networks(args, config, device, precision, context, resume=False):
    """(net, model, train_model, ema): the model built from the run's config (model.build_from_config,
    as inference rebuilds it), its DDP wrapper under torchrun, the compiled training model and the EMA."""
    net = build_from_config(config, pretrained=args.pretrained and not resume)
    if args.weights and not resume:
        load_weights(net, args.weights, args.model, allow_new_head=True)
    if args.grad_checkpointing:
        if not hasattr(net, "set_grad_checkpointing"):
            raise cli.UserError(f"--grad_checkpointing: model {args.model} does not support it (timm models do)")
        net.set_grad_checkpointing(True)
    if args.sync_bn and context.enabled:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = precision.model(net.to(device))
    model = net
    if context.enabled:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    ema = timm.utils.ModelEmaV3(net, decay=args.ema) if args.ema else None
    # --compile: the training step only; validation runs the same weights eagerly, so switching to
    # eval mode and the last partial batch cost no recompilation
    train_model = compile_model(model, device) if args.compile else model
    return net, model, train_model, ema


def build_criterion_for(args, num_classes, tasks, counts, device):
    """--criterion with its own options and --smoothing; one per task with --head multitask."""
    options = {**CRITERIONS.values_for(args.criterion, vars(args)), "smoothing": args.smoothing}
    if args.head == "multitask":
        criterion = MultiTaskLoss(args.criterion, num_classes, tasks, args.task_weights, counts, **options)
    else:
        criterion = build_criterion(args.criterion, num_classes, class_counts=counts, **options)
    if args.age_head == "regression":
        criterion = AgeRegressionLoss(criterion, num_classes, args.age_weight, AGE_UNIT)
    return criterion.to(device)


def build_step(args, model, net, criterion, ema, precision, batches, context):
    """The optimisation step's parts: mixing, optimizer (head and backbone split for
    --freeze_epochs), schedule, accumulation and clipping."""
    mixer = BatchMixer(args.cutmix, args.mixup, prob=args.cutmix_prob, beta=args.beta, mode=args.cutmix_mode,
                       seed=args.seed + context.rank, cutmix_alpha=args.cutmix_alpha, mixup_alpha=args.mixup_alpha,
                       switch_prob=args.mix_switch_prob)
    optimizer = optimizer_for(args, net)
    freezer = Freezer(net, optimizer, args.freeze_epochs) if args.freeze_epochs else None
    per_epoch = updates_per_epoch(batches, args.grad_accum_steps)
    scheduler = scheduler_for(args, optimizer, per_epoch)
    return Step(criterion, optimizer, precision.scaler(), precision, mixer, ema, accum=args.grad_accum_steps,
                clip=args.clip_grad, clip_mode=args.clip_mode, scheduler=scheduler, on_updates=args.sched_on_updates,
                freezer=freezer)


def build_fold(args, data, train_idx, val_idx, device, precision, resize, context=distributed.Context(),
               resume=False):
    """The one place the flags become one fold's parts: model, sides, criterion, mixing,
    optimizer, schedule."""
    seed_everything(args.seed)
    config = fold_config(args, data, len(train_idx) + len(data.extra), len(val_idx), resize, precision, context)
    net, model, train_model, ema = build_networks(args, config, device, precision, context, resume)
    train, val, sampler = build_sides(args, data, train_idx, val_idx, resize, device, context)
    counts = class_counts(train.labels, config["num_classes"])
    criterion = build_criterion_for(args, config["num_classes"], config["tasks"], counts, device)
    step = build_step(args, model, net, criterion, ema, precision, len(train.loader), context)
    return Fold(config, net, model, train_model, step, sampler, train, val, parse_tta(args.val_tta), device)


# ---------------------------------------------------------------- one fold: the run folder and the loop
def start_run_folder(fold, data, train_idx, val_idx, checkpoint, state, args, run_dir, resume):
    """Rank 0, a new run: config.json, split.csv, a first last.pth (so that even an interrupted
    first epoch can be resumed) and the augmentation preview. Returns the RunLog."""
    if not resume:
        write_json(os.path.join(run_dir, "config.json"), fold.config)
        write_split_csv(os.path.join(run_dir, "split.csv"), data.source, train_idx, val_idx, data.extra)
        checkpoint.save_last(state)
    log = RunLog(run_dir, args.epochs, state["epoch"] if resume else None, args.wandb, fold.config)
    if not resume:
        train, mixer, source = fold.train, fold.step.mixer, data.source
        pick = spread(len(train.paths), PREVIEW_IMAGES)
        log.figure("aug_preview", plots.aug_preview_png(
            run_dir, [train.paths[i] for i in pick], train.transform, source.mean, source.std,
            mixer if mixer.enabled else None, n=len(pick), seed=args.seed,
            regions=[train.regions[i] for i in pick] if train.regions else None,
            prepare_to=train.dataset.prepare_to), 0)
    return log


NO_VALIDATION = {"val_loss": math.nan, "val_acc": math.nan, "val_f1": math.nan}


def validate(fold, model, context):
    step = fold.step
    return evaluate(model, fold.val.loader, step.criterion, fold.device, step.precision, fold.config["num_classes"],
                    fold.views, per_task=fold.tasks is not None, context=context)


def run_epoch(fold, epoch, epochs, validating, context):
    """Train one epoch and (when `validating`) validate, the EMA weights too; returns the metrics
    row, the winning validation output (None: not validated) and the weights that produced it."""
    step = fold.step
    if step.freezer is not None:
        step.freezer.set_epoch(epoch)
    step.mixer.active = not (fold.config["mix_off_epoch"] and epoch >= fold.config["mix_off_epoch"])
    step.updates = (epoch - 1) * updates_per_epoch(len(fold.train.loader), step.accum)  # the per-update clock
    row = {"epoch": epoch, "lr": max(group["lr"] for group in step.optimizer.param_groups)}
    fold.sampler.set_epoch(epoch)  # the order and augmentation of an epoch depend on (seed, epoch) alone
    row["train_loss"], row["train_acc"] = train_one_epoch(fold.train_model, fold.train.loader, step, fold.device,
                                                          f"epoch {epoch}/{epochs}", context)
    weights = step.ema.module if step.ema is not None and not fold.validates else fold.net
    val = validate(fold, fold.model, context) if validating else None
    row.update({k: v for k, v in (val or NO_VALIDATION).items() if k.startswith("val_")})
    if val is not None and step.ema is not None:  # the average competes with the raw weights for best.pth
        ema_val = validate(fold, step.ema.module, context)
        row.update(ema_val_loss=ema_val["val_loss"], ema_val_f1=ema_val["val_f1"])
        if is_better(ema_val, val):
            val, weights = ema_val, step.ema.module
    step.scheduler.step(epoch, val["val_f1"] if val is not None else None)  # the next epoch's lr
    return row, val, weights


@dataclasses.dataclass
class BestFigures:
    """The best epoch's figures (confusion matrices, mistakes), drawn on a new best at most every
    FIGURE_REFRESH_SECONDS (the first 5 minutes into the run: a short run draws them once), and
    once more at the end for the final best."""
    fold: Fold
    log: RunLog
    drawn_at: float = dataclasses.field(default_factory=time.time)  # the first refresh 5 minutes in
    drawn_epoch: int = 0

    def draw(self, output, epoch):
        val, classes = self.fold.val, self.fold.config["classes"]
        best_epoch_figures(self.log, output, val.paths, classes, epoch, val.regions, self.fold.tasks is not None)
        self.drawn_at, self.drawn_epoch = time.time(), epoch

    def maybe_draw(self, output, epoch):
        if time.time() - self.drawn_at > FIGURE_REFRESH_SECONDS:
            self.draw(output, epoch)


def record_best(fold, checkpoint, val, weights, state, run_dir):
    """Rank 0, a new best epoch: best.pth, val_predictions.csv, and the top-K checkpoints."""
    checkpoint.save_best(weights, state["best"])
    if val is not None:
        write_val_predictions(os.path.join(run_dir, "val_predictions.csv"), fold.val.rows, val["labels"].tolist(),
                              val["probs"], fold.config["classes"], val.get("ages"))


def fit(fold, state, checkpoint, log, args, run_dir, context, clock):
    """The epoch loop: train, validate (every --val_every epochs and the last), keep the best
    (best.pth; without validation, the last epoch), the top K (--checkpoint_hist), save last.pth,
    stop early (--patience). Updates `state` and returns the best epoch's validation output (None
    when no epoch improved on the resumed best)."""
    best_output, figures = None, BestFigures(fold, log) if context.is_main else None
    top = TopCheckpoints(run_dir, max(args.checkpoint_hist, args.average_top)) if context.is_main else None
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        tic = time.time()
        validating = fold.validates and (epoch % args.val_every == 0 or epoch == args.epochs)
        row, val, weights = run_epoch(fold, epoch, args.epochs, validating, context)
        is_best = not fold.validates or (val is not None and is_better(val, state["best"]))
        if is_best:
            scores = val or NO_VALIDATION
            state["best"] = {"val_f1": scores["val_f1"], "val_loss": scores["val_loss"], "val_acc": scores["val_acc"],
                             "epoch": epoch, "ema": weights is not fold.net}
            best_output = val
        if validating:
            state["bad_epochs"] = 0 if is_best else state["bad_epochs"] + args.val_every
        state["epoch"] = epoch
        if context.is_main:  # metrics row first: a crash after it is redone on --resume
            seconds = time.time() - tic
            log.epoch({**row, "seconds": seconds}, is_best, clock.tick(seconds))
            if is_best:
                record_best(fold, checkpoint, val, weights, state, run_dir)
            if val is not None:
                top.consider(epoch, val["val_f1"], weights)
            checkpoint.save_last(state)
            if is_best and val is not None:  # after last.pth: an interrupt while drawing (~2 s) loses no epoch
                figures.maybe_draw(val, epoch)
        if args.patience and validating and state["bad_epochs"] >= args.patience:
            print(f"early stop: no better val F1 for {state['bad_epochs']} epochs")
            break
    state["finished"] = True
    if context.is_main:
        checkpoint.save_last(state)
        if best_output is not None and figures.drawn_epoch != state["best"]["epoch"]:
            figures.draw(best_output, state["best"]["epoch"])
    return best_output


def fresh_state():
    return {"epoch": 0, "best": {"val_f1": -1.0, "val_loss": math.inf, "epoch": 0}, "bad_epochs": 0,
            "finished": False}


def train_fold(args, data, train_idx, val_idx, run_dir, device, precision, resize, context=distributed.Context(),
               resume=False, clock=None):
    """Train one model on one split into `run_dir` (or continue it: `resume`)."""
    fold = build_fold(args, data, train_idx, val_idx, device, precision, resize, context, resume)
    checkpoint = Checkpoint(run_dir, fold.checkpoint_parts(), args.model)
    state = fresh_state()
    if resume:
        state = {**state, **checkpoint.resume()}
        print(f"resuming {run_dir} after epoch {state['epoch']} (best {state['best']['val_f1']:.4f} at epoch "
              f"{state['best']['epoch']})")
    clock = clock or RunClock(args.epochs - state["epoch"])
    log = start_run_folder(fold, data, train_idx, val_idx, checkpoint, state, args, run_dir, resume) \
        if context.is_main else None
    print(f"run {run_dir}: {args.model} at {resize[0]}x{resize[1]}, {len(fold.train.paths)} train / "
          f"{len(fold.val.paths)} val images, {fold.config['num_classes']} classes, {device} {precision.name}"
          f"{' channels_last' if precision.channels_last else ''}", flush=True)
    if not fold.validates:
        print(f"no validation (--val_ratio 0): every epoch replaces best.pth, so it holds the last epoch's "
              f"{'EMA ' if args.ema else ''}weights; that is the result")
    started = time.time()
    try:
        fit(fold, state, checkpoint, log, args, run_dir, context, clock)
    except KeyboardInterrupt as err:  # Ctrl-C, or SIGTERM (cli.stop_on_sigterm)
        if context.is_main:
            how = "stopped by SIGTERM" if isinstance(err, cli.Stopped) else "interrupted"
            print(f"\n{how} in epoch {state['epoch'] + 1}: {checkpoint.last} holds epoch "
                  f"{checkpoint.saved_epoch}; continue with: python train.py --resume {args.resume or run_dir}",
                  flush=True)
            log.close()
        raise SystemExit(cli.interrupt_status(err)) from None
    if context.is_main:
        finish_run_folder(fold, checkpoint, log, args, run_dir, context)
    best = state["best"]
    print(f"done in {(time.time() - started) / 60:.1f} min: best epoch {best['epoch']} "
          f"val_f1 {best['val_f1']:.4f} val_acc {best.get('val_acc', 0):.3f} -> {checkpoint.best}")


def finish_run_folder(fold, checkpoint, log, args, run_dir, context):
    """--average_top's averaged.pth (scored on validation), the best weights back into the model,
    then curves.png and gradcam.png."""
    if args.average_top:
        average_best(fold, args.average_top, run_dir, context)
    if os.path.exists(checkpoint.best):
        load_weights(fold.net, checkpoint.best, fold.config["model"])
    val = fold.val
    if fold.validates:
        final_figures(log, fold.net, val.paths, val.labels, val.transform, fold.config["classes"], fold.device,
                      val.regions, val.dataset.prepare_to)
    else:
        final_figures(log, None, [], [], None, fold.config["classes"], fold.device)
    log.close()


def average_best(fold, k, run_dir, context):
    """averaged.pth: the mean of the K best epochs' weights (TopCheckpoints), scored on validation."""
    top = TopCheckpoints(run_dir, k)
    averaged = top.average(k)
    if averaged is None:
        print("average_top: no validated epoch to average")
        return
    state, epochs = averaged
    model = copy.deepcopy(fold.net)
    model.load_state_dict(state)
    scores = {}
    if fold.validates:
        result = validate(fold, model, distributed.Context())
        scores = {k: result[k] for k in ("val_f1", "val_loss", "val_acc")}
    save_checkpoint({"model": model.state_dict(), "epochs": epochs, **scores}, os.path.join(run_dir, "averaged.pth"))
    f1 = f" val_f1 {scores['val_f1']:.4f}" if scores else ""
    print(f"averaged.pth: the mean of epochs {', '.join(map(str, epochs))}{f1} "
          f"(python inference.py --checkpoint averaged.pth)")


# ---------------------------------------------------------------- main
def main(args):
    cli.stop_on_sigterm()  # a scheduler's or torchrun's SIGTERM stops a run as Ctrl-C does
    context, device = distributed.setup(args.device)
    try:
        return run_training(args, context, device or resolve_device(args.device))
    finally:
        distributed.teardown(context)


def check_flags(args):
    """Fail on a typo or an impossible value before any work, and before the run folder exists;
    names are taken in any case and recorded in their registered spelling."""
    for registry, dest in ((DATASETS, "dataset"), (CRITERIONS, "criterion"), (OPTIMIZERS, "optimizer")):
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
    if args.decay_milestones != sorted(set(args.decay_milestones)) or min(args.decay_milestones, default=1) < 1:
        raise cli.UserError(f"--decay_milestones {','.join(map(str, args.decay_milestones))}: epochs from 1 up, "
                            f"each once, in increasing order (e.g. 30,60)")
    if args.freeze_epochs and args.freeze_epochs >= args.epochs:
        raise cli.UserError(f"--freeze_epochs {args.freeze_epochs} with --epochs {args.epochs}: the backbone would "
                            f"never train; freeze fewer epochs than the run has")
    if args.kfold == 1:
        raise cli.UserError(f"--kfold needs K >= 2 (or 0 for one split), got {args.kfold}")
    if args.folds and (not args.kfold or not all(1 <= f <= args.kfold for f in args.folds)):
        raise cli.UserError(f"--folds {','.join(map(str, args.folds))}: fold numbers 1..K of --kfold K")
    if args.amp is False and args.precision not in ("auto", "fp32"):
        raise cli.UserError(f"--amp False asks for fp32, --precision {args.precision} for {args.precision}: "
                            f"give one of the two")
    if args.amp is True and args.precision == "fp32":
        raise cli.UserError("--amp True asks for mixed precision, --precision fp32 for none: give one of the two")
    if args.pseudo_soft and not args.pseudo_labels:
        raise cli.UserError("--pseudo_soft needs --pseudo_labels PROBS_CSV")
    if args.val_ratio == 0 and args.scheduler == "plateau":
        raise cli.UserError("--scheduler plateau follows val F1: it needs validation (--val_ratio > 0)")
    if args.wandb:
        require_wandb()
    probe = torch.nn.Linear(2, 2)
    scheduler_for(args, optimizer_for(args, probe), 1)  # the optimizer's and schedule's arguments
    if args.resume:
        check_resume(args)


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
    saved = read_options_of(args.resume)
    if not saved.get("kfold") and not os.path.isfile(os.path.join(args.resume, "last.pth")):
        raise cli.UserError(f"--resume {args.resume}: no last.pth to continue from")
    if saved.get("epochs") not in (None, args.epochs) and args.scheduler in LENGTH_SCHEDULES:
        raise cli.UserError(f"--resume {args.resume} --epochs {args.epochs}: its {args.scheduler} schedule spans "
                            f"{saved['epochs']} epochs and cannot be stretched; resume without --epochs, or "
                            f"start a new run")


def read_options_of(run_dir):
    return read_json(os.path.join(run_dir, "config.json"), "a run's options")


def record_new_length(run_dir, epochs):
    """--resume with another --epochs (a schedule that allows it): every config.json of the run
    (a k-fold run's folds too) says so."""
    for folder, _, files in os.walk(run_dir):
        if "config.json" not in files:
            continue
        config = read_options_of(folder)
        if config.get("epochs") != epochs:
            print(f"note: {folder} now runs to epoch {epochs} (was {config.get('epochs')}); config.json updated")
            write_json(os.path.join(folder, "config.json"), {**config, "epochs": epochs})


def open_run_dir(args, context):
    """The run folder, locked for this process (rank 0): --resume's, cleared of what a killed run
    left behind (temporary files, its image cache), or a new one."""
    if not context.is_main:
        return distributed.broadcast(context, None), None
    run_dir = args.resume or make_run_dir(args.model_dir, args.name)
    try:
        lock = RunLock(run_dir).acquire()
    except cli.UserError:
        if not args.resume:
            discard_unstarted(run_dir)
        raise
    if args.resume:
        removed = clear_leftovers(run_dir)
        if removed:
            print(f"removed {len(removed)} file(s) a killed run left in {run_dir}, first: {removed[0]}")
        record_new_length(run_dir, args.epochs)
    return distributed.broadcast(context, run_dir), lock


def run_training(args, context, device):
    """The recipe: check the flags, read the data, make (or reopen) the run folder, prepare and
    cache the images, train each split. A user error before an epoch finished in a new run
    folder removes the folder: nothing half-made is left, and the next run takes its name."""
    check_flags(args)
    resize = tuple(args.resize or input_size_of(args.model))
    precision = resolve_precision("fp32" if args.amp is False else args.precision, device, args.channels_last,
                                  resize)
    seed_everything(args.seed)
    data = load_training_data(args, context)
    if data.source.warning and context.is_main:
        print(f"warning: {data.source.warning}", file=sys.stderr)
    args.augmentation = args.augmentation or data.source.default_augmentation
    if args.sync_bn and context.enabled and device.type != "cuda":
        raise cli.UserError("--sync_bn needs CUDA (NCCL); on the CPU, batch norms stay per process")
    folds = data.source.folds(args.kfold) if args.kfold else [data.source.split()]
    if args.batch_size is None:
        args.batch_size = default_batch_size(len(folds[0][0]) + len(data.extra), context.world_size)
    run_dir, lock = open_run_dir(args, context)
    try:
        choose_prepared_sizes(data, args, resize, context)
        if args.cache != "none":
            attach_cache(data, args.cache, data.prepared, run_dir)
        try:
            if not args.kfold:
                train_fold(args, data, *folds[0], run_dir, device, precision, resize, context, bool(args.resume))
            else:
                train_kfold(args, data, folds, run_dir, device, precision, resize, context)
            if args.age_head == "regression" and context.is_main:
                fit_age_cuts(run_dir)
        finally:
            if data.cache is not None:
                data.cache.close()
    except Exception:  # a user error, a full disk...; not Ctrl-C (that run can be resumed)
        if not args.resume and context.is_main and discard_unstarted(run_dir):
            print(f"removed {run_dir}: no epoch had finished")
        raise
    finally:
        if lock is not None:
            lock.release()
    return run_dir


def fit_age_cuts(run_dir):
    """--age_head regression: the age cut points fitted on the run's held-out predictions (agecuts.py)."""
    if any(os.path.isfile(os.path.join(run_dir, name)) for name in ("oof.csv", "val_predictions.csv")):
        agecuts.fit_run(run_dir)
    else:
        print("age cut points: no held-out predictions (--val_ratio 0); inference uses 30, 60")


def default_batch_size(train_images, world_size=1):
    """DEFAULT_BATCH, or less on a small training side so that an epoch has at least
    MIN_UPDATES_PER_EPOCH updates: 120 images (lfw_subset's training side) in batches of 64
    gave one update an epoch, and 30 epochs trained 30 steps (test accuracy over 3 seeds: batch
    64 0.900, batch 32 0.933)."""
    per_process = max(1, train_images // world_size)
    batch = min(DEFAULT_BATCH, max(1, per_process // MIN_UPDATES_PER_EPOCH))
    if batch < DEFAULT_BATCH:
        print(f"batch size {batch}: {per_process} training images make at least {MIN_UPDATES_PER_EPOCH} updates "
              f"an epoch (--batch_size sets it)")
    return batch


def fold_status(fold_path):
    """('new', 'unfinished' or 'done', epochs done): where a run folder, or a fold of a k-fold run,
    stands (--resume)."""
    last = os.path.join(fold_path, "last.pth")
    if not os.path.isfile(last):
        return "new", 0
    saved = read_checkpoint(last)
    return ("done" if saved.get("finished") else "unfinished"), int(saved.get("epoch") or 0)


@dataclasses.dataclass
class RunClock:
    """The time left of the whole run (every fold of a k-fold run): the mean epoch so far times
    the epochs still to train. An upper bound with --patience."""
    epochs_left: int
    seconds: float = 0.0
    done: int = 0

    def tick(self, seconds):
        """One epoch finished, in `seconds`: returns the seconds left."""
        self.done, self.seconds, self.epochs_left = self.done + 1, self.seconds + seconds, self.epochs_left - 1
        return self.seconds / self.done * max(self.epochs_left, 0)


def train_kfold(args, data, folds, run_dir, device, precision, resize, context):
    """--kfold K: one run folder per fold (fold1..foldK, or the --folds chosen) under `run_dir`, then
    oof.csv and kfold.json. --resume of the parent skips finished folds and continues the rest."""
    chosen = args.folds or list(range(1, len(folds) + 1))
    fold_dirs = [f"fold{i}" for i in chosen]
    if context.is_main:
        write_json(os.path.join(run_dir, "config.json"), {**vars(args), "resume": None, "fold_dirs": fold_dirs,
                                                          "classes": data.source.classes})
    paths = [os.path.join(run_dir, fold_dir) for fold_dir in fold_dirs]
    progress = distributed.broadcast(context, [fold_status(p) for p in paths] if context.is_main else None)
    clock = RunClock(sum(args.epochs - done for status, done in progress if status != "done"))
    for number, fold_dir, path, (status, _) in zip(chosen, fold_dirs, paths, progress):
        if status == "done":
            print(f"--- {fold_dir} of {len(folds)}: finished earlier")
            continue
        if context.is_main and status == "new":
            os.makedirs(path, exist_ok=True)
        distributed.barrier(context)
        print(f"--- {fold_dir} of {len(folds)}{' (resumed)' if status == 'unfinished' else ''}")
        train_fold(args, data, *folds[number - 1], path, device, precision, resize, context,
                   resume=status == "unfinished", clock=clock)
    if context.is_main:
        summary = write_oof(run_dir, data.source, fold_dirs)
        print(f"k-fold: out-of-fold macro F1 {summary['oof_f1']:.4f}, per fold "
              f"{', '.join(f'{f:.4f}' for f in summary['fold_f1'])} -> {run_dir}")


if __name__ == "__main__":
    cli.run(main, get_args_parser)
