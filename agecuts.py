"""Age bands from a regressed age: the cut points fitted on a run's held-out predictions.

With `--age_head regression` a model regresses the person's age in years beside its 18 classes,
and its age band comes from that age and two cut points instead of from the classifier (see
model.AgeRegressionHead). Training validates with the competition's edges, 30 and 60; but a
regression pulls the ages of the scarce 60+ people towards the mean, so other edges can score a
higher macro F1. This fits them on the held-out predictions (oof.csv of a --kfold run,
val_predictions.csv of a single run): every pair of cut points on a half-year grid is scored
by macro F1, the pair nearest (30, 60) winning ties. As with tune_bias.py, the gain is
cross-fitted by person (fitted on all parts but one, scored on that one); the fitted cut points
are kept only when that gain is positive, else the run keeps 30 and 60. Then the band's softness
(`width`, in years: what ensembles and the probability files see) is fitted by log-loss.

train.py does this at the end of every --age_head regression run (RUN/age_cuts.json) and
inference.py applies the file; run it again by hand with:

Example: python agecuts.py runs/kf
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import os

import numpy as np

from maskcls import cli
from maskcls.atomic import write_json
from maskcls.heldout import AGE_CUTS_FILE, parts, read_heldout, refold
from maskcls.labels import AGE_BINS, AGE_NAMES, NUM_CLASSES
from maskcls.metrics import macro_f1

LOW_CUTS = np.arange(20.0, 45.01, 0.5)   # the grid of the lower edge (<30 | 30-59) ...
HIGH_CUTS = np.arange(45.0, 65.01, 0.5)  # ... and of the upper one (30-59 | 60+), in years
WIDTHS = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)


def get_args_parser():
    parser = cli.ArgumentParser(description="Fit the age cut points of an --age_head regression run on its "
                                            "held-out predictions; inference.py applies them.",
                                epilog="Every flag also has a kebab-case spelling (--dry-run).")
    parser.add_argument("run", metavar="RUN", help="an --age_head regression run folder (oof.csv or "
                                                   "val_predictions.csv)")
    parser.add_argument("--cv", type=cli.number(int, 2), default=5,
                        help="parts (split by person) for the cross-fitted estimate of the gain")
    cli.bool_flag(parser, "--dry_run", help="report only; write nothing")
    return parser


def cut_preds(rest, ages, low, high):
    """18-class predictions: the mask x gender index `rest` with the band of `ages` at edges low, high."""
    return rest * len(AGE_NAMES) + (ages >= low).astype(int) + (ages >= high).astype(int)


def fit_cuts(rest, ages, labels):
    """(low, high, macro F1): the grid pair with the best macro F1, the nearest to (30, 60) on ties."""
    best = (-1.0, 0.0, *AGE_BINS)
    for low in LOW_CUTS:
        for high in HIGH_CUTS[HIGH_CUTS > low]:
            f1 = macro_f1(labels, cut_preds(rest, ages, low, high), NUM_CLASSES)
            distance = abs(low - AGE_BINS[0]) + abs(high - AGE_BINS[1])
            if (f1, -distance) > (best[0], best[1]):
                best = (f1, -distance, low, high)
    return float(best[2]), float(best[3]), best[0]


def fit_width(probs, ages, labels, cuts):
    """The band softness with the lowest log-loss of the labels."""
    losses = [-np.log(np.clip(refold(probs, ages, cuts, w)[np.arange(len(labels)), labels], 1e-12, None)).mean()
              for w in WIDTHS]
    return float(WIDTHS[int(np.argmin(losses))])


def tune(held, cv=5):
    """(cuts, width, report) for a Heldout with regressed ages (heldout.read_heldout)."""
    if held.ages_pred is None:
        raise cli.UserError(f"{held.source} has no age_pred column: not an --age_head regression run")
    if len(held.labels) < 2 * cv:
        raise cli.UserError(f"{held.source} has {len(held.labels)} rows: too few for --cv {cv}")
    ages, labels = held.ages_pred, held.labels
    rest = held.probs.reshape(len(labels), -1, len(AGE_NAMES)).sum(-1).argmax(1)
    default = cut_preds(rest, ages, *AGE_BINS)
    before = macro_f1(labels, default, NUM_CLASSES)
    preds, gains = default.copy(), []
    for val in parts(held.persons, cv):
        train = np.setdiff1d(np.arange(len(labels)), val)
        low, high, _ = fit_cuts(rest[train], ages[train], labels[train])
        preds[val] = cut_preds(rest[val], ages[val], low, high)
        gains.append(macro_f1(labels[val], preds[val], NUM_CLASSES)
                     - macro_f1(labels[val], default[val], NUM_CLASSES))
    low, high, in_sample = fit_cuts(rest, ages, labels)
    cross_fitted = macro_f1(labels, preds, NUM_CLASSES)
    cuts = [low, high] if cross_fitted > before else list(AGE_BINS)
    report = {"fitted_on": os.path.basename(held.source), "rows": len(labels), "cv": cv,
              "fitted_cuts": [low, high], "f1_default_cuts": round(before, 5),
              "f1_cross_fitted": round(cross_fitted, 5), "f1_in_sample": round(in_sample, 5),
              "part_gains": [round(g, 5) for g in gains]}
    if held.ages is not None and (held.ages >= 0).any():
        known = held.ages >= 0
        report["age_mae"] = round(float(np.abs(ages[known] - held.ages[known]).mean()), 3)
    return cuts, fit_width(held.probs, ages, labels, cuts), report


def save_cuts(run_dir, cuts, width, report):
    write_json(os.path.join(run_dir, AGE_CUTS_FILE), {"cuts": [float(c) for c in cuts], "width": width, **report})


def describe(cuts, report):
    kept = "fitted" if list(cuts) != list(AGE_BINS) else f"kept {AGE_BINS[0]:g}, {AGE_BINS[1]:g} (fitted " \
        f"{report['fitted_cuts'][0]:g}, {report['fitted_cuts'][1]:g} do not gain cross-fitted)"
    mae = f"; regressed age off by {report['age_mae']:.1f} years on average" if "age_mae" in report else ""
    return (f"age cut points {cuts[0]:g}, {cuts[1]:g} ({kept}): {report['fitted_on']} macro F1 "
            f"{report['f1_default_cuts']:.4f} at {AGE_BINS[0]:g}, {AGE_BINS[1]:g}, {report['f1_cross_fitted']:.4f} cross-fitted, "
            f"{report['f1_in_sample']:.4f} in-sample{mae}")


def fit_run(run_dir, cv=5, dry_run=False):
    """Fit, print, and (unless `dry_run`) write RUN/age_cuts.json; returns (cuts, width, report)."""
    cuts, width, report = tune(read_heldout(run_dir, refolded=False), cv)
    print(describe(cuts, report) + f"; band width {width:g} years")
    if not dry_run:
        save_cuts(run_dir, cuts, width, report)
        print(f"wrote {os.path.join(run_dir, AGE_CUTS_FILE)}: inference.py --model_dir {run_dir} applies it")
    return cuts, width, report


def fit_trained_run(run_dir):
    """After an --age_head regression run: the cut points fitted on its held-out predictions."""
    if any(os.path.isfile(os.path.join(run_dir, name)) for name in ("oof.csv", "val_predictions.csv")):
        fit_run(run_dir)
    else:
        print("age cut points: no held-out predictions (--val_ratio 0); inference uses 30, 60")


def main(args):
    fit_run(args.run, args.cv, args.dry_run)


if __name__ == "__main__":
    cli.run(main, get_args_parser)
