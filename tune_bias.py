"""Fit a per-class logit bias for macro F1 on a run's held-out predictions.

Macro F1 weighs every class alike, while a model trained on cross-entropy favours the frequent
ones: the scarce 60+ classes are predicted too rarely. Adding a per-class offset to the logits
before the argmax moves the decision boundaries towards the rare classes. For the competition's
18 classes the offsets are per mask state, gender and age band (8 numbers: a class's bias is the
sum of its three; `--per class` fits all 18, which overfits the few 60+ people). They are fitted
by coordinate ascent on macro F1 (one class at a time, each over a grid of values, the value
nearest 0 winning ties, rounds until nothing improves) on the run's out-of-fold probabilities
(oof.csv of a --kfold run, val_predictions.csv of a single run).

Fitting and scoring on the same rows would report a gain that is partly noise, so the gain is
cross-fitted: the rows are split by person into --cv parts, the bias is fitted on all parts but
one and scored on that one, and the held-out predictions of all parts give the reported F1. The
bias saved (RUN/bias.json) is then fitted on every row. It is saved only when the cross-fitted
F1 beats the unbiased one (--force saves it anyway); `inference.py --model_dir RUN` applies it
and says so, `--no_bias` turns it off.

Example: python tune_bias.py runs/kf
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import os
import time

import numpy as np

from maskcls import cli
from maskcls.heldout import BIAS_FILE, biased_preds, parts, read_heldout, save_bias
from maskcls.labels import MASK_CLASSES, TASKS, decode_label
from maskcls.metrics import macro_f1


def get_args_parser():
    parser = cli.ArgumentParser(description="Fit per-class logit offsets for macro F1 on a run's held-out "
                                            "predictions; inference.py applies them.",
                                epilog="Every flag also has a kebab-case spelling (--max-bias).")
    parser.add_argument("run", metavar="RUN", help="a run folder with oof.csv (--kfold) or val_predictions.csv")
    parser.add_argument("--cv", type=cli.number(int, 2), default=5,
                        help="parts (split by person) for the cross-fitted estimate of the gain")
    parser.add_argument("--max_bias", type=cli.number(float, 0, low_open=True), default=2.0,
                        help="largest offset tried, in logits (either sign)")
    parser.add_argument("--step", type=cli.number(float, 0, low_open=True), default=0.05,
                        help="grid step of the offsets, in logits")
    parser.add_argument("--per", choices=("auto", "factor", "class"), default="auto",
                        help="factor: an offset per mask state, gender and age band (8; auto for the "
                             "competition's classes); class: one per class (auto otherwise)")
    parser.add_argument("--rounds", type=cli.positive_int, default=4, help="coordinate-ascent passes at most")
    cli.bool_flag(parser, "--force", help="save the bias even when the cross-fitted F1 does not improve")
    cli.bool_flag(parser, "--dry_run", help="report only; write nothing")
    return parser


def offset_grid(max_bias, step):
    """Offsets -max..max in `step`s, nearest 0 first (ties go to the smaller offset)."""
    grid = np.round(np.arange(-max_bias, max_bias + step / 2, step), 6)
    return grid[np.argsort(np.abs(grid), kind="stable")]


def bias_basis(classes, per):
    """[C, P] matrix: bias = basis @ offsets. `class`: one offset per class; `factor` (the
    competition's 18 classes): one per mask state, gender and age band (8 offsets, each shared by
    the classes of its value: far fewer to fit on the few 60+ people)."""
    if per == "class":
        return np.eye(len(classes))
    if list(classes) != MASK_CLASSES:
        raise cli.UserError("--per factor needs the competition's 18 classes; use --per class")
    columns = []
    for task, size in enumerate(TASKS.values()):
        for value in range(size):
            columns.append([float(decode_label(c)[task] == value) for c in range(len(classes))])
    return np.array(columns).T


def fit_bias(log_probs, labels, grid, rounds=4, basis=None):
    """Offsets maximizing macro F1 of argmax(log_probs + basis @ offsets), by coordinate ascent;
    returns the per-class bias and its F1."""
    num_classes = log_probs.shape[1]
    basis = np.eye(num_classes) if basis is None else basis
    offsets = np.zeros(basis.shape[1])
    best = macro_f1(labels, log_probs.argmax(1), num_classes)
    for _ in range(rounds):
        improved = False
        for k in range(len(offsets)):
            trial = offsets.copy()
            for value in grid:
                trial[k] = value
                score = macro_f1(labels, biased_preds(log_probs, basis @ trial), num_classes)
                if score > best + 1e-12:
                    best, offsets[k], improved = score, value, True
        if not improved:
            break
    return basis @ offsets, best


def cross_fitted(log_probs, labels, persons, grid, cv, rounds, basis):
    """Predictions of every row with a bias fitted without its part; and each part's F1 gain."""
    num_classes = log_probs.shape[1]
    preds = log_probs.argmax(1).copy()
    gains = []
    for val in parts(persons, cv):
        train = np.setdiff1d(np.arange(len(labels)), val)
        bias, _ = fit_bias(log_probs[train], labels[train], grid, rounds, basis)
        preds[val] = biased_preds(log_probs[val], bias)
        gains.append(macro_f1(labels[val], preds[val], num_classes)
                     - macro_f1(labels[val], log_probs[val].argmax(1), num_classes))
    return preds, gains


def tune(run_dir, cv=5, max_bias=2.0, step=0.05, rounds=4, per="auto"):
    """The fitted bias and its report (F1 before, cross-fitted, in-sample; per-part gains)."""
    held = read_heldout(run_dir)
    num_classes = len(held.classes)
    if len(held.labels) < 2 * cv:
        raise cli.UserError(f"{held.source} has {len(held.labels)} rows: too few for --cv {cv}")
    per = ("factor" if held.classes == MASK_CLASSES else "class") if per == "auto" else per
    basis = bias_basis(held.classes, per)
    log_probs = np.log(np.clip(held.probs, 1e-12, None))
    grid = offset_grid(max_bias, step)
    before = macro_f1(held.labels, log_probs.argmax(1), num_classes)
    preds, gains = cross_fitted(log_probs, held.labels, held.persons, grid, cv, rounds, basis)
    bias, in_sample = fit_bias(log_probs, held.labels, grid, rounds, basis)
    report = {"fitted_on": os.path.basename(held.source), "rows": len(held.labels), "cv": cv, "per": per,
              "f1_before": round(before, 5),
              "f1_cross_fitted": round(macro_f1(held.labels, preds, num_classes), 5),
              "f1_in_sample": round(in_sample, 5), "part_gains": [round(g, 5) for g in gains]}
    return bias, held.classes, report


def main(args):
    start = time.perf_counter()
    bias, classes, report = tune(args.run, args.cv, args.max_bias, args.step, args.rounds, args.per)
    gain = report["f1_cross_fitted"] - report["f1_before"]
    print(f"{report['fitted_on']}: {report['rows']} rows; macro F1 {report['f1_before']:.4f} unbiased, "
          f"{report['f1_cross_fitted']:.4f} with a bias fitted on the other {args.cv - 1} of {args.cv} parts "
          f"(gain {gain:+.4f}; per part {', '.join(f'{g:+.3f}' for g in report['part_gains'])}), "
          f"{report['f1_in_sample']:.4f} in-sample ({time.perf_counter() - start:.1f}s)")
    moved = [f"{name} {b:+.2f}" for name, b in zip(classes, bias) if b]
    print(f"offsets: {', '.join(moved) if moved else 'none'}")
    path = os.path.join(args.run, BIAS_FILE)
    if args.dry_run:
        print("dry run: nothing written")
    elif gain > 0 or args.force:
        save_bias(args.run, bias, classes, report)
        print(f"wrote {path}: inference.py --model_dir {args.run} applies it (--no_bias: off)")
    else:
        print("not saved: the cross-fitted F1 does not improve (--force saves it anyway)")
        if os.path.isfile(path):
            os.remove(path)
            print(f"removed the earlier {path}")


if __name__ == "__main__":
    cli.run(main, get_args_parser)
