"""Train a classifier and write a run folder (runs/<name>): config.json, split.csv, best.pth,
last.pth, metrics.csv and TensorBoard events.

This file is the flags and the recipe. `main` reads top-down: check the flags
(maskcls/options.py), decide the device and precision (maskcls/runtime.py), read the data once
(maskcls/data.py), open the run folder (maskcls/runfolder.py), then train each split with
`train_fold` (maskcls/fit.py: `build_fold` makes the model, loaders, criterion, optimizer and
schedule from the flags, `fit` runs the epoch loop over maskcls/engine.py's training and
validation passes; the best macro-F1 epoch becomes best.pth). Plug-ins (model, loss,
augmentation, dataset) add their own flags where they are registered; nothing here names one.

Example:
    python train.py --epochs 10 --augmentation AlbuAugmentation --model imgInceptionV3 \\
        --criterion new_focal --lr 1e-4 --batch_size 16 --valid_batch_size 64 \\
        --dataset datasetSplitByClasses --optimizer Adam --cutmix True --resize 299,299
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import argparse
import os

import agecuts
from augmentation import AUGMENTATIONS, TTA_VIEWS
from cutmix import MODES as CUTMIX_MODES
from dataset import DATASETS
from facecrop import FACE_MARGIN
from loss import CRITERIONS
from maskcls import cli, shortcuts
from maskcls.data import TrainingData, open_image_cache, store_folder
from maskcls.fit import train_fold, train_kfold, train_seeds
from maskcls.optim import OPTIMIZERS, SCHEDULERS
from maskcls.options import TIMM_FLAGS, check_flags, warn_ignored_options
from maskcls.refit import train_refit
from maskcls.runfolder import open_run
from maskcls.runtime import Runtime, seed_everything
from model import AGE_HEADS, HEADS, MODELS, MSD_P, input_size_of

# The recipe: what a user who gives only data, model, input size and epochs gets (README "The
# default recipe" says why each, and bench.py's quality section measures it against timm's).
DEFAULT_OPTIMIZER = "adamw"     # Adam with decoupled weight decay: trains from scratch as well as Adam
DEFAULT_LR = 1e-3               # Adam-family's usual rate at batch 64
DEFAULT_WEIGHT_DECAY = 0.05     # decoupled, not on norm and bias (timm's param groups)
DEFAULT_SCHEDULER = "cosine"    # anneals to --min_lr over --epochs: the last epochs are the best-trained
DEFAULT_WARMUP_EPOCHS = 0       # none: Adam-family needs little, and short runs would spend their start on it
DEFAULT_BATCH = 64               # images per step, unless the run would make under 400 updates with it
MIN_UPDATES_PER_RUN = 400        # a short run on a small dataset gets smaller batches instead of a few hundred steps
MIN_DEFAULT_BATCH = 16           # ... but never under 16 images (batch norm's statistics), unless there are fewer
DEFAULT_SMOOTHING = 0.0         # off: it caps confidence, which --pseudo_threshold and TTA read

# what config.json records beside the flags: skipped when it is read back with --config / --resume
DERIVED_KEYS = ("input_size", "prepared_size", "num_classes", "classes", "mean", "std", "label_scheme", "tasks",
                "train_images", "val_images", "world_size", "fold_dirs", "seed_dirs", "precision_probe", "threads_probe",
                "refit_of", "refit_estimate")


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
    data.add_argument("--cache_dir", default="auto", metavar="DIR",
                      help="prepared images kept across runs and inference (auto: <data folder>/.prepared_cache; "
                           "none: off); --cache none turns it off too")
    data.add_argument("--seed", type=cli.number(int, 0), default=42, help="seeds the split, init, shuffling, augmentation")
    data.add_argument("--split_seed", type=cli.number(int, 0), default=None,
                      help="seeds the validation split and the folds alone (default: --seed): runs of other seeds "
                           "then hold out the same images, so runs.py diff can pair them")
    data.add_argument("--seeds", type=cli.parse_ints, default=None, metavar="S1,S2,...",
                      help="repeat the recipe once per seed into RUN/seed<S> and summarize the group (seeds.json; "
                           "runs.py compare shows it as mean +- sd)")
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
    model.add_argument("--gp", "--global_pool", default=None, metavar="POOL",
                       help="global pooling before the classifier (timm's): avg, max, avgmax, catavgmax; a ViT "
                            "takes token or map; default: the model's own (BaseModel: catavgmax)")
    cli.bool_flag(model, "--grad_checkpointing", help="recompute activations in backward: less memory, slower")
    cli.bool_flag(model, "--sync_bn", help="under torchrun on CUDA: batch norm statistics over every process")
    model.add_argument("--ema", "--model_ema_decay", type=cli.number(float, 0, 1, high_open=True), default=0.0,
                       metavar="DECAY",
                       help="keep an exponential moving average of the weights (e.g. 0.999); saved as best "
                            "when it scores at least as high (0: off)")
    cli.bool_flag(model, "--ema_bn_refresh",
                  help="--ema: before the average is scored, its BatchNorm statistics are recomputed over the "
                       "training images (a pass of forward steps each validated epoch, on a copy: the average "
                       "itself goes on); the refreshed copy is what best.pth gets")
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
    loss.add_argument("--aug_off_epoch", type=cli.number(int, 0), default=0,
                      help="from this epoch, training images get the validation transform: no augmentation (0: never)")
    loss.add_argument("--beta", type=cli.number(float, 0, low_open=True), default=1.0, help="lambda ~ Beta(beta, beta)")
    loss.add_argument("--cutmix_mode", choices=CUTMIX_MODES, default="box",
                      help="box, or vertical: a full-height strip (faces are centred)")
    loss.add_argument("--teacher", default=None, metavar="RUN",
                      help="knowledge distillation: a trained run (a k-fold run: its folds averaged) gives soft "
                           "targets on every training batch")
    loss.add_argument("--kd_weight", type=share, default=0.5, help="--teacher: the distillation term's share of the loss")
    loss.add_argument("--kd_temperature", type=cli.number(float, 0, low_open=True), default=4.0,
                      help="--teacher: the softmax temperature of teacher and student")
    loss.add_argument("--soft_oof", default=None, metavar="KFOLD_RUN",
                      help="train on the labels blended with a k-fold run's out-of-fold probabilities (oof.csv)")
    loss.add_argument("--soft_weight", type=share, default=0.3, help="--soft_oof: the out-of-fold targets' share")
    loss.add_argument("--val_tta", default="none", metavar="VIEWS",
                      help=f"test-time augmentation for validation, e.g. hflip,zoom (scale<f> for f in 0.5-2, "
                           f"scale<f>_hflip, or {TTA_VIEWS.help()})")
    CRITERIONS.add_arguments(loss)
    AUGMENTATIONS.add_arguments(loss)


def add_optimizer_flags(optim):
    optim.add_argument("--epochs", type=cli.positive_int, default=10, help="epochs to train")
    optim.add_argument("--batch_size", "-b", type=cli.positive_int_or("auto"), default=None,
                       help=f"training images per step (per process under torchrun); auto: the largest power of two "
                            f"that fits on the GPU; default: {DEFAULT_BATCH}, or less (at least {MIN_DEFAULT_BATCH}) where "
                            f"--epochs would make under {MIN_UPDATES_PER_RUN} updates with it")
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
    optim.add_argument("--backbone_lr_ratio", type=cli.number(float, 1), default=1.0,
                       help="the backbone learns at --lr / this (the head at --lr): fastai's discriminative rates")


def add_schedule_flags(sched):
    sched.add_argument("--scheduler", "--sched", default=DEFAULT_SCHEDULER,
                       help=f"learning-rate schedule, timm's: {SCHEDULERS.help()} (none: constant after warmup)")
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
    sched.add_argument("--cycle_limit", type=cli.positive_int, default=1,
                       help="cosine, tanh: cycles in the run (warm restarts; timm's cycle_limit)")
    sched.add_argument("--cycle_mul", type=cli.number(float, 0, low_open=True), default=1.0,
                       help="cosine, tanh: each cycle this many times as long as the one before")
    sched.add_argument("--cycle_decay", type=cli.number(float, 0, 1, low_open=True), default=1.0,
                       help="cosine, tanh: each cycle's peak rate this share of the one before")
    sched.add_argument("--patience_epochs", type=cli.number(int, 0), default=10,
                       help="plateau: epochs without a better val F1 before a decay")
    sched.add_argument("--patience", type=cli.number(int, 0), default=0,
                       help="early stopping: stop after this many epochs without a better val F1 (0: never, so "
                            "an annealing schedule always runs to its end)")
    sched.add_argument("--select", choices=("auto", "best", "last"), default="auto",
                       help="the epoch best.pth keeps (inference, k-fold OOF, --refit's length): best = the highest "
                            "val macro F1 (a tie to the later epoch), last = the last epoch; auto: last, or best "
                            "with --patience (a stopped run's last epoch is past its best)")


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
    cli.bool_flag(optim, "--prefetcher", default=True,
                  help="timm's prefetcher: the loader workers hand over uint8 batches, normalized and flipped on "
                       "the device (the GPU, or the main process on a CPU)")


def add_output_flags(out):
    out.add_argument("--model_dir", default="runs", help="parent folder of run folders")
    out.add_argument("--name", "--experiment", default="exp", help="run folder name; exp2, exp3, ... when taken")
    out.add_argument("--checkpoint_hist", type=cli.number(int, 0), default=0, metavar="K",
                     help="keep the K best epochs' weights (top-<epoch>.pth)")
    cli.bool_flag(out, "--refit", help="then train once more on every training image (validation side included) for "
                                       "the best epoch count (k-fold: the folds' median) into RUN/refit; "
                                       "inference.py --checkpoint refit uses it")
    out.add_argument("--swa_start", type=cli.number(int, 0), default=0, metavar="E",
                     help="average the weights of every epoch from E on into swa.pth, BatchNorm recomputed (0: off)")
    out.add_argument("--swa_lr", type=cli.number(float, 0, low_open=True), default=None,
                     help="from --swa_start, torch's SWALR holds this rate (default: the run's schedule goes on)")
    out.add_argument("--swa_anneal_epochs", type=cli.number(int, 0), default=0,
                     help="epochs SWALR takes to reach --swa_lr (cosine; 0: at once)")
    out.add_argument("--average_top", type=cli.number(int, 0), default=0, metavar="K",
                     help="average the K best epochs' weights into averaged.pth (inference --checkpoint averaged.pth)")
    cli.bool_flag(out, "--smoke", help="run 2 training and 2 validation batches, write and read back a checkpoint, "
                                       "predict a few eval images, then stop; writes nothing")
    cli.bool_flag(out, "--dry_run", help="build everything, time a few steps, print the cost of an epoch and the "
                                         "run (time, memory, cache, updates); writes nothing")
    cli.bool_flag(out, "--lr_find", help="sweep the learning rate exponentially over a few hundred updates, plot the "
                                         "loss and suggest --lr; no run folder")
    cli.words_flag(out, "--lr_find_range", parse=cli.parse_floats, default=[1e-7, 10.0], metavar="MIN,MAX",
                   help="--lr_find: the rates swept")
    out.add_argument("--lr_find_steps", type=cli.number(int, 20), default=200, help="--lr_find: updates swept")
    out.add_argument("--lr_find_plot", default=os.path.join("output", "lr_find.png"), metavar="PNG",
                     help="--lr_find: where to draw the loss against the rate")
    out.add_argument("--overfit_batches", type=cli.number(int, 0), default=0, metavar="N",
                     help="train on the same N batches every epoch, without augmentation or mixing, validated on "
                          "themselves: shows the model can learn at all (0: off)")
    out.add_argument("--wandb", default=None, metavar="PROJECT",
                     help="also log to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works)")


# ---------------------------------------------------------------- the recipe
def main(args, monitor=None):
    """Check the flags, read the data, open the run folder, train each split (or fold), finish.
    `monitor(step, val_f1)` hears every validated epoch (tune.py: pruning)."""
    cli.stop_on_sigterm()  # a scheduler's or torchrun's SIGTERM stops a run as Ctrl-C does
    args = check_flags(args)
    runtime = Runtime.start(args.device, "fp32" if args.amp is False else args.precision, args.channels_last,
                            args.resize or input_size_of(args.model), args.model,
                            args.batch_size if isinstance(args.batch_size, int) else DEFAULT_BATCH)
    try:
        return run_training(args, runtime, monitor)
    finally:
        runtime.close()


def run_training(args, runtime, monitor=None):
    if args.seeds:
        return train_seeds(args, runtime, run_training)
    context = runtime.context
    seed_everything(args.seed)
    data = TrainingData.load(args, runtime.input_size, context)
    if args.sync_bn and context.enabled and runtime.device.type != "cuda":
        raise cli.UserError("--sync_bn needs CUDA (NCCL); on the CPU, batch norms stay per process")
    splits = data.splits(args.kfold)
    args = resolved(args, data, splits, runtime)
    if args.overfit_batches:  # the same images every epoch, and validated on them
        train_idx = splits[0][0][:args.overfit_batches * args.batch_size]
        splits = [(train_idx, train_idx)]
    if args.smoke or args.dry_run or args.lr_find:  # no run folder
        return shortcuts.run(args, data, splits[0], runtime)
    store = store_folder(args.cache_dir, data.source.root)
    with open_run(args.model_dir, args.name, args.resume, args.epochs, context) as run_dir, \
            open_image_cache(data, args.cache, run_dir, store, announce=context.is_main) as cache:
        if args.kfold:
            train_kfold(args, data, splits, run_dir, runtime, cache, monitor)
        else:
            train_fold(args, data, splits[0], run_dir, runtime, cache, resume=bool(args.resume), monitor=monitor)
        if args.age_head == "regression" and context.is_main:
            agecuts.fit_trained_run(run_dir)
        if args.refit:
            train_refit(args, data, splits, run_dir, runtime, cache)
    return run_dir


def resolved(args, data, splits, runtime):
    """The options as the run uses them, what config.json records: the data's training pipeline,
    a batch size, --hflip 0 where the mirror check turned flips off, the epoch --select keeps.
    A copy: `args` stays as parsed."""
    batch = args.batch_size
    if batch in (None, "auto"):
        batch = default_batch_size(len(splits[0][0]) + len(data.extra), args.epochs, runtime.context.world_size)
    out = argparse.Namespace(**{**vars(args), "augmentation": data.augmentation, "batch_size": batch})
    if data.hflip is not None:  # the mirror check turned the pipeline's flip off
        out.hflip = data.hflip
    if args.select == "auto":
        out.select = "best" if args.patience else "last"
    if args.batch_size == "auto":
        out.batch_size = shortcuts.fitting_batch_size(out, data, splits[0], runtime, batch)
    return out


def default_batch_size(train_images, epochs, world_size=1):
    """DEFAULT_BATCH, or less where a run of `epochs` over `train_images` would make under
    MIN_UPDATES_PER_RUN updates with it, never under MIN_DEFAULT_BATCH images (nor more than the
    side holds). Measured (README, the default recipe): on 120 sample persons (672 training
    photos, 10 epochs) batches of 64 never learned the mask sub-task, batches of 21 learned it in
    3 of 3 seeds on easy data and 0 of 3 on `--difficulty real`, batches of 16 in 3 of 3 and 2 of
    3; 120 images (lfw_subset's training side) in batches of 64 gave one update an epoch. By the
    run, not the epoch: at 30 epochs on digits' 718 images batches of 16 scored higher than 64
    but took 1.3x the time (resnet18 at 32x32: small steps are overhead-bound on a CPU)."""
    per_process = max(1, train_images // world_size)
    batch = min(DEFAULT_BATCH, per_process, max(MIN_DEFAULT_BATCH, per_process * epochs // MIN_UPDATES_PER_RUN))
    if batch < DEFAULT_BATCH:
        updates = max(1, per_process // batch)
        print(f"batch size {batch}: {per_process} training images, {updates} update{'s' * (updates > 1)} an "
              f"epoch, {updates * epochs} in {epochs} epoch{'s' * (epochs > 1)} (--batch_size sets it)")
    return batch


if __name__ == "__main__":
    cli.run(main, get_args_parser)
