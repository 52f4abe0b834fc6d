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

Examples:
    python ensemble.py output/a_probs.csv output/b_probs.csv --info data/eval/info.csv
    python ensemble.py a_probs.csv b_probs.csv c_probs.csv --weights 2,1,1 --output output/w.csv
"""
import os

import numpy as np
import pandas as pd

import cli
from atomic import check_outputs, write_csvs

ID_COLUMN = "ImageID"
ROW_SUM_TOLERANCE = 0.01  # probabilities rounded in a CSV still sum to 1 within this; logits do not


def get_args_parser():
    parser = cli.ArgumentParser(description="Combine saved probability files into one submission.",
                                epilog="Every flag also has a kebab-case spelling (--save-probs).")
    parser.add_argument("files", nargs="+", metavar="PROBS_CSV",
                        help="two or more probability files from inference.py --save_probs")
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


def _read_table(path):
    """A CSV as strings, header row included as row 0 (so duplicate column names stay visible)."""
    if not os.path.isfile(path):
        raise cli.UserError(f"{path} not found" if not os.path.exists(path) else f"{path} is not a file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, header=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise cli.UserError(f"cannot parse {path}: {str(err).strip().splitlines()[-1]}") from None
    header = [str(name) for name in table.iloc[0]]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise cli.UserError(f"{path}: duplicate column(s) {', '.join(duplicated)}")
    return header, table.iloc[1:].reset_index(drop=True).set_axis(header, axis=1)


def read_probs(path):
    """(image_ids, class_names, probs [N, C] float64) of one probability file, checked."""
    header, table = _read_table(path)
    if ID_COLUMN not in header:
        raise cli.UserError(f"{path}: no {ID_COLUMN} column; expected {ID_COLUMN} then one column per class, "
                            f"found {','.join(header)}")
    class_names = [name for name in header if name != ID_COLUMN]
    if not class_names:
        raise cli.UserError(f"{path}: no class columns after {ID_COLUMN}")
    if table.empty:
        raise cli.UserError(f"{path}: no rows")
    image_ids = table[ID_COLUMN].tolist()
    seen = set()
    for row, image_id in enumerate(image_ids, 1):
        if image_id in seen:
            raise cli.UserError(f"{path}: ImageID {image_id!r} appears twice (again at row {row})")
        seen.add(image_id)

    probs = table[class_names].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise cli.UserError(f"{path}: row {row + 1} (ImageID {image_ids[row]!r}), column {class_names[col]!r}: "
                            f"{table[class_names[col]].iloc[row]!r} is not a probability between 0 and 1")
    sums = probs.sum(1)
    off = np.flatnonzero(np.abs(sums - 1) > ROW_SUM_TOLERANCE)
    if off.size:
        row = off[0]
        raise cli.UserError(f"{path}: row {row + 1} (ImageID {image_ids[row]!r}) sums to {sums[row]:.4g}, "
                            f"not 1: expected softmax probabilities, not logits")
    return image_ids, class_names, probs


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
    header, table = _read_table(path)
    if ID_COLUMN not in header:
        raise cli.UserError(f"{path}: no {ID_COLUMN} column; found {','.join(header)}")
    info_ids = table[ID_COLUMN].tolist()
    if info_ids != image_ids:
        raise cli.UserError(f"{path} does not list the probability files' ImageIDs in their order: "
                            + _describe_difference(path, info_ids, "the probability files", image_ids, "row"))
    return table


def probs_path_for(output):
    return os.path.splitext(output)[0] + "_probs.csv"


def main(args):
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
