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
import inspect
import json
import math
import os
import random
import time

import numpy as np
import torch
from sklearn.metrics import f1_score
from tqdm import tqdm

import cli
from augmentation import AUGMENTATIONS, eval_transform, seed_transform
from cutmix import MODES as CUTMIX_MODES, BatchMixer, mixed_loss
from dataset import DATASETS, ImageDataset, class_counts, make_loader, write_split_csv
from loss import CRITERIONS, build_criterion
from model import (MODELS, check_model_name, create_model, default_input_size, load_weights, resolve_device,
                   save_checkpoint)
from registry import Registry

OPTIMIZERS = Registry("optimizer")
for _name, _cls in vars(torch.optim).items():
    # LBFGS needs a closure per step and SparseAdam sparse gradients: neither fits this loop.
    if isinstance(_cls, type) and issubclass(_cls, torch.optim.Optimizer) and _name not in (
            "Optimizer", "LBFGS", "SparseAdam"):
        OPTIMIZERS.register(_name)(_cls)

SCHEDULERS = ("none", "step", "cosine")
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr", "seconds")


def get_args_parser():
    parser = cli.ArgumentParser(description="Train an image classifier into a run folder.",
                                epilog="Every flag also has a kebab-case spelling (--batch-size).")
    data = parser.add_argument_group("Data")
    data.add_argument("--data_dir", default=os.path.join("data", "train"),
                      help="training data: the competition layout (train.csv + images/) or a folder per class")
    data.add_argument("--dataset", default="datasetSplitByClasses", help=DATASETS.help())
    data.add_argument("--val_ratio", type=cli.ratio, default=0.2, help="share of people (or images) held out")
    data.add_argument("--resize", type=cli.parse_size, default=None, metavar="H,W",
                      help="input size; default: the model's own")
    data.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                      help="DataLoader worker processes (0: load in the main process)")
    data.add_argument("--seed", type=int, default=42, help="seeds the split, init, shuffling, augmentation")

    model = parser.add_argument_group("Model")
    model.add_argument("--model", default="BaseModel", help=f"{MODELS.help()}, or any timm model name")
    cli.bool_flag(model, "--pretrained", help="start from timm's pretrained weights (needs network)")
    model.add_argument("--weights", default=None, metavar="PATH",
                       help="start from a local state dict / timm checkpoint / .safetensors")

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
    cli.bool_flag(optim, "--amp", help="mixed precision (fp16 autocast + grad scaler) on CUDA")
    optim.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")

    out = parser.add_argument_group("Output")
    out.add_argument("--model_dir", default="runs", help="parent folder of run folders")
    out.add_argument("--name", default="exp", help="run folder name; exp2, exp3, ... when taken")
    return parser


# ---------------------------------------------------------------- set-up helpers
def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def make_run_dir(model_dir, name):
    """runs/<name>, or <name>2, <name>3, ...: mkdir is atomic, so two runs never share one."""
    os.makedirs(model_dir, exist_ok=True)
    for n in range(1, 10_000):
        path = os.path.join(model_dir, name if n == 1 else f"{name}{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise cli.UserError(f"no free run folder name for {name!r} in {model_dir}")


def write_json(path, obj):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


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


def rng_states():
    """Every RNG a run draws from, as plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


# ---------------------------------------------------------------- the loop
def train_one_epoch(model, loader, criterion, optimizer, mixer, device, amp, scaler, desc):
    """One pass over the training side; returns mean loss and accuracy on unmixed batches."""
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = unmixed = 0
    bar = tqdm(loader, desc=desc, leave=False, disable=None, dynamic_ncols=True)
    for step, (images, labels) in enumerate(bar):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images, y_a, y_b, lam = mixer(images, labels)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(images)
            loss = mixed_loss(criterion, logits, y_a, y_b, lam)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

        loss_sum += loss.detach() * len(labels)
        seen += len(labels)
        if lam == 1.0:  # accuracy of a mixed batch means nothing: count unmixed batches only
            correct += (logits.argmax(1) == labels).sum()
            unmixed += len(labels)
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss_sum.item() / seen:.4f}",
                            acc=f"{correct.item() / max(unmixed, 1):.3f}")
    if not math.isfinite(loss_sum.item()):
        raise cli.UserError("training loss is not finite (NaN or inf): lower --lr, or check the data")
    return loss_sum.item() / max(seen, 1), correct.item() / unmixed if unmixed else float("nan")


@torch.no_grad()
def evaluate(model, loader, criterion, device, amp, num_classes):
    """Loss, accuracy and macro F1 over the WHOLE loader (predictions concatenated first)."""
    model.eval()
    loss_sum, logits_all, labels_all = 0.0, [], []
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.float16, enabled=amp):
            logits = model(images)
        loss_sum += criterion(logits.float(), labels).item() * len(labels)
        logits_all.append(logits.float().cpu())
        labels_all.append(labels.cpu())
    logits, labels = torch.cat(logits_all), torch.cat(labels_all)
    preds = logits.argmax(1)
    return {
        "val_loss": loss_sum / len(labels),
        "val_acc": (preds == labels).float().mean().item(),
        "val_f1": f1_score(labels.numpy(), preds.numpy(), average="macro",
                           labels=list(range(num_classes)), zero_division=0),
        "preds": preds, "labels": labels,
    }


def is_better(val, best):
    """Higher macro F1 wins; a tie (common once a small val set saturates) goes to the lower val loss."""
    return val["val_f1"] > best["val_f1"] or (val["val_f1"] == best["val_f1"] and val["val_loss"] < best["val_loss"])


def log_epoch(run_dir, writer, row, is_best, epochs):
    """One epoch's row: metrics.csv, TensorBoard scalars and one printed line."""
    path = os.path.join(run_dir, "metrics.csv")
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        out = csv.writer(f)
        if new:
            out.writerow(METRIC_COLUMNS)
        out.writerow([row[k] if isinstance(row[k], int) else f"{row[k]:.6g}" for k in METRIC_COLUMNS])
    for key in METRIC_COLUMNS[1:-1]:
        writer.add_scalar(key, row[key], row["epoch"])
    writer.flush()
    print(f"epoch {row['epoch']}/{epochs}  train_loss {row['train_loss']:.4f}  train_acc {row['train_acc']:.3f}  "
          f"val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.3f}  val_f1 {row['val_f1']:.4f}  "
          f"lr {row['lr']:.2e}  {row['seconds']:.1f}s{'  *best*' if is_best else ''}", flush=True)


# ---------------------------------------------------------------- main
def main(args):
    device = resolve_device(args.device)
    amp = args.amp and device.type == "cuda"
    if args.amp and not amp:
        print("note: --amp applies on CUDA only; training in fp32")
    for registry, name in ((DATASETS, args.dataset), (AUGMENTATIONS, args.augmentation),
                           (CRITERIONS, args.criterion), (OPTIMIZERS, args.optimizer)):
        registry.get(name)  # fail on a typo before any work
    check_model_name(args.model)
    seed_everything(args.seed)

    # data and split
    source = DATASETS.build(args.dataset, args.data_dir, val_ratio=args.val_ratio, seed=args.seed)
    train_idx, val_idx = source.split()
    num_classes = source.num_classes

    # model and input size
    model = create_model(args.model, num_classes, pretrained=args.pretrained)
    if args.weights:
        load_weights(model, args.weights, args.model, allow_new_head=True)
    model.to(device)
    resize = tuple(args.resize or default_input_size(args.model, model))

    # transforms (one per side) and loaders
    train_tf = AUGMENTATIONS.build(args.augmentation, resize=resize, mean=source.mean, std=source.std)
    seed_transform(train_tf, args.seed)
    val_tf = eval_transform(resize, source.mean, source.std)
    train_set = ImageDataset(source.paths(train_idx), source.labels(train_idx), train_tf, min_size=resize)
    val_set = ImageDataset(source.paths(val_idx), source.labels(val_idx), val_tf, min_size=resize)
    # drop_last keeps BatchNorm and pairwise mixing away from a 1-image last batch
    train_loader = make_loader(train_set, args.batch_size, args.num_workers, device, shuffle=True,
                               drop_last=len(train_set) > args.batch_size, seed=args.seed)
    val_loader = make_loader(val_set, args.valid_batch_size, args.num_workers, device)

    train_counts = class_counts(train_set.labels, num_classes)
    criterion = build_criterion(args.criterion, num_classes, class_counts=train_counts,
                                focal_gamma=args.focal_gamma, smoothing=args.smoothing,
                                new_focal_threshold=args.new_focal_threshold).to(device)
    mixer = BatchMixer(args.cutmix, args.mixup, prob=args.cutmix_prob, beta=args.beta,
                       mode=args.cutmix_mode, seed=args.seed)
    optimizer = build_optimizer(args.optimizer, model.parameters(), args.lr, args.weight_decay)
    scheduler = build_scheduler(args.scheduler, optimizer, args.epochs, args.lr_decay_step, args.gamma)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)

    # the run folder
    run_dir = make_run_dir(args.model_dir, args.name)
    config = {**vars(args), "resize": list(resize), "input_size": list(resize), "num_classes": num_classes,
              "classes": source.classes, "mean": list(source.mean), "std": list(source.std),
              "label_scheme": source.label_scheme, "data_dir": source.root,
              "train_images": len(train_set), "val_images": len(val_set)}
    write_json(os.path.join(run_dir, "config.json"), config)
    write_split_csv(os.path.join(run_dir, "split.csv"), source, train_idx, val_idx)
    from torch.utils.tensorboard import SummaryWriter  # slow import: only once a run starts
    writer = SummaryWriter(run_dir)
    print(f"run {run_dir}: {args.model} at {resize[0]}x{resize[1]}, {len(train_set)} train / "
          f"{len(val_set)} val images, {num_classes} classes, {device}", flush=True)

    best = {"val_f1": -1.0, "val_loss": math.inf, "epoch": 0}
    bad_epochs, started = 0, time.time()
    for epoch in range(1, args.epochs + 1):
        tic = time.time()
        lr = optimizer.param_groups[0]["lr"]
        train_loss, train_acc = train_one_epoch(model, train_loader, criterion, optimizer, mixer, device,
                                                amp, scaler, desc=f"epoch {epoch}/{args.epochs}")
        scheduler.step()
        val = evaluate(model, val_loader, criterion, device, amp, num_classes)
        is_best = is_better(val, best)
        if is_best:
            best = {"val_f1": val["val_f1"], "val_loss": val["val_loss"], "val_acc": val["val_acc"], "epoch": epoch}
            save_checkpoint({"model": model.state_dict(), "epoch": epoch, **best}, os.path.join(run_dir, "best.pth"))
            bad_epochs = 0
        else:
            bad_epochs += 1
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                         "epoch": epoch, "best": best, "bad_epochs": bad_epochs, "rng": rng_states(),
                         "mixer_rng": mixer.rng.bit_generator.state}, os.path.join(run_dir, "last.pth"))
        log_epoch(run_dir, writer, {"epoch": epoch, "train_loss": train_loss, "train_acc": train_acc,
                                    **{k: val[k] for k in ("val_loss", "val_acc", "val_f1")},
                                    "lr": lr, "seconds": time.time() - tic}, is_best, args.epochs)
        if args.patience and bad_epochs >= args.patience:
            print(f"early stop: no better val F1 for {bad_epochs} epochs")
            break
    writer.close()
    print(f"done in {(time.time() - started) / 60:.1f} min: best epoch {best['epoch']} "
          f"val_f1 {best['val_f1']:.4f} val_acc {best.get('val_acc', 0):.3f} -> {os.path.join(run_dir, 'best.pth')}")
    return run_dir


if __name__ == "__main__":
    cli.run(main, get_args_parser)
