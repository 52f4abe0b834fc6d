"""One model's training parts, built from the flags in one place (`build_fold`): the model (as
inference rebuilds it from config.json), its two sides with their own transforms, samplers and
loaders, the criterion, batch mixing, optimizer, schedule, accumulation and clipping.

Example: python train.py --kfold 5 --criterion new_focal --cutmix True --ema 0.999
"""
import dataclasses

import timm.utils
import torch

from augmentation import eval_transform, parse_tta, train_transform
from cutmix import BatchMixer
from dataset import class_counts
from loss import CRITERIONS, AgeRegressionLoss, MultiTaskLoss, SoftTargetLoss, build_criterion
from maskcls import cli
from maskcls.distill import Teacher, oof_targets
from maskcls.engine import Step, updates_per_epoch
from maskcls.images import EpochSampler, ImageDataset, device_loader, make_loader
from maskcls.labels import TASKS, training_label
from maskcls.optim import Freezer, SchedulerState, build_optimizer, build_scheduler
from maskcls.runtime import compile_model, seed_everything
from maskcls.swa import SWA
from model import AGE_UNIT, build_from_config, load_weights


def optimizer_for(args, model):
    """--optimizer with its arguments, over `model` (timm's param groups)."""
    return build_optimizer(args.optimizer, model, args.lr, args.weight_decay, args.momentum, args.opt_betas,
                           args.opt_eps, args.layer_decay, args.opt_kwargs)


def scheduler_for(args, optimizer, per_epoch):
    """--scheduler with its arguments (timm's create_scheduler_v2)."""
    return build_scheduler(optimizer, args.scheduler, args.epochs, per_epoch, args.sched_on_updates,
                           warmup_epochs=args.warmup_epochs, warmup_lr=args.warmup_lr, min_lr=args.min_lr,
                           decay_epochs=args.lr_decay_step, decay_milestones=args.decay_milestones,
                           decay_rate=args.gamma, patience_epochs=args.patience_epochs, cycle_limit=args.cycle_limit,
                           cycle_mul=args.cycle_mul, cycle_decay=args.cycle_decay)


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
    plain: object = None  # fn() -> the training loader with the validation transform (--aug_off_epoch)


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
    swa: SWA = None    # --swa_start: the weight average and its rate

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
                "mixer_rng": step.mixer, "swa": self.swa}


def fold_config(args, data, train_count, val_count, runtime):
    """config.json: every resolved flag, plus what inference needs to rebuild the model."""
    source, resize, precision = data.source, runtime.input_size, runtime.precision
    tasks = list(TASKS.values()) if source.label_scheme == "mask" else None
    return {**vars(args), "resume": None, "resize": list(resize), "input_size": list(resize),
            "prepared_size": list(data.prepared), "num_classes": source.num_classes, "classes": source.classes,
            "mean": list(source.mean), "std": list(source.std), "label_scheme": source.label_scheme, "tasks": tasks,
            "data_dir": source.root, "train_images": train_count, "val_images": val_count,
            "precision": precision.name, "channels_last": precision.channels_last, "precision_probe": runtime.probe,
            "threads_probe": runtime.threads_probe,
            "world_size": runtime.context.world_size}


def build_sides(args, data, train_idx, val_idx, runtime, cache=None):
    """The training side (with --extra_data / --pseudo_labels and --age_bins labels) and the
    validation side, each with its own transform, sampler and loader (over the run's image
    `cache`); and the training sampler."""
    source, resize, device, context = data.source, runtime.input_size, runtime.device, runtime.context
    train_samples = [source.samples[i] for i in train_idx] + data.extra
    train_paths = source.paths(train_idx) + [s.path for s in data.extra]
    train_labels = [training_label(s, args.age_bins) for s in train_samples]
    val_paths, val_labels = source.paths(val_idx), source.labels(val_idx)
    train_tf = train_transform(data.augmentation, resize, source.mean, source.std, vars(args))
    val_tf = eval_transform(resize, source.mean, source.std)
    targets = oof_targets(args.soft_oof, train_samples, source.root, source.classes) if args.soft_oof else None
    train_set = data.dataset(train_paths, train_labels, train_tf, data.train_prepared, cache,
                             soft=[s.soft for s in train_samples],
                             ages=[s.age for s in train_samples] if args.age_head == "regression" else None,
                             targets=targets)
    val_set = data.dataset(val_paths, val_labels, val_tf, data.prepared, cache)
    counts = class_counts(train_labels, source.num_classes)
    # --sampler weighted: each image drawn with weight 1/count of its class, so classes come up about equally
    draw_weights = [1.0 / counts[label] for label in train_labels] if args.sampler == "weighted" else None
    sampler = EpochSampler(len(train_set), args.seed, draw_weights, context.rank, context.world_size)
    val_sampler = torch.utils.data.DistributedSampler(val_set, shuffle=False) if context.enabled and val_paths else None
    # drop_last keeps BatchNorm and pairwise mixing away from a 1-image last batch
    def on_device(loader, transform):  # --prefetcher: uint8 from the workers, normalized (and flipped) on the device
        return device_loader(loader, transform, device, args.seed) if args.prefetcher else loader
    train_loader = on_device(make_loader(train_set, args.batch_size, args.num_workers, device,
                                         drop_last=len(sampler) > args.batch_size, sampler=sampler), train_tf)
    val_loader = on_device(make_loader(val_set, args.valid_batch_size, args.num_workers, device,
                                       sampler=val_sampler), val_tf) if val_paths else None
    regions = {"train": [data.regions[p] for p in train_paths], "val": [data.regions[p] for p in val_paths]} \
        if data.regions else {"train": None, "val": None}
    def plain():  # --aug_off_epoch: the same images, order and labels through the validation transform
        plain_set = data.dataset(train_paths, train_labels, val_tf, data.train_prepared, cache,
                                 soft=[s.soft for s in train_samples], ages=train_set.ages, targets=targets)
        return on_device(make_loader(plain_set, args.batch_size, args.num_workers, device,
                                     drop_last=len(sampler) > args.batch_size, sampler=sampler), val_tf)
    train = Side(train_paths, train_labels, regions["train"], train_tf, train_set, train_loader, plain=plain)
    val_rows = [(source.samples[i].path, source.samples[i].person, source.samples[i].age) for i in val_idx]
    return train, Side(val_paths, val_labels, regions["val"], val_tf, val_set, val_loader, val_rows), sampler


def build_networks(args, config, runtime, resume=False):
    """(net, model, train_model, ema): the model built from the run's config (model.build_from_config,
    as inference rebuilds it), its DDP wrapper under torchrun, the compiled training model and the EMA."""
    device, context = runtime.device, runtime.context
    net = build_from_config(config, pretrained=args.pretrained and not resume)
    if args.weights and not resume:
        load_weights(net, args.weights, args.model, allow_new_head=True)
    if args.grad_checkpointing:
        if not hasattr(net, "set_grad_checkpointing"):
            raise cli.UserError(f"--grad_checkpointing: model {args.model} does not support it (timm models do)")
        net.set_grad_checkpointing(True)
    if args.sync_bn and context.enabled:
        net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
    net = runtime.precision.model(net.to(device))
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
    """--criterion with its own options and --smoothing; one per task with --head multitask;
    with the age loss (--age_head regression) or the soft out-of-fold targets (--soft_oof)."""
    options = {**CRITERIONS.values_for(args.criterion, vars(args)), "smoothing": args.smoothing}
    if args.head == "multitask":
        criterion = MultiTaskLoss(args.criterion, num_classes, tasks, args.task_weights, counts, **options)
    else:
        criterion = build_criterion(args.criterion, num_classes, class_counts=counts, **options)
    if args.age_head == "regression":
        criterion = AgeRegressionLoss(criterion, num_classes, args.age_weight, AGE_UNIT)
    if args.soft_oof:
        criterion = SoftTargetLoss(criterion, num_classes, args.soft_weight)
    return criterion.to(device)


def build_step(args, net, criterion, ema, runtime, batches, config):
    """The optimisation step's parts: mixing, optimizer (head and backbone split for
    --freeze_epochs), schedule, accumulation and clipping."""
    mixer = BatchMixer(args.cutmix, args.mixup, prob=args.cutmix_prob, beta=args.beta, mode=args.cutmix_mode,
                       seed=args.seed + runtime.context.rank, cutmix_alpha=args.cutmix_alpha,
                       mixup_alpha=args.mixup_alpha,
                       switch_prob=args.mix_switch_prob)
    optimizer = optimizer_for(args, net)
    freezer = Freezer(net, optimizer, args.freeze_epochs, args.backbone_lr_ratio) \
        if args.freeze_epochs or args.backbone_lr_ratio != 1 else None
    per_epoch = updates_per_epoch(batches, args.grad_accum_steps)
    scheduler = scheduler_for(args, optimizer, per_epoch)
    precision = runtime.precision
    teacher = Teacher(args.teacher, config, args.kd_weight, args.kd_temperature, runtime.device, precision) \
        if args.teacher else None
    return Step(criterion, optimizer, precision.scaler(), precision, mixer, ema, accum=args.grad_accum_steps,
                clip=args.clip_grad, clip_mode=args.clip_mode, scheduler=scheduler, on_updates=args.sched_on_updates,
                freezer=freezer, teacher=teacher, classes=config["num_classes"])


def build_fold(args, data, split, runtime, cache=None, resume=False):
    """The one place the flags become one fold's parts: model, sides, criterion, mixing,
    optimizer, schedule. `split`: (train indices, val indices) into the data's samples."""
    train_idx, val_idx = split
    seed_everything(args.seed)
    config = fold_config(args, data, len(train_idx) + len(data.extra), len(val_idx), runtime)
    net, model, train_model, ema = build_networks(args, config, runtime, resume)
    train, val, sampler = build_sides(args, data, train_idx, val_idx, runtime, cache)
    counts = class_counts(train.labels, config["num_classes"])
    criterion = build_criterion_for(args, config["num_classes"], config["tasks"], counts, runtime.device)
    step = build_step(args, net, criterion, ema, runtime, len(train.loader), config)
    swa = SWA(net, step.optimizer, args.swa_start, args.swa_lr, args.swa_anneal_epochs) if args.swa_start else None
    return Fold(config, net, model, train_model, step, sampler, train, val, parse_tta(args.val_tta), runtime.device,
                swa)
