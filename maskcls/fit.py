"""One fold's training, around `build_fold`'s parts: the run folder's first files
(`start_run_folder`), the epoch loop (`fit`: train, validate, keep the best, save last.pth, stop
early), and the last steps (`finish_run_folder`: averaged.pth, swa.pth, the final figures);
`train_kfold`: a fold after another, then oof.csv; `train_seeds`: the recipe once per seed (--seeds).

Example: python train.py --val_every 2 --patience 5 --checkpoint_hist 3 --average_top 3
"""
import argparse
import copy
import dataclasses
import math
import os
import shutil
import sys
import time

from dataset import write_split_csv
from maskcls import cli, distributed, plots
from maskcls.engine import evaluate, is_better, train_one_epoch, updates_per_epoch
from maskcls.data import read_source
from maskcls.fold import build_fold
from maskcls.heldout import write_oof, write_val_predictions
from maskcls.labels import AGE_NAMES, GENDER_NAMES, MASK_NAMES, TASKS, decode_label
from maskcls.metrics import macro_f1
from maskcls.runfolder import (PREVIEW_IMAGES, Checkpoint, RunLog, TopCheckpoints, best_epoch_figures, final_figures,
                               fold_status, open_run, run_status, spread, write_config)
from maskcls.summary import write_seed_summary
from maskcls.swa import has_batch_norm, refresh_bn
from model import load_weights, save_checkpoint

FIGURE_REFRESH_SECONDS = 300  # best-epoch figures take ~2 s: redrawn on a new best at most every 5 minutes


def start_run_folder(fold, data, split, checkpoint, state, args, run_dir, resume):
    """Rank 0, a new run: config.json, split.csv, a first last.pth (so that even an interrupted
    first epoch can be resumed) and the augmentation preview. Returns the RunLog."""
    if not resume:
        write_config(run_dir, fold.config)
        write_split_csv(os.path.join(run_dir, "split.csv"), data.source, *split, data.extra)
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
    off = fold.config.get("aug_off_epoch")
    if off and epoch >= off and fold.train.plain is not None:  # from here on, no augmentation
        fold.train.loader, fold.train.plain = fold.train.plain(), None
        print(f"epoch {epoch}: the training images go through the validation transform from now on "
              f"(--aug_off_epoch {off})")
    step.mixer.active = not (fold.config["mix_off_epoch"] and epoch >= fold.config["mix_off_epoch"])
    swa = fold.swa if fold.swa is not None and fold.swa.active(epoch) else None
    if swa is not None and swa.swa_lr:  # SWALR holds the rate from here on; the run's schedule stops
        swa.begin_epoch(epoch)
        step.on_updates = False
    step.updates = (epoch - 1) * updates_per_epoch(len(fold.train.loader), step.accum)  # the per-update clock
    row = {"epoch": epoch, "lr": max(group["lr"] for group in step.optimizer.param_groups)}
    fold.sampler.set_epoch(epoch)  # the order and augmentation of an epoch depend on (seed, epoch) alone
    row["train_loss"], row["train_acc"] = train_one_epoch(fold.train_model, fold.train.loader, step, fold.device,
                                                          f"epoch {epoch}/{epochs}", context)
    if swa is not None:
        swa.end_epoch(epoch, fold.net)
    val = validate(fold, fold.model, context) if validating else None
    row.update({k: v for k, v in (val or NO_VALIDATION).items() if k.startswith("val_")})
    weights = fold.net
    if step.ema is not None and (val is not None or not fold.validates):
        ema = ema_weights(fold, step.ema.module)
        if val is None:  # no validation: the average is the result
            weights = ema
        else:  # the average competes with the raw weights for best.pth
            ema_val = validate(fold, ema, context)
            row.update(ema_val_loss=ema_val["val_loss"], ema_val_f1=ema_val["val_f1"])
            if is_better(ema_val, val):
                val, weights = ema_val, ema
    if swa is None or not swa.swa_lr:
        step.scheduler.step(epoch, val["val_f1"] if val is not None else None)  # the next epoch's lr
    return row, val, weights


def ema_weights(fold, ema):
    """The EMA's weights as they are scored and saved: with --ema_bn_refresh (and BatchNorm), a copy
    whose BatchNorm statistics are recomputed over the training images, as SWA's average gets them;
    the average itself goes on untouched (its buffers stay timm's moving average)."""
    if not fold.config.get("ema_bn_refresh") or not has_batch_norm(ema):
        return ema
    fresh = copy.deepcopy(ema)
    refresh_bn(fresh, fold.train.loader, fold.device)
    return fresh


@dataclasses.dataclass
class BestFigures:
    """The best epoch's figures (confusion matrices, mistakes), drawn on a new best at most every
    FIGURE_REFRESH_SECONDS (the first 5 minutes into the run: a short run draws them once), and
    once more at the end for the final best."""
    fold: object  # fold.Fold
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
    """Rank 0, a new best epoch: best.pth and (when validated) val_predictions.csv."""
    checkpoint.save_best(weights, state["best"])
    if val is not None:
        write_val_predictions(os.path.join(run_dir, "val_predictions.csv"), fold.val.rows, val["labels"].tolist(),
                              val["probs"], fold.config["classes"], val.get("ages"))


def fit(fold, state, checkpoint, log, args, run_dir, context, clock, monitor=None):
    """The epoch loop: train, validate (every --val_every epochs and the last), keep the best
    (best.pth; without validation, the last epoch), the top K (--checkpoint_hist), save last.pth,
    stop early (--patience). Updates `state` and returns the best epoch's validation output (None
    when no epoch improved on the resumed best). `monitor(epoch, val_f1)` hears every validated
    epoch once it is saved (tune.py prunes there by raising)."""
    best_output, figures = None, BestFigures(fold, log) if context.is_main else None
    top = TopCheckpoints(run_dir, max(args.checkpoint_hist, args.average_top)) if context.is_main else None
    for epoch in range(state["epoch"] + 1, args.epochs + 1):
        tic = time.time()
        validating = fold.validates and (epoch % args.val_every == 0 or epoch == args.epochs)
        row, val, weights = run_epoch(fold, epoch, args.epochs, validating, context)
        # the highest val F1 so far (--patience counts from it); best.pth keeps it, or with
        # --select last every validated epoch (the last one is validated)
        improved = val is not None and is_better(val, state.get("peak") or state["best"])
        if improved:
            state["peak"] = {"val_f1": val["val_f1"], "epoch": epoch}
        is_best = not fold.validates or improved or (val is not None and args.select == "last")
        if is_best:
            scores = val or NO_VALIDATION
            state["best"] = {"val_f1": scores["val_f1"], "val_loss": scores["val_loss"], "val_acc": scores["val_acc"],
                             "epoch": epoch, "ema": weights is not fold.net}
            best_output = val
        if validating:
            state["bad_epochs"] = 0 if improved else state["bad_epochs"] + args.val_every
        state["epoch"] = epoch
        if context.is_main:  # metrics row first: a crash after it is redone on --resume
            seconds = time.time() - tic
            # the log marks the val F1 peaks (best.pth may hold a later epoch: --select last), and
            # every epoch of a run without validation (printed *last*)
            log.epoch({**row, "seconds": seconds}, improved or not fold.validates, clock.tick(seconds))
            if is_best:
                record_best(fold, checkpoint, val, weights, state, run_dir)
            if val is not None:
                top.consider(epoch, val["val_f1"], weights)
            checkpoint.save_last(state)
            if is_best and val is not None:  # after last.pth: an interrupt while drawing (~2 s) loses no epoch
                figures.maybe_draw(val, epoch)
        if monitor is not None and val is not None:
            monitor(epoch, row["val_f1"])
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


def train_fold(args, data, split, run_dir, runtime, cache=None, resume=False, clock=None, monitor=None):
    """Train one model on one `split` (train, val indices) into `run_dir` (or continue it:
    `resume`); `clock` counts the time left of the whole run; `monitor` as `fit`'s."""
    context, resize, precision = runtime.context, runtime.input_size, runtime.precision
    fold = build_fold(args, data, split, runtime, cache, resume)
    checkpoint = Checkpoint(run_dir, fold.checkpoint_parts(), args.model)
    state = fresh_state()
    if resume:
        state = {**state, **checkpoint.resume()}
        print(f"resuming {run_dir} after epoch {state['epoch']} (best {state['best']['val_f1']:.4f} at epoch "
              f"{state['best']['epoch']})")
    clock = clock or RunClock(args.epochs - state["epoch"])
    log = start_run_folder(fold, data, split, checkpoint, state, args, run_dir, resume) if context.is_main else None
    threads = runtime.threads
    on_cpu = f", {threads} compute thread{'s' if threads > 1 else ''}" if runtime.device.type == "cpu" else ""
    print(f"run {run_dir}: {args.model} at {resize[0]}x{resize[1]}, {len(fold.train.paths)} train / "
          f"{len(fold.val.paths)} val images, {fold.config['num_classes']} classes, {runtime.device} {precision.name}"
          f"{' channels_last' if precision.channels_last else ''}{on_cpu}", flush=True)
    if not fold.validates:
        print(f"no validation (--val_ratio 0): every epoch replaces best.pth, so it holds the last epoch's "
              f"{'EMA ' if args.ema else ''}weights; that is the result")
    started = time.time()
    try:
        best_output = fit(fold, state, checkpoint, log, args, run_dir, context, clock, monitor)
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
    best, peak = state["best"], state.get("peak")
    last = args.select == "last" and fold.validates
    kept = f"kept epoch {best['epoch']} (--select last)" if last else f"best epoch {best['epoch']}"
    higher = f" (the highest, {peak['val_f1']:.4f}, at epoch {peak['epoch']})" \
        if last and peak and peak["epoch"] != best["epoch"] else ""
    print(f"done in {(time.time() - started) / 60:.1f} min: {kept} "
          f"val_f1 {best['val_f1']:.4f} val_acc {best.get('val_acc', 0):.3f}{higher} -> {checkpoint.best}")
    if best_output is not None and context.is_main:
        for line in collapsed(best_output["labels"].numpy(), best_output["preds"].numpy(), fold.config["classes"],
                              fold.tasks is not None):
            print(f"warning: at the epoch best.pth keeps ({best['epoch']}) {line}", file=sys.stderr)


def train_kfold(args, data, splits, run_dir, runtime, cache, monitor=None):
    """--kfold K: one run folder per fold (fold1..foldK, or the --folds chosen) under `run_dir`, then
    oof.csv and kfold.json. --resume of the parent skips finished folds and continues the rest."""
    context = runtime.context
    chosen = args.folds or list(range(1, len(splits) + 1))
    fold_dirs = [f"fold{i}" for i in chosen]
    if context.is_main:
        write_config(run_dir, {**vars(args), "resume": None, "fold_dirs": fold_dirs, "classes": data.source.classes})
    paths = [os.path.join(run_dir, fold_dir) for fold_dir in fold_dirs]
    progress = distributed.broadcast(context, [fold_status(p) for p in paths] if context.is_main else None)
    clock = RunClock(sum(args.epochs - done for status, done in progress if status != "done"))
    for number, fold_dir, path, (status, _) in zip(chosen, fold_dirs, paths, progress):
        if status == "done":
            print(f"--- {fold_dir} of {len(splits)}: finished earlier")
            continue
        if context.is_main and status == "new":
            os.makedirs(path, exist_ok=True)
        distributed.barrier(context)
        print(f"--- {fold_dir} of {len(splits)}{' (resumed)' if status == 'unfinished' else ''}")
        # a monitor hears one step per epoch across the folds: fold 2's first epoch is step epochs + 1
        step = None if monitor is None else \
            (lambda epoch, f1, base=(number - 1) * args.epochs: monitor(base + epoch, f1))
        train_fold(args, data, splits[number - 1], path, runtime, cache, resume=status == "unfinished", clock=clock,
                   monitor=step)
    if context.is_main:
        summary = write_oof(run_dir, data.source, fold_dirs)
        print(f"k-fold: out-of-fold macro F1 {summary['oof_f1']:.4f}, per fold "
              f"{', '.join(f'{f:.4f}' for f in summary['fold_f1'])} -> {run_dir}")


def collapsed(labels, preds, classes, per_task):
    """A line per (sub-)task whose validation predictions are all one value though its labels are
    not: the model has not learned that task, whatever the macro F1 says of the rest."""
    tasks = [(name, [decode_label(y)[i] for y in labels], [decode_label(p)[i] for p in preds], names)
             for i, (name, names) in enumerate(zip(TASKS, (MASK_NAMES, GENDER_NAMES, AGE_NAMES)))] \
        if per_task else [("the class", list(labels), list(preds), classes)]
    lines = []
    for name, truth, guessed, names in tasks:
        if len(set(guessed)) == 1 and len(set(truth)) > 1:
            score = macro_f1(truth, guessed, len(names))
            lines.append(f"every validation image is predicted {names[guessed[0]]!r} for {name} (its macro F1 "
                         f"{score:.3f}): it is not learned; more epochs, a smaller --batch_size (more updates an "
                         f"epoch) or --gp catavgmax (a model pooling by average) can help")
    return lines


def finish_run_folder(fold, checkpoint, log, args, run_dir, context):
    """--average_top's averaged.pth (scored on validation), the best weights back into the model,
    then curves.png and gradcam.png."""
    if args.average_top:
        average_best(fold, args.average_top, run_dir, context)
    if fold.swa is not None:
        save_swa(fold, run_dir)
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
    save_average(fold, model, epochs, os.path.join(run_dir, "averaged.pth"), "the mean of")


def save_swa(fold, run_dir):
    """swa.pth: the SWA average of the epochs from --swa_start on, its BatchNorm refreshed, scored."""
    swa = fold.swa
    if not swa.averaged:
        print(f"swa: the run ended before epoch {swa.start}: no swa.pth")
        return
    epochs = list(range(swa.start, swa.start + swa.averaged))
    save_average(fold, swa.model.module, epochs, os.path.join(run_dir, "swa.pth"), "the SWA average of")


def save_average(fold, model, epochs, path, what):
    """An average of weights into `path`: its BatchNorm statistics recomputed over the training
    images first (an average of weights is not trained with the average of their statistics),
    then scored on validation."""
    refreshed = refresh_bn(model, fold.train.loader, fold.device)
    scores = {}
    if fold.validates:
        result = validate(fold, model, distributed.Context())
        scores = {k: result[k] for k in ("val_f1", "val_loss", "val_acc")}
    save_checkpoint({"model": model.state_dict(), "epochs": epochs, "bn_refreshed": refreshed, **scores}, path)
    f1 = f" val_f1 {scores['val_f1']:.4f}" if scores else ""
    name = os.path.basename(path)
    print(f"{name}: {what} epochs {', '.join(map(str, epochs))}{f1}"
          f"{', BatchNorm recomputed over the training images' if refreshed else ''} "
          f"(python inference.py --checkpoint {name})")


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


def train_seeds(args, runtime, run_one):
    """--seeds S1,S2,...: the recipe (`run_one(args, runtime)`, train.py's run_training) once per
    seed, each into RUN/seed<S> (a run, or a k-fold parent with --kfold), then RUN/seeds.json.
    --resume of the group skips finished seeds and continues the rest."""
    context, seed_dirs = runtime.context, [f"seed{s}" for s in args.seeds]
    classes = read_source(args).classes  # the data checked before the group's folder exists
    with open_run(args.model_dir, args.name, args.resume, args.epochs, context) as run_dir:
        if context.is_main and not args.resume:
            write_config(run_dir, {**vars(args), "resume": None, "seed_dirs": seed_dirs, "classes": classes})
        for number, (seed, seed_dir) in enumerate(zip(args.seeds, seed_dirs), 1):
            member = os.path.join(run_dir, seed_dir)
            status = distributed.broadcast(context, run_status(member) if context.is_main else None)
            if status == "done":
                print(f"=== seed {seed} ({number} of {len(args.seeds)}): finished earlier")
                continue
            if status == "new" and context.is_main and os.path.isdir(member):
                shutil.rmtree(member)  # a start in which no epoch finished
            print(f"=== seed {seed} ({number} of {len(args.seeds)}){' (resumed)' if status == 'unfinished' else ''}")
            one = {"seed": seed, "seeds": None, "model_dir": run_dir, "name": seed_dir,
                   "resume": member if status == "unfinished" else None}
            run_one(argparse.Namespace(**{**vars(args), **one}), runtime)
        if context.is_main:
            write_seed_summary(run_dir)
    return run_dir
