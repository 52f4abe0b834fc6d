"""Train a classifier and write a run folder (runs/<name>): config.json, split.csv, best.pth,
last.pth, metrics.csv and TensorBoard events.

The recipe, in `main`: data, model, transforms, criterion, optimizer, scheduler, loop; the loop
is `train_one_epoch` + `evaluate`, the best macro-F1 epoch becomes best.pth.

Example:
    python train.py --epochs 10 --augmentation AlbuAugmentation --model imgInceptionV3 \\
        --criterion new_focal --lr 1e-4 --batch_size 16 --valid_batch_size 64 \\
        --dataset datasetSplitByClasses --optimizer Adam --cutmix True --resize 299,299
"""
import csv
import dataclasses
import inspect
import math
import os
import random
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from sklearn.metrics import f1_score
from tqdm import tqdm

import cli
import distributed
import plots
import timm.utils
from augmentation import AUGMENTATIONS, TTA_VIEWS, eval_transform, parse_tta, prepared_size, tta_logits
from cutmix import MODES as CUTMIX_MODES, BatchMixer, mixed_loss
from dataset import (DATASETS, TASKS, EpochSampler, ImageCache, ImageDataset, cache_shape, class_counts, load_image,
                     make_loader, read_extra, read_pseudo_labels, shared_memory_free, task_f1, training_label,
                     write_split_csv)
from facecrop import face_regions
from loss import CRITERIONS, MultiTaskLoss, build_criterion
from model import (MODELS, check_model_name, compile_model, create_model, input_size_of, load_weights,
                   read_checkpoint, resolve_device, resolve_precision, save_checkpoint, unwrap)
from runfolder import (PREVIEW_IMAGES, RunLog, best_epoch_figures, final_figures, make_run_dir, restore_rng_states,
                       rng_states, spread, write_json)
from registry import Registry

OPTIMIZERS = Registry("optimizer")
for _name, _cls in vars(torch.optim).items():
    # LBFGS needs a closure per step and SparseAdam sparse gradients: neither fits this loop.
    if isinstance(_cls, type) and issubclass(_cls, torch.optim.Optimizer) and _name not in (
            "Optimizer", "LBFGS", "SparseAdam"):
        OPTIMIZERS.register(_name)(_cls)

SCHEDULERS = ("none", "step", "cosine")
FIGURE_REFRESH_SECONDS = 60  # best-epoch figures take ~2 s: redrawn on a new best at most once a minute
# what config.json records beside the flags: skipped when it is read back with --config / --resume
DERIVED_KEYS = ("input_size", "prepared_size", "num_classes", "classes", "mean", "std", "label_scheme", "tasks",
                "train_images", "val_images", "world_size", "folds")


def get_args_parser():
    parser = cli.ArgumentParser(description="Train an image classifier into a run folder.",
                                epilog="Every flag also has a kebab-case spelling (--batch-size).",
                                derived_keys=DERIVED_KEYS)
    parser.add_argument("--config", default=None, metavar="FILE",
                        help="YAML/JSON of options (a run's config.json repeats that run); flags override it")
    parser.add_argument("--resume", default=None, metavar="RUN",
                        help="continue RUN from its last.pth, in the same folder, with its options")
    data = parser.add_argument_group("Data")
    data.add_argument("--data_dir", default=os.path.join("data", "train"),
                      help="training data: the competition layout (train.csv + images/) or a folder per class")
    data.add_argument("--dataset", default="datasetSplitByClasses", help=DATASETS.help())
    data.add_argument("--val_ratio", type=cli.ratio, default=0.2, help="share of people (or images) held out")
    data.add_argument("--resize", type=cli.parse_size, default=None, metavar="H,W",
                      help="input size; default: the model's own")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="DataLoader worker processes (0: load in the main process)")
    data.add_argument("--cache", choices=("auto", "none", "ram", "disk"), default="auto",
                      help="keep decoded (face-cropped) images from the first epoch: in shared memory (ram), "
                           "or in a memory-mapped file in the run folder for data larger than RAM (disk); "
                           "auto: ram when it takes under half of the free shared memory, else none")
    data.add_argument("--seed", type=int, default=42, help="seeds the split, init, shuffling, augmentation")
    data.add_argument("--kfold", type=int, default=0, metavar="K",
                      help="train K models on person-grouped, class-stratified folds (0: one split)")
    cli.bool_flag(data, "--skip_bad_images", help="check every image first; leave out (and count) unreadable ones")
    cli.bool_flag(data, "--facecrop", help="crop to the MTCNN face box (cached on disk) in training and inference")
    data.add_argument("--face_margin", type=float, default=0.3, help="face box grown by this share of its size")
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
    data.add_argument("--pseudo_data_dir", default=os.path.join("data", "eval"),
                      help="the eval folder the pseudo-label ImageIDs refer to")

    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="BaseModel", help=f"{MODELS.help()}, or any timm model name")
    cli.bool_flag(model, "--pretrained", help="start from timm's pretrained weights (needs network)")
    model.add_argument("--weights", default=None, metavar="PATH",
                       help="start from a local state dict / timm checkpoint / .safetensors")
    model.add_argument("--head", choices=("linear", "multitask"), default="linear",
                       help="multitask: mask/gender/age heads combined into the 18 classes")
    model.add_argument("--task_weights", type=cli.parse_floats, default=None, metavar="M,G,A",
                       help="multitask: loss weight per head (default 1,1,1)")
    model.add_argument("--msd", type=int, default=0, metavar="N", help="multi-sample dropout: N samples (0: off)")
    model.add_argument("--msd_p", type=float, default=0.25, help="multi-sample dropout rate")
    model.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                       help="keep an exponential moving average of the weights (e.g. 0.999); saved as best "
                            "when it scores higher (0: off)")

    loss = parser.add_argument_group("Loss and augmentation")
    loss.add_argument("--criterion", default="cross_entropy", help=CRITERIONS.help())
    loss.add_argument("--focal_gamma", type=float, default=2.0, help="gamma of focal and new_focal")
    loss.add_argument("--smoothing", type=float, default=0.1, help="label_smoothing's epsilon")
    loss.add_argument("--new_focal_threshold", type=float, default=0.5,
                      help="new_focal: p_t at and above which a sample counts as learned")
    loss.add_argument("--augmentation", default="AlbuAugmentation", help=AUGMENTATIONS.help())
    cli.bool_flag(loss, "--cutmix", help="CutMix on training batches")
    cli.bool_flag(loss, "--mixup", help="MixUp on training batches (with --cutmix: one of the two per batch)")
    loss.add_argument("--cutmix_prob", type=float, default=0.5, help="share of batches mixed")
    loss.add_argument("--beta", type=float, default=1.0, help="lambda ~ Beta(beta, beta)")
    loss.add_argument("--cutmix_mode", choices=CUTMIX_MODES, default="box",
                      help="box, or vertical: a full-height strip (faces are centred)")
    loss.add_argument("--val_tta", default="none", metavar="VIEWS",
                      help=f"test-time augmentation for validation, e.g. hflip,zoom ({TTA_VIEWS.help()})")

    optim = parser.add_argument_group("Optimization")
    optim.add_argument("--epochs", type=cli.positive_int, default=10)
    optim.add_argument("--batch_size", type=cli.positive_int, default=64)
    optim.add_argument("--valid_batch_size", type=cli.positive_int, default=128)
    optim.add_argument("--optimizer", default="Adam", help=OPTIMIZERS.help())
    optim.add_argument("--lr", type=float, default=1e-3)
    optim.add_argument("--weight_decay", type=float, default=0.0)
    optim.add_argument("--scheduler", choices=SCHEDULERS, default="step", help="learning-rate schedule, per epoch")
    optim.add_argument("--lr_decay_step", type=cli.positive_int, default=20, help="step: epochs between decays")
    optim.add_argument("--gamma", type=float, default=0.5, help="step: lr multiplier at each decay")
    optim.add_argument("--patience", type=int, default=5,
                       help="stop after this many epochs without a better val F1 (0: never)")
    optim.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                       help="auto: bf16 autocast where the CPU/GPU has native bf16, fp16 on older GPUs, else fp32")
    cli.bool_flag(optim, "--channels_last", default=None,
                  help="NHWC memory format (default: on with bf16/fp16)")
    cli.bool_flag(optim, "--amp", default=None, help="the seed's flag: True = --precision auto, False = fp32")
    cli.bool_flag(optim, "--compile", help="torch.compile the training step: the first steps take a minute or "
                                           "more to compile, later ones run faster (see README, Performance)")
    optim.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    out = parser.add_argument_group("Output")
    out.add_argument("--model_dir", default="runs", help="parent folder of run folders")
    out.add_argument("--name", default="exp", help="run folder name; exp2, exp3, ... when taken")
    out.add_argument("--wandb", default=None, metavar="PROJECT",
                     help="also log to Weights & Biases (needs `pip install wandb`; WANDB_MODE=offline works)")
    return parser


# ---------------------------------------------------------------- set-up helpers
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(name, params, lr, weight_decay):
    cls = OPTIMIZERS.get(name)
    kwargs = {"lr": lr}
    if "weight_decay" in inspect.signature(cls).parameters:
        kwargs["weight_decay"] = weight_decay
    elif weight_decay:
        raise cli.UserError(f"optimizer {name} takes no weight decay; drop --weight_decay")
    return cls(params, **kwargs)


def build_scheduler(kind, optimizer, epochs, step, gamma):
    if kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=gamma)
    if kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda epoch: 1.0)


# ---------------------------------------------------------------- the loop
def train_one_epoch(model, loader, criterion, optimizer, mixer, device, precision, scaler, desc,
                    context=distributed.Context(), ema=None):
    """One pass over the training side; returns mean loss and accuracy on unmixed batches
    (over every rank under torchrun)."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = unmixed = 0
    bar = tqdm(loader, desc=desc, leave=False, disable=None if context.is_main else True, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = precision.batch(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
        images, y_a, y_b, lam = mixer(images, labels)
        with precision.autocast():
            logits = model(images)
            loss = mixed_loss(criterion, logits, y_a, y_b, lam)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if ema is not None:
            ema.update(unwrap(model))

        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        if lam == 1.0:  # accuracy of a mixed batch means nothing: count unmixed batches only
            correct += (logits.argmax(1) == labels).sum()
            unmixed += len(labels)
        if step % 10 == 0:  # a sync every 10 steps, not every step
            running = loss_sum.item() / seen
            if not math.isfinite(running):
                raise cli.UserError("training loss is not finite (NaN or inf): lower --lr, or check the data; "
                                    "best.pth is left as it was")
            bar.set_postfix(loss=f"{running:.4f}", acc=f"{correct.item() / max(unmixed, 1):.3f}")
    loss_total, seen, correct_total, unmixed = distributed.sum_all(context, loss_sum.item(), seen, correct.item(),
                                                                   unmixed)
    if not math.isfinite(loss_total):
        raise cli.UserError("training loss is not finite (NaN or inf): lower --lr, or check the data; "
                            "best.pth is left as it was")
    return loss_total / max(seen, 1), correct_total / unmixed if unmixed else float("nan")


@torch.no_grad()
def evaluate(model, loader, criterion, device, precision, num_classes, views=(), per_task=False,
             context=distributed.Context()):
    """Loss, accuracy and macro F1 over the WHOLE validation set: predictions are concatenated
    first (and gathered from every rank under torchrun, the sampler's padding dropped).

    With TTA `views`, predictions come from the softmax averaged over the views; the loss stays
    that of the plain images. `per_task` adds the macro F1 of mask, gender and age.
    """
    model.eval()
    logits_all, logp_all, labels_all = [], [], []
    for images, labels in loader:
        images = precision.batch(images.to(device, non_blocking=True))
        with precision.autocast():
            logits, logp = tta_logits(model, images, views)
        logits_all.append(logits.float().cpu())
        logp_all.append(logp.cpu())
        labels_all.append(labels)
    logits, logp, labels = torch.cat(logits_all), torch.cat(logp_all), torch.cat(labels_all)
    if context.enabled:  # each rank saw a padded shard: merge by dataset index
        shards = distributed.gather(context, (list(loader.sampler), logits, logp, labels))
        merged = {}
        for order, *rows in shards:
            for position, index in enumerate(order):
                merged.setdefault(index, [r[position] for r in rows])
        logits, logp, labels = (torch.stack(column) for column in zip(*(merged[i] for i in sorted(merged))))
    preds = logp.argmax(1)
    result = {
        "val_loss": criterion(logits.to(device), labels.to(device)).item(),
        "val_acc": (preds == labels).float().mean().item(),
        "val_f1": f1_score(labels.numpy(), preds.numpy(), average="macro",
                           labels=list(range(num_classes)), zero_division=0),
        "probs": logp.exp().numpy(), "preds": preds, "labels": labels,
    }
    if per_task:
        result.update({f"val_f1_{task}": f1 for task, f1 in task_f1(labels.tolist(), preds.tolist()).items()})
    return result


def is_better(val, best):
    """Higher macro F1 wins; a tie (common once a small val set saturates) goes to the lower val loss."""
    return val["val_f1"] > best["val_f1"] or (val["val_f1"] == best["val_f1"] and val["val_loss"] < best["val_loss"])


# ---------------------------------------------------------------- data
@dataclasses.dataclass
class TrainingData:
    """What every fold trains on."""
    source: object   # the dataset entry: samples, classes, mean/std, split()/folds()
    extra: list      # Samples with full paths for the training side only (--extra_data, --pseudo_labels)
    regions: dict    # full image path -> face crop region (--facecrop), else empty
    cache: object = None  # an ImageCache over every image (--cache), shared by all folds
    prepared: tuple = None  # (H, W) images are prepared to (augmentation.prepared_size) and cached at
    train_prepared: tuple = None  # the same for the training side; None: its pipeline gets full photos
    slots: dict = dataclasses.field(default_factory=dict)  # full image path -> its cache slot

    def dataset(self, paths, labels, transform, prepare_to):
        """An ImageDataset over `paths` with this data's face crops and cache. prepare_to None: the
        transform gets full-size photos (a pipeline that does not resize first), never cached."""
        regions = [self.regions[p] for p in paths] if self.regions else None
        cache = self.cache if prepare_to is not None else None
        slots = [self.slots[p] for p in paths] if cache is not None else None
        return ImageDataset(paths, labels, transform, prepare_to=prepare_to, regions=regions, cache=cache,
                            cache_slots=slots)


def drop_unreadable(source, extra):
    """--skip_bad_images: decode every image once (small) and leave out, and count, those that fail."""
    def readable(path):
        try:
            load_image(path, min_size=(32, 32))
            return True
        except cli.UserError:
            return False
    paths = source.paths(range(len(source.samples))) + [s.path for s in extra]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        ok = dict(zip(paths, pool.map(readable, paths)))
    bad = [p for p in paths if not ok[p]]
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), first: {bad[0]}")
    source.samples = [s for s, p in zip(source.samples, paths) if ok[p]]
    return [s for s in extra if ok[s.path]]


def load_training_data(args, context=distributed.Context()):
    relabel = args.relabel
    source = DATASETS.build(args.dataset, args.data_dir, val_ratio=args.val_ratio, seed=args.seed, relabel=relabel)
    if relabel and source.label_scheme != "mask":
        raise cli.UserError("--relabel applies to the competition layout only")
    if source.label_scheme != "mask":
        for flag, value in (("--head multitask", args.head == "multitask"), ("--age_bins", args.age_bins),
                            ("--extra_data", args.extra_data), ("--pseudo_labels", args.pseudo_labels)):
            if value:
                raise cli.UserError(f"{flag} needs the competition's 18-class layout, not {args.dataset}")
    groups = [(source.root, source.paths(range(len(source.samples))))]  # (folder, its image paths)
    extra = []
    for folder in args.extra_data or []:
        found = read_extra(folder)
        print(f"extra data: {len(found)} training images from {folder}")
        extra += found
        groups.append((folder, [s.path for s in found]))
    if args.pseudo_labels:
        pseudo = read_pseudo_labels(args.pseudo_labels, args.pseudo_data_dir, args.pseudo_threshold, source.classes)
        print(f"pseudo labels: {len(pseudo)} eval images at top probability >= {args.pseudo_threshold}")
        extra += pseudo
        groups.append((args.pseudo_data_dir, [s.path for s in pseudo]))
    if args.skip_bad_images:
        extra = drop_unreadable(source, extra)
        kept = set(source.paths(range(len(source.samples)))) | {s.path for s in extra}
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


def attach_cache(data, kind, size, run_dir):
    """--cache: one ImageCache of prepared images (`size`, H x W) over every image the folds use
    (kind "auto": "ram" when it fits)."""
    paths = data.source.paths(range(len(data.source.samples))) + [s.path for s in data.extra]
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
    data.cache = ImageCache(len(paths), size, kind, path=os.path.join(run_dir, f".image_cache{os.getpid()}.npy"))
    print(f"cache: {len(paths)} decoded images at {data.cache.shape[1]}x{data.cache.shape[2]} in {kind}")


def write_oof(run_dir, source, folds, results):
    """oof.csv (one row per training image: its fold's held-out prediction) and kfold.json."""
    rows = []
    for fold, ((_, val_idx), result) in enumerate(zip(folds, results), start=1):
        for i, probs in zip(val_idx, result["probs"]):
            sample = source.samples[i]
            rows.append([sample.path, sample.person, fold, sample.label, int(probs.argmax()), *probs.round(6)])
    rows.sort(key=lambda r: r[0])
    with open(os.path.join(run_dir, "oof.csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "person", "fold", "label", "pred", *source.classes])
        writer.writerows(rows)
    labels, preds = [r[3] for r in rows], [r[4] for r in rows]
    summary = {"oof_f1": f1_score(labels, preds, average="macro", labels=list(range(source.num_classes)),
                                  zero_division=0),
               "fold_f1": [r["val_f1"] for r in results]}
    write_json(os.path.join(run_dir, "kfold.json"), summary)
    return summary


# ---------------------------------------------------------------- main
def train_fold(args, data, train_idx, val_idx, run_dir, device, precision, resize, context=distributed.Context()):
    """Train one model on one split into `run_dir` (or continue it: --resume); returns the best
    epoch's validation output."""
    source, num_classes = data.source, data.source.num_classes
    tasks = tuple(TASKS.values()) if source.label_scheme == "mask" else None
    seed_everything(args.seed)

    model = create_model(args.model, num_classes, pretrained=args.pretrained and not args.resume, head=args.head,
                         tasks=tasks, msd=args.msd, msd_p=args.msd_p)
    if args.weights and not args.resume:
        load_weights(model, args.weights, args.model, allow_new_head=True)
    net = precision.model(model.to(device))  # what is saved; `model` becomes the DDP wrapper under torchrun
    if context.enabled:
        model = torch.nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == "cuda"
                                                          else None)
    ema = timm.utils.ModelEmaV3(net, decay=args.ema) if args.ema else None
    # --compile: the training step only; validation runs the same weights eagerly, so switching to
    # eval mode and the last partial batch cost no recompilation
    train_model = compile_model(model, device) if args.compile else model

    # the two sides: the training side gets --extra_data / --pseudo_labels and --age_bins labels
    train_samples = [source.samples[i] for i in train_idx] + data.extra
    train_paths = source.paths(train_idx) + [s.path for s in data.extra]
    train_labels = [training_label(s, args.age_bins) for s in train_samples]
    val_paths, val_labels = source.paths(val_idx), source.labels(val_idx)
    val_regions = [data.regions[p] for p in val_paths] if data.regions else None

    # transforms (one per side) and loaders
    train_tf = AUGMENTATIONS.build(args.augmentation, resize=resize, mean=source.mean, std=source.std)
    val_tf = eval_transform(resize, source.mean, source.std)
    train_set = data.dataset(train_paths, train_labels, train_tf, data.train_prepared)
    val_set = data.dataset(val_paths, val_labels, val_tf, data.prepared)
    counts = class_counts(train_labels, num_classes)
    # --sampler weighted: each image drawn with weight 1/count of its class, so classes come up about equally
    weights = [1.0 / counts[label] for label in train_labels] if args.sampler == "weighted" else None
    sampler = EpochSampler(len(train_set), args.seed, weights, context.rank, context.world_size)
    val_sampler = torch.utils.data.DistributedSampler(val_set, shuffle=False) if context.enabled else None
    # drop_last keeps BatchNorm and pairwise mixing away from a 1-image last batch
    train_loader = make_loader(train_set, args.batch_size, args.num_workers, device,
                               drop_last=len(sampler) > args.batch_size, sampler=sampler)
    val_loader = make_loader(val_set, args.valid_batch_size, args.num_workers, device, sampler=val_sampler)

    options = dict(focal_gamma=args.focal_gamma, smoothing=args.smoothing, new_focal_threshold=args.new_focal_threshold)
    if args.head == "multitask":
        criterion = MultiTaskLoss(args.criterion, num_classes, tasks, args.task_weights, counts, **options)
    else:
        criterion = build_criterion(args.criterion, num_classes, class_counts=counts, **options)
    criterion.to(device)
    mixer = BatchMixer(args.cutmix, args.mixup, prob=args.cutmix_prob, beta=args.beta,
                       mode=args.cutmix_mode, seed=args.seed + context.rank)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    scheduler = build_scheduler(args.scheduler, optimizer, args.epochs, args.lr_decay_step, args.gamma)
    scaler = precision.scaler()
    views = parse_tta(args.val_tta)

    # where we start: epoch 0, or the state of last.pth
    state = {"epoch": 0, "best": {"val_f1": -1.0, "val_loss": math.inf, "epoch": 0}, "bad_epochs": 0}
    last_path, best_path = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "best.pth")
    if args.resume:
        saved = read_checkpoint(last_path)
        load_weights(net, last_path, args.model)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        scaler.load_state_dict(saved["scaler"])
        if ema is not None and "ema" in saved:
            ema.module.load_state_dict(saved["ema"])
        mixer.rng.bit_generator.state = saved["mixer_rng"]
        restore_rng_states(saved["rng"])
        state = {k: saved[k] for k in state}
        print(f"resuming {run_dir} after epoch {state['epoch']} (best {state['best']['val_f1']:.4f} at epoch "
              f"{state['best']['epoch']})")

    def save_last(epoch):
        save_checkpoint({"model": net.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "ema": ema.module.state_dict() if ema is not None else None, "epoch": epoch,
                         "best": state["best"], "bad_epochs": state["bad_epochs"], "rng": rng_states(),
                         "mixer_rng": mixer.rng.bit_generator.state}, last_path)

    # the run folder: rank 0 writes it
    config = {**vars(args), "resume": None, "resize": list(resize), "input_size": list(resize),
              "prepared_size": list(data.prepared),
              "num_classes": num_classes, "classes": source.classes, "mean": list(source.mean),
              "std": list(source.std), "label_scheme": source.label_scheme, "tasks": list(tasks) if tasks else None,
              "data_dir": source.root, "train_images": len(train_set), "val_images": len(val_set),
              "precision": precision.name, "channels_last": precision.channels_last,
              "world_size": context.world_size}
    log = None
    if context.is_main:
        if not args.resume:
            write_json(os.path.join(run_dir, "config.json"), config)
            write_split_csv(os.path.join(run_dir, "split.csv"), source, train_idx, val_idx, data.extra)
            save_last(0)  # so that even an interrupted first epoch can be resumed
        log = RunLog(run_dir, args.epochs, state["epoch"], args.wandb, config)
        if not args.resume:
            pick = spread(len(train_paths), PREVIEW_IMAGES)
            log.figure("aug_preview", plots.aug_preview_png(
                run_dir, [train_paths[i] for i in pick], train_tf, source.mean, source.std,
                mixer if mixer.enabled else None, n=len(pick), seed=args.seed,
                regions=[train_set.regions[i] for i in pick] if train_set.regions else None,
                prepare_to=train_set.prepare_to), 0)
    print(f"run {run_dir}: {args.model} at {resize[0]}x{resize[1]}, {len(train_set)} train / "
          f"{len(val_set)} val images, {num_classes} classes, {device} {precision.name}"
          f"{' channels_last' if precision.channels_last else ''}", flush=True)

    best_output, started, epoch = None, time.time(), state["epoch"]
    figures_at, figures_epoch = 0.0, 0  # when, and for which epoch, the best-epoch figures were last drawn
    try:
        for epoch in range(state["epoch"] + 1, args.epochs + 1):
            tic = time.time()
            lr = optimizer.param_groups[0]["lr"]
            sampler.set_epoch(epoch)  # the order and augmentation of an epoch depend on (seed, epoch) alone
            train_loss, train_acc = train_one_epoch(train_model, train_loader, criterion, optimizer, mixer, device,
                                                    precision, scaler, f"epoch {epoch}/{args.epochs}", context, ema)
            scheduler.step()
            val = evaluate(model, val_loader, criterion, device, precision, num_classes, views,
                           per_task=tasks is not None, context=context)
            row = {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc, "lr": lr,
                   **{k: v for k, v in val.items() if k.startswith("val_")}}
            weights = net
            if ema is not None:  # the average competes with the raw weights for best.pth
                ema_val = evaluate(ema.module, val_loader, criterion, device, precision, num_classes, views,
                                   per_task=tasks is not None, context=context)
                row.update(ema_val_loss=ema_val["val_loss"], ema_val_f1=ema_val["val_f1"])
                if is_better(ema_val, val):
                    val, weights = ema_val, ema.module
            is_best = is_better(val, state["best"])  # every rank holds the same gathered metrics
            if is_best:
                state["best"] = {"val_f1": val["val_f1"], "val_loss": val["val_loss"], "val_acc": val["val_acc"],
                                 "epoch": epoch, "ema": weights is not net}
                best_output = val
            state["bad_epochs"] = 0 if is_best else state["bad_epochs"] + 1
            state["epoch"] = epoch
            if context.is_main:  # metrics row first: a crash after it is redone on --resume
                log.epoch({**row, "seconds": time.time() - tic}, is_best)
                if is_best:
                    save_checkpoint({"model": weights.state_dict(), **state["best"]}, best_path)
                    if time.time() - figures_at > FIGURE_REFRESH_SECONDS:
                        best_epoch_figures(log, val, val_paths, source.classes, epoch, val_regions, tasks is not None)
                        figures_at, figures_epoch = time.time(), epoch
                save_last(epoch)
            if args.patience and state["bad_epochs"] >= args.patience:
                print(f"early stop: no better val F1 for {state['bad_epochs']} epochs")
                break
    except KeyboardInterrupt:
        if context.is_main:
            print(f"\ninterrupted in epoch {epoch}: {last_path} holds epoch {state['epoch']}; "
                  f"continue with: python train.py --resume {run_dir}", flush=True)
            log.close()
        raise SystemExit(130) from None

    if context.is_main:
        if best_output is not None and figures_epoch != state["best"]["epoch"]:
            best_epoch_figures(log, best_output, val_paths, source.classes, state["best"]["epoch"], val_regions,
                               tasks is not None)
        if os.path.exists(best_path):
            load_weights(net, best_path, args.model)
        final_figures(log, net, val_paths, val_labels, val_tf, source.classes, device, val_regions, data.prepared)
        log.close()
    best = state["best"]
    print(f"done in {(time.time() - started) / 60:.1f} min: best epoch {best['epoch']} "
          f"val_f1 {best['val_f1']:.4f} val_acc {best.get('val_acc', 0):.3f} -> {best_path}")
    return {**best, "probs": best_output["probs"] if best_output is not None else None}


def main(args):
    context, device = distributed.setup(args.device)
    try:
        return run_training(args, context, device or resolve_device(args.device))
    finally:
        distributed.teardown(context)


def run_training(args, context, device):
    precision = resolve_precision("fp32" if args.amp is False else args.precision, device, args.channels_last)
    for registry, name in ((DATASETS, args.dataset), (AUGMENTATIONS, args.augmentation),
                           (CRITERIONS, args.criterion), (OPTIMIZERS, args.optimizer)):
        registry.get(name)  # fail on a typo before any work
    check_model_name(args.model)
    parse_tta(args.val_tta)
    if args.kfold == 1 or args.kfold < 0:
        raise cli.UserError(f"--kfold needs K >= 2 (or 0 for one split), got {args.kfold}")
    seed_everything(args.seed)
    resize = tuple(args.resize or input_size_of(args.model))

    data = load_training_data(args, context)
    folds = data.source.folds(args.kfold) if args.kfold else [data.source.split()]
    if args.resume:
        if args.kfold:
            raise cli.UserError("--resume continues a single run; for k-fold, resume each fold folder's run "
                                "is not supported: start the k-fold run again")
        if not os.path.isfile(os.path.join(args.resume, "last.pth")):
            raise cli.UserError(f"--resume {args.resume}: no last.pth to continue from")
        run_dir = args.resume
    else:
        run_dir = distributed.broadcast(context, make_run_dir(args.model_dir, args.name) if context.is_main else None)
    # what images are prepared to, for training (when its pipeline resizes first) and validation
    probe = AUGMENTATIONS.build(args.augmentation, resize=resize, mean=data.source.mean, std=data.source.std)
    data.train_prepared = prepared_size(probe, resize)
    data.prepared = data.train_prepared or resize
    if data.train_prepared is None and context.is_main:
        print(f"note: --augmentation {args.augmentation} does not start with a resize: training gets full-size "
              f"photos, decoded every epoch (only validation images are prepared and cached)")
    if args.cache != "none":
        attach_cache(data, args.cache, data.prepared, run_dir)
    try:
        if not args.kfold:
            train_fold(args, data, *folds[0], run_dir, device, precision, resize, context)
            return run_dir
        fold_dirs = [f"fold{i}" for i in range(1, len(folds) + 1)]
        if context.is_main:
            write_json(os.path.join(run_dir, "config.json"), {**vars(args), "folds": fold_dirs,
                                                              "classes": data.source.classes})
        results = []
        for fold_dir, (train_idx, val_idx) in zip(fold_dirs, folds):
            if context.is_main:
                os.mkdir(os.path.join(run_dir, fold_dir))
            distributed.barrier(context)
            print(f"--- {fold_dir} of {len(folds)}")
            results.append(train_fold(args, data, train_idx, val_idx, os.path.join(run_dir, fold_dir), device,
                                      precision, resize, context))
        if context.is_main:
            summary = write_oof(run_dir, data.source, folds, results)
            print(f"k-fold: out-of-fold macro F1 {summary['oof_f1']:.4f}, per fold "
                  f"{', '.join(f'{f:.4f}' for f in summary['fold_f1'])} -> {run_dir}")
        return run_dir
    finally:
        if data.cache is not None:
            data.cache.close()


if __name__ == "__main__":
    cli.run(main, get_args_parser)
