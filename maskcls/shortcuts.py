"""train.py's shortcuts that train no run: a smoke test (`--smoke`: a crash shows in seconds, not
after the first epoch), a dry run (`--dry_run`: what an epoch will cost), a learning-rate finder
(`--lr_find`: an exponential sweep over a few hundred updates) and the largest batch that fits
(`--batch_size auto`). Each builds the run's real parts (model, data, augmentation, precision)
with `build_fold`, exactly as training would, and writes nothing into the runs folder.

Example: python train.py --model resnet18 --resize 224,224 --smoke
"""
import math
import os
import resource
import tempfile
import time

import numpy as np
import torch

from augmentation import eval_transform
from dataset import read_eval_dir
from maskcls import cli
from maskcls.engine import evaluate, forward_backward, optimizer_update, train_step
from maskcls.fold import build_fold
from maskcls.images import DeviceLoader, ImageDataset, cache_shape, make_loader
from maskcls.predict import predict
from maskcls.runfolder import Checkpoint
from model import build_from_config, load_weights

SMOKE_BATCHES = 2        # training and validation batches a smoke test runs
SMOKE_EVAL_IMAGES = 8    # eval images it predicts
DRY_STEPS = 5            # timed training steps of a dry run, after one warm-up step
LR_FIND_RANGE = (1e-7, 10.0)  # fastai's sweep: from far too small to far too large
LR_FIND_STEPS = 200      # updates of the sweep (the loader cycles when an epoch is shorter)
LR_FIND_SMOOTH = 0.98    # exponential smoothing of the loss, as fastai's
LR_FIND_DIVERGED = 4.0   # the sweep stops once the smoothed loss is this many times its minimum


def batches(loader, count):
    """The first `count` batches of `loader` (cycling through it when it is shorter)."""
    taken = 0
    while taken < count:
        for batch in loader:
            yield batch
            taken += 1
            if taken == count:
                return


def _to(batch, fold):
    images, labels = batch
    return fold.step.precision.batch(images.to(fold.device)), labels.to(fold.device)


def val_subset(fold, images):
    """A loader over the first `images` validation images (the fold's own transform)."""
    subset = torch.utils.data.Subset(fold.val.dataset, range(min(images, len(fold.val.paths))))
    loader = make_loader(subset, fold.val.loader.batch_size, 0, fold.device)
    return fold.val.loader.wrap(loader) if isinstance(fold.val.loader, DeviceLoader) else loader


def run(args, data, split, runtime):
    """--smoke, --dry_run or --lr_find: the run's real parts, no run folder."""
    if args.smoke:
        smoke(args, data, split, runtime)
    if args.dry_run:
        dry_run(args, data, split, runtime)
    if args.lr_find:
        lr_find(args, data, split, runtime, args.lr_find_plot)


# ---------------------------------------------------------------- --smoke
def smoke(args, data, split, runtime):
    """2 training batches, 2 validation batches, last.pth and best.pth written and read back into
    a model rebuilt from the config (as inference does), a prediction on a few eval images."""
    start = time.perf_counter()
    fold = build_fold(args, data, split, runtime)
    fold.train_model.train()
    losses = [train_step(fold.train_model, *_to(b, fold), fold.step)[0].item()
              for b in batches(fold.train.loader, SMOKE_BATCHES)]
    if not all(map(math.isfinite, losses)):
        raise cli.UserError(f"smoke test: the training loss is not finite ({losses}): lower --lr or check the data")
    said = [f"{len(losses)} training batches (loss {', '.join(f'{x:.3f}' for x in losses)})"]
    if fold.validates:
        val = evaluate(fold.model, val_subset(fold, SMOKE_BATCHES * fold.val.loader.batch_size), fold.step.criterion,
                       fold.device, fold.step.precision, fold.config["num_classes"], fold.views)
        said.append(f"{len(val['labels'])} validation images (macro F1 {val['val_f1']:.3f})")
    with tempfile.TemporaryDirectory(prefix="smoke-") as folder:
        checkpoint = Checkpoint(folder, fold.checkpoint_parts(), args.model)
        checkpoint.save_last({"epoch": 1, "best": {}, "bad_epochs": 0, "finished": False})
        checkpoint.save_best(fold.net, {"val_f1": 0.0, "epoch": 1})
        rebuilt = build_from_config(fold.config)
        load_weights(rebuilt, checkpoint.best, fold.config["model"])
        checkpoint.resume()
        said.append("last.pth and best.pth written and read back")
        said.append(smoke_predict(args, fold, rebuilt.to(fold.device).eval(), data))
    print(f"smoke test passed in {time.perf_counter() - start:.1f} s: {'; '.join(said)}; nothing written")


def smoke_predict(args, fold, model, data):
    """The rebuilt model on the first eval images (--pseudo_data_dir, data/eval by default)."""
    if not os.path.isdir(args.pseudo_data_dir):
        return f"no eval folder at {args.pseudo_data_dir} to predict (--pseudo_data_dir)"
    paths = read_eval_dir(args.pseudo_data_dir).paths[:SMOKE_EVAL_IMAGES]
    size = tuple(fold.config["input_size"])
    dataset = ImageDataset(paths, [-1] * len(paths), eval_transform(size, data.source.mean, data.source.std),
                           prepare_to=data.prepared)
    probs = predict(model, make_loader(dataset, len(paths), 0, fold.device), fold.device, fold.step.precision)
    if not (np.isfinite(probs).all() and np.allclose(probs.sum(1), 1, atol=1e-3)):
        raise cli.UserError("smoke test: the predictions on eval images are not probabilities")
    return f"{len(paths)} eval images predicted"


# ---------------------------------------------------------------- --dry_run
def dry_run(args, data, split, runtime):
    """Build everything, time a few steps, and say what an epoch and the run will cost."""
    build_start = time.perf_counter()
    fold = build_fold(args, data, split, runtime)
    built = time.perf_counter() - build_start
    fold.train_model.train()
    loader = iter(batches(fold.train.loader, DRY_STEPS + 1))
    train_step(fold.train_model, *_to(next(loader), fold), fold.step)  # first use: kernels, workers
    tic, steps = time.perf_counter(), 0
    for batch in loader:
        train_step(fold.train_model, *_to(batch, fold), fold.step)
        steps += 1
    per_step = (time.perf_counter() - tic) / max(steps, 1)
    train_seconds = per_step * len(fold.train.loader)
    val_seconds = 0.0
    if fold.validates:
        subset = val_subset(fold, fold.val.loader.batch_size)
        tic = time.perf_counter()
        evaluate(fold.model, subset, fold.step.criterion, fold.device, fold.step.precision,
                 fold.config["num_classes"], fold.views)
        val_seconds = (time.perf_counter() - tic) * len(fold.val.loader)
    report_dry_run(args, data, fold, runtime, built, per_step, train_seconds, val_seconds)


def report_dry_run(args, data, fold, runtime, built, per_step, train_seconds, val_seconds):
    epoch = train_seconds + val_seconds
    cache = int(np.prod(cache_shape(len(data.all_paths()), data.prepared)))
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30  # Linux reports KiB
    gpu = f", GPU {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if runtime.device.type == "cuda" else ""
    updates = len(fold.train.loader) // args.grad_accum_steps
    lines = [f"dry run: {args.model} at {runtime.input_size[0]}x{runtime.input_size[1]} (images prepared to "
             f"{data.prepared[0]}x{data.prepared[1]}), {runtime.device} {runtime.precision.name}, built in {built:.1f} s",
             f"  {len(fold.train.paths)} training / {len(fold.val.paths)} validation images, batch {args.batch_size}: "
             f"{len(fold.train.loader)} batches, {updates} updates an epoch, {updates * args.epochs} in "
             f"{args.epochs} epochs",
             f"  {per_step * 1000:.0f} ms a training step: about {cli.duration(epoch)} an epoch ({cli.duration(train_seconds)} "
             f"training, {cli.duration(val_seconds)} validating; the first epoch also decodes every image), "
             f"{cli.duration(epoch * args.epochs * max(args.kfold, 1))} for the run",
             f"  the image cache: {cache / 2**30:.2f} GiB (--cache {args.cache}); peak memory so far: host "
             f"{host:.2f} GiB{gpu}",
             "  nothing written"]
    print("\n".join(lines))


# ---------------------------------------------------------------- --lr_find
def lr_find(args, data, split, runtime, plot_path):
    """An exponential sweep of the learning rate over LR_FIND_STEPS updates of the real run (model,
    data, augmentation, mixing, precision); stops once the loss diverges. Returns the suggestion."""
    fold = build_fold(args, data, split, runtime)
    fold.step.scheduler, fold.step.on_updates = None, False  # the sweep sets the rate itself
    groups = fold.step.optimizer.param_groups
    scales = [group["lr"] / args.lr for group in groups]  # layer decay, a frozen backbone: kept as ratios
    low, high = args.lr_find_range
    rates = np.geomspace(low, high, args.lr_find_steps)
    fold.train_model.train()
    losses, smoothed, best = [], 0.0, math.inf
    for k, (rate, batch) in enumerate(zip(rates, batches(fold.train.loader, len(rates))), 1):
        for group, scale in zip(groups, scales):
            group["lr"] = rate * scale
        loss = train_step(fold.train_model, *_to(batch, fold), fold.step)[0].item()
        smoothed = LR_FIND_SMOOTH * smoothed + (1 - LR_FIND_SMOOTH) * loss
        value = smoothed / (1 - LR_FIND_SMOOTH ** k)  # bias-corrected, as fastai
        if not math.isfinite(value) or (k > 10 and value > LR_FIND_DIVERGED * best):
            break
        best = min(best, value)
        losses.append(value)
    rates = rates[:len(losses)]
    suggestion = suggest(rates, np.array(losses))
    from maskcls import plots
    plots.lr_find_png(plot_path, rates, losses, suggestion)
    print(f"lr finder: {len(losses)} updates from {rates[0]:.1e} to {rates[-1]:.1e}; suggested --lr "
          f"{suggestion['valley']:.2e} (valley: the long steady descent before the minimum; steepest descent at "
          f"{suggestion['steepest']:.2e}, the minimum at {suggestion['minimum']:.2e}) -> {plot_path}")
    return suggestion


def suggest(rates, losses):
    """{'valley', 'steepest', 'minimum'}: fastai's valley suggestion (the longest stretch of falling
    loss, 2/3 of the way down it), the steepest descent of the smoothed loss, and the minimum."""
    if len(losses) < 5:
        raise cli.UserError(f"--lr_find: the loss diverged after {len(losses)} updates; start lower "
                            f"(--lr_find_range)")
    logs = np.log10(rates)
    slopes = np.gradient(losses, logs)
    n = len(losses)
    longest = [1] * n  # the longest decreasing run of losses ending at each point
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and longest[j] + 1 > longest[i]:
                longest[i] = longest[j] + 1
    end = int(np.argmax(longest))
    start = end - longest[end] + 1
    valley = start + (end - start) * 2 // 3
    return {"valley": float(rates[valley]), "steepest": float(rates[int(np.argmin(slopes))]),
            "minimum": float(rates[int(np.argmin(losses))])}


# ---------------------------------------------------------------- --batch_size auto
def fitting_batch_size(args, data, split, runtime, default):
    """The largest power of two that trains a step of the model at its size and precision on the
    GPU (capped at `default`'s rule: a quarter of the training images); on a CPU, `default`."""
    if runtime.device.type != "cuda":
        print(f"--batch_size auto: on a CPU memory is not the limit; batch {default} (the default)")
        return default
    probe = dict(vars(args), batch_size=2, num_workers=0)
    fold = build_fold(type(args)(**probe), data, split, runtime)
    images, labels = next(iter(fold.train.loader))
    fitting, size = None, 2
    while size <= len(fold.train.paths) // 4:
        try:
            repeat = -(-size // len(labels))
            batch = (images.repeat(repeat, 1, 1, 1)[:size], labels.repeat(repeat, *[1] * (labels.dim() - 1))[:size])
            forward_backward(fold.train_model, *_to(batch, fold), fold.step)
            optimizer_update(fold.train_model, fold.step)
            torch.cuda.synchronize()
            fitting, size = size, size * 2
        except torch.OutOfMemoryError:
            break
        finally:
            fold.step.optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
    if fitting is None:
        raise cli.UserError("--batch_size auto: not even 2 images fit on the GPU; lower --resize or use bf16")
    print(f"--batch_size auto: {fitting} (the largest power of two that fits on {runtime.device})")
    return fitting
