"""Full-data refit (`--refit`): once the validated run is done, one more model trained on every
training image (the validation side included) for the epoch count validation chose (the run's
best epoch; a k-fold run's folds' median best epoch), into RUN/refit/. The model sees 20% more
data (a k-fold fold: 1/K more); its score is not measurable, so the run's validation (or
out-of-fold) F1 stays the estimate, recorded in refit/config.json as `refit_estimate`.

The refit is a run folder without validation (best.pth holds its last epoch, the EMA weights
with --model_ema), the same seed and recipe, its schedule fitted to its own length. inference.py
uses it when asked: `--checkpoint refit` (a seed group: every seed's refit).

Example: python train.py --refit True --epochs 30; then
         python inference.py --checkpoint refit
"""
import argparse
import math
import os
import statistics

from maskcls import distributed
from maskcls.fit import train_fold
from maskcls.readers import REFIT_DIR, read_json
from maskcls.runfolder import fold_status
from model import read_checkpoint


def best_epoch(run_dir):
    """(best epoch, its val F1) of a finished run folder, from its last.pth."""
    best = read_checkpoint(os.path.join(run_dir, "last.pth"))["best"]
    return int(best["epoch"]), float(best["val_f1"])


def refit_length(run_dir, fold_dirs=None):
    """(epochs, the estimate the refit inherits, how the epochs were chosen): the run's best
    epoch; with `fold_dirs`, the median of the folds' best epochs (rounded half up) and the
    out-of-fold F1."""
    if not fold_dirs:
        epoch, f1 = best_epoch(run_dir)
        return epoch, f1, f"the validated run's best epoch ({epoch}, val F1 {f1:.4f})"
    epochs = [best_epoch(os.path.join(run_dir, d))[0] for d in fold_dirs]
    median = math.floor(statistics.median(epochs) + 0.5)
    f1 = float(read_json(os.path.join(run_dir, "kfold.json"), "a k-fold summary")["oof_f1"])
    return median, f1, (f"the median of the folds' best epochs ({', '.join(map(str, epochs))}; out-of-fold F1 "
                        f"{f1:.4f})")


def refit_args(args, run_dir, epochs, estimate, resume):
    """The flags of the refit: the run's, on every image, for `epochs`, without validation. A switch
    set for an epoch the refit does not reach (SWA, augmentation or mixing off) is dropped."""
    late = {flag: 0 for flag in ("swa_start", "aug_off_epoch", "mix_off_epoch") if (getattr(args, flag) or 0) > epochs}
    if "swa_start" in late:
        late.update(swa_lr=None, swa_anneal_epochs=0)
    return argparse.Namespace(**{
        **vars(args), **late, "epochs": epochs, "kfold": 0, "folds": None, "val_ratio": 0.0, "patience": 0,
        "average_top": 0, "refit": False, "seeds": None, "name": REFIT_DIR, "model_dir": run_dir,
        "resume": os.path.join(run_dir, REFIT_DIR) if resume else None,
        "refit_of": os.path.abspath(run_dir), "refit_estimate": estimate})


def train_refit(args, data, splits, run_dir, runtime, cache=None):
    """RUN/refit: the recipe once more on every training image for the epochs validation chose;
    a finished refit is kept, an interrupted one continued."""
    context, folder = runtime.context, os.path.join(run_dir, REFIT_DIR)
    fold_dirs = [f"fold{i}" for i in (args.folds or range(1, len(splits) + 1))] if args.kfold else None
    found = distributed.broadcast(context, (fold_status(folder), refit_length(run_dir, fold_dirs))
                                  if context.is_main else None)
    (status, _), (epochs, estimate, why) = found
    if status == "done":
        print(f"refit: {folder} finished earlier")
        return folder
    everything = sorted(int(i) for i in (*splits[0][0], *splits[0][1]))  # a fold's two sides: every image
    print(f"=== refit{' (resumed)' if status == 'unfinished' else ''}: {epochs} epochs, {why}, on all "
          f"{len(everything) + len(data.extra)} training images -> {folder}")
    if context.is_main:
        os.makedirs(folder, exist_ok=True)
    distributed.barrier(context)
    train_fold(refit_args(args, run_dir, epochs, estimate, status == "unfinished"), data, (everything, []),
               folder, runtime, cache, resume=status == "unfinished")
    print(f"refit done: {folder} (its estimate stays the run's {estimate:.4f}; python inference.py --model_dir "
          f"{run_dir} --checkpoint refit)")
    return folder
