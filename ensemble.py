"""Ensemble saved probability files into one submission, without touching a model.

Each input is what `inference.py --save_probs` writes: a CSV with `ImageID` first, then one
column per class named by the class names in class-index order (class index = position among
the probability columns), one row per image, values = softmax probabilities (rows sum to 1).
Every file must hold the same ImageIDs in the same order and the same class columns.

Methods (adding one: write `_name(stack, weights)` and add it to COMBINERS):
- `soft` (default): mean of the probabilities. The usual choice: confident models count more.
- `weighted`: weighted mean, one positive weight per file (`--weights 0.9,1,1`); giving
  `--weights` turns `soft` into `weighted`. Use it when one model is clearly better on validation.
- `hard`: majority vote of each file's argmax. Among the classes with the most votes, the one
  with the highest summed probability over the files wins; if still tied, the lowest class
  index. Helps when some models are over-confident (their probabilities are badly calibrated).
Ties in soft/weighted go to the lowest class index.

Output: with `--info`, info.csv's rows, columns and order with `ans` = the ensemble's class
index (a submission); without it, `ImageID,ans` in the files' order. `--save_probs` also writes
the combined probabilities as `<output stem>_probs.csv` in the input format (for `hard`: each
class's share of the votes), so an ensemble can itself be ensembled. An existing output is
kept unless `--overwrite` is given; an input file is never overwritten.

`--fit RUN RUN ...` fits the ensemble instead, on the runs' held-out predictions (oof.csv of
--kfold runs: every training image, so runs with different folds still align): greedy forward
selection with replacement (Caruana et al. 2004) adds, step by step, the member whose addition
raises the mean's macro F1 most, until no addition helps or --fit_steps; a member's weight is
its share of the picks. The gain is cross-fitted (the selection is redone on 4/5 of the persons
and scored on the rest), like tune_bias.py's. The result is a recipe (--recipe, JSON: members and
weights) that `inference.py --recipe FILE` follows.

Examples:
    python ensemble.py output/a_probs.csv output/b_probs.csv --info data/eval/info.csv
    python ensemble.py --fit runs/kf runs/kf2 runs/kf3 && python inference.py --recipe output/ensemble_recipe.json
    python ensemble.py a_probs.csv b_probs.csv c_probs.csv --weights 2,1,1 --output output/w.csv
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import os

import numpy as np
import pandas as pd

from maskcls import cli
from maskcls.atomic import check_outputs, write_csvs
from maskcls.readers import ID_COLUMN, read_probs, read_table



def get_args_parser():
    parser = cli.ArgumentParser(description="Combine saved probability files into one submission.",
                                epilog="Every flag also has a kebab-case spelling (--save-probs).")
    parser.add_argument("files", nargs="+", metavar="PROBS_CSV",
                        help="two or more probability files from inference.py --save_probs (with --fit: run folders)")
    parser.add_argument("--fit", action="store_true",
                        help="the arguments are run folders: fit members and weights on their out-of-fold "
                             "predictions and write --recipe")
    parser.add_argument("--recipe", default=os.path.join("output", "ensemble_recipe.json"), metavar="JSON",
                        help="with --fit: the recipe to write (inference.py --recipe reads it)")
    parser.add_argument("--fit_steps", type=cli.positive_int, default=25, help="with --fit: greedy picks at most")
    parser.add_argument("--method", choices=sorted(COMBINERS), default="soft",
                        help="soft: mean; weighted: weighted mean; hard: majority vote of the argmaxes")
    parser.add_argument("--weights", type=cli.parse_floats, default=None, metavar="W1,W2,...",
                        help="one positive weight per file; turns soft into weighted")
    parser.add_argument("--info", default=None, metavar="CSV",
                        help="info.csv (e.g. data/eval/info.csv): write its rows with ans filled in")
    parser.add_argument("--output", default=os.path.join("output", "ensemble.csv"), metavar="CSV",
                        help="the submission to write (kept if it exists, unless --overwrite)")
    cli.bool_flag(parser, "--save_probs", help="also write the combined probabilities to <output stem>_probs.csv")
    cli.bool_flag(parser, "--overwrite", help="replace an existing output file")
    return parser


def _first_difference(a, b):
    """Index of the first position where two sequences differ (the shorter length if one is a prefix)."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def _describe_difference(name_a, a, name_b, b, what):
    """One line saying where two lists (ImageIDs, class columns) first differ."""
    i = _first_difference(a, b)

    def side(name, items):
        return f"{items[i]!r} in {name}" if i < len(items) else f"missing from {name} ({len(items)} {what}s)"

    where = f"{what} {i + 1} is {side(name_a, a)} but {side(name_b, b)}"
    if len(a) == len(b) and sorted(a) == sorted(b):
        where += " (same entries, another order)"
    return where


def check_same_layout(paths, ids_list, classes_list):
    """Refuse files whose ImageIDs (in order) or class columns (names, order) differ from the first's."""
    for path, ids, classes in zip(paths[1:], ids_list[1:], classes_list[1:]):
        if classes != classes_list[0]:
            raise cli.UserError(f"{paths[0]} and {path} have different class columns: "
                                + _describe_difference(paths[0], classes_list[0], path, classes, "column"))
        if ids != ids_list[0]:
            raise cli.UserError(f"{paths[0]} and {path} do not hold the same ImageIDs in the same order: "
                                + _describe_difference(paths[0], ids_list[0], path, ids, "row"))


def _soft(stack, weights):
    return np.average(stack, axis=0, weights=weights)


def _hard(stack, weights):
    """Vote shares [N, C]; the tie-break (summed probability, then lowest index) happens in combine."""
    assert weights is None, "hard voting takes no weights"
    num_classes = stack.shape[2]
    votes = (stack.argmax(2)[..., None] == np.arange(num_classes)).sum(0)  # [N, C] votes per class
    return votes / stack.shape[0]


COMBINERS = {"soft": _soft, "weighted": _soft, "hard": _hard}


def check_weights(weights, num_files, method):
    """Weights as a float array, or None; raise a one-line error for a misuse."""
    if weights is None:
        if method == "weighted":
            raise cli.UserError(f"weighted voting needs one weight per file (--weights), e.g. "
                                f"{','.join(['1'] * num_files)}")
        return None
    if method == "hard":
        raise cli.UserError("hard voting takes no weights: use --method weighted (or soft) with --weights")
    weights = np.asarray(weights, dtype=np.float64)
    if len(weights) != num_files:
        raise cli.UserError(f"--weights has {len(weights)} value(s) for {num_files} files; give one per file")
    if not (np.isfinite(weights).all() and (weights > 0).all()):
        raise cli.UserError(f"--weights must all be positive numbers, got {','.join(f'{w:g}' for w in weights)}")
    return weights


def combine(prob_list, method="soft", weights=None):
    """(pred [N], combined [N, C]) from a list of [N, C] probability arrays.

    soft: mean; weighted (or soft with weights): weighted mean; hard: vote shares, and the
    prediction is the most-voted class, ties broken by the highest summed probability, then by
    the lowest class index.
    """
    if method not in COMBINERS:
        raise cli.UserError(f"Invalid method {method!r}. Only {', '.join(sorted(COMBINERS))} are supported.")
    stack = np.stack([np.asarray(p, dtype=np.float64) for p in prob_list])  # [files, N, C]
    assert stack.ndim == 3, f"expected a list of [N, C] arrays, got shape {stack.shape}"
    weights = check_weights(weights, len(prob_list), method)
    combined = COMBINERS[method](stack, weights)
    if method == "hard":
        tied = combined == combined.max(1, keepdims=True)
        pred = np.where(tied, stack.sum(0), -np.inf).argmax(1)  # argmax: the lowest index on a full tie
    else:
        pred = combined.argmax(1)
    return pred, combined


def read_info(path, image_ids):
    """info.csv's table, checked to list exactly `image_ids` in the same order."""
    table = read_table(path)
    if ID_COLUMN not in table:
        raise cli.UserError(f"{path}: no {ID_COLUMN} column; found {','.join(table.columns)}")
    info_ids = table[ID_COLUMN].tolist()
    if info_ids != image_ids:
        raise cli.UserError(f"{path} does not list the probability files' ImageIDs in their order: "
                            + _describe_difference(path, info_ids, "the probability files", image_ids, "row"))
    return table


def probs_path_for(output):
    return os.path.splitext(output)[0] + "_probs.csv"


def greedy_fit(prob_list, labels, steps=25):
    """Pick counts per member: forward selection with replacement on macro F1 of the running mean
    (ties: the lower log-loss). Starts from the best single member."""
    from maskcls.metrics import macro_f1
    num_classes = prob_list[0].shape[1]
    rows = np.arange(len(labels))

    def quality(mean):
        return macro_f1(labels, mean.argmax(1), num_classes), -np.log(np.clip(mean[rows, labels], 1e-12, None)).mean()

    counts = np.zeros(len(prob_list), dtype=int)
    total = np.zeros_like(prob_list[0])
    best = (-1.0, 0.0)
    for _ in range(steps):
        trials = [quality((total + p) / (counts.sum() + 1)) for p in prob_list]
        pick = max(range(len(prob_list)), key=lambda k: (trials[k][0], -trials[k][1]))
        f1, loss = trials[pick]
        if counts.sum() and (f1, -loss) <= (best[0], -best[1]):
            break
        counts[pick] += 1
        total += prob_list[pick]
        best = (f1, loss)
    return counts


def fit_recipe(run_dirs, steps=25, cv=5):
    """Members, weights and the report of a greedy ensemble fitted on the runs' held-out predictions."""
    from maskcls.heldout import parts, read_heldout
    from maskcls.metrics import macro_f1
    helds = [read_heldout(r) for r in run_dirs]
    for run_dir, held in zip(run_dirs[1:], helds[1:]):
        if held.classes != helds[0].classes:
            raise cli.UserError(f"cannot ensemble {run_dirs[0]} and {run_dir}: their classes differ")
        if held.paths != helds[0].paths or not (held.labels == helds[0].labels).all():
            raise cli.UserError(f"{helds[0].source} and {held.source} do not hold the same images with the same "
                                f"labels: fit on --kfold runs of the same data (their oof.csv covers every image)")
    labels, probs = helds[0].labels, [h.probs for h in helds]
    n = len(helds[0].classes)
    counts = greedy_fit(probs, labels, steps)
    weights = counts / counts.sum()
    crossed = np.zeros(len(labels), dtype=int)
    for val in parts(helds[0].persons, cv):
        train = np.setdiff1d(np.arange(len(labels)), val)
        fold_counts = greedy_fit([p[train] for p in probs], labels[train], steps)
        crossed[val] = sum(c * p[val] for c, p in zip(fold_counts, probs)).argmax(1)
    report = {"rows": len(labels), "fitted_on": [os.path.basename(h.source) for h in helds],
              "f1_members": [round(macro_f1(labels, p.argmax(1), n), 5) for p in probs],
              "f1_mean": round(macro_f1(labels, np.mean(probs, 0).argmax(1), n), 5),
              "f1_fitted_in_sample": round(macro_f1(labels, sum(w * p for w, p in zip(weights, probs)).argmax(1), n), 5),
              "f1_cross_fitted": round(macro_f1(labels, crossed, n), 5)}
    kept = [(r, float(w)) for r, w in zip(run_dirs, weights) if w > 0]
    return {"members": [r for r, _ in kept], "weights": [round(w, 6) for _, w in kept],
            "classes": helds[0].classes, **report}


def fit_main(args):
    from maskcls.atomic import write_json
    check_outputs([args.recipe], overwrite=args.overwrite)
    recipe = fit_recipe(args.files, args.fit_steps)
    folder = os.path.dirname(os.path.abspath(args.recipe))
    os.makedirs(folder, exist_ok=True)
    # members relative to the recipe's own folder: it works from any working folder
    write_json(args.recipe, {**recipe, "members": [os.path.relpath(os.path.abspath(m), folder)
                                                   for m in recipe["members"]]})
    for run_dir, f1 in zip(args.files, recipe["f1_members"]):
        weight = dict(zip(recipe["members"], recipe["weights"])).get(run_dir, 0.0)
        print(f"  {run_dir}: held-out macro F1 {f1:.4f}, weight {weight:.3f}")
    print(f"held-out macro F1 over {recipe['rows']} images: best member {max(recipe['f1_members']):.4f}, equal mean "
          f"{recipe['f1_mean']:.4f}, fitted {recipe['f1_fitted_in_sample']:.4f} in-sample, "
          f"{recipe['f1_cross_fitted']:.4f} cross-fitted")
    print(f"wrote {args.recipe}: python inference.py --recipe {args.recipe}")
    return args.recipe


def main(args):
    if args.fit:
        return fit_main(args)
    if len(args.files) < 2:
        raise cli.UserError(f"an ensemble needs at least 2 probability files, got {len(args.files)}")
    method = "weighted" if args.weights is not None and args.method == "soft" else args.method
    weights = check_weights(args.weights, len(args.files), method)  # flag mistakes before reading files
    probs_out = probs_path_for(args.output) if args.save_probs else None
    outputs = [p for p in (args.output, probs_out) if p]
    check_outputs(outputs, args.files + ([args.info] if args.info else []), args.overwrite)

    read = [read_probs(path) for path in args.files]
    ids_list, classes_list, prob_list = zip(*read)
    check_same_layout(args.files, ids_list, classes_list)
    image_ids, classes = ids_list[0], classes_list[0]
    submission = read_info(args.info, image_ids) if args.info else pd.DataFrame({ID_COLUMN: image_ids})

    pred, combined = combine(prob_list, method, weights)
    assert pred.shape == (len(image_ids),), "one prediction per image"
    assert pred.min() >= 0 and pred.max() < len(classes), "prediction outside the class range"
    submission["ans"] = pred

    tables = [submission]
    if probs_out:
        table = pd.DataFrame(combined, columns=classes)
        table.insert(0, ID_COLUMN, image_ids)
        tables.append(table)
    write_csvs(tables, outputs, args.overwrite)  # both or neither

    changed = int((pred != prob_list[0].argmax(1)).sum())
    detail = f"{method}, weights {','.join(f'{w:g}' for w in weights)}" if weights is not None else method
    print(f"ensembled {len(args.files)} files ({detail}) over {len(pred)} rows: {changed} differ from "
          f"{args.files[0]}'s argmax; wrote {' and '.join(outputs)}")
    return args.output


if __name__ == "__main__":
    cli.run(main, get_args_parser)
