"""A run's held-out predictions, the per-class bias fitted on them, and an age head's cut points.

Every run folder holds predictions for images its model did not train on: a k-fold parent's
`oof.csv` (each training image once, from the fold that held it out) and a single run's
`val_predictions.csv` (its validation side at the best epoch). `tune_bias.py`, `audit.py` and
`ensemble.py --fit` read them through `read_heldout`; `inference.py` applies a run's `bias.json`
through `load_bias` and `apply_bias`. An `--age_head regression` run's files also hold each
image's age and regressed age (`age`, `age_pred`); agecuts.py fits its age_cuts.json on them,
and `read_heldout` gives its probabilities with those cut points (`refold`), as inference does.

Example: python tune_bias.py runs/kf     # then python inference.py --model_dir runs/kf
"""
import csv
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from dataset import resolve_train_dir
from maskcls import cli
from maskcls.atomic import replacing, write_json
from maskcls.labels import AGE_BINS, MAX_AGE, TASKS
from maskcls.metrics import macro_f1
from maskcls.readers import is_number, labels_in_range, numbers, probabilities, read_config, read_json, read_table
from model import AGE_WIDTH, fold_age

BIAS_FILE = "bias.json"
AGE_CUTS_FILE = "age_cuts.json"  # agecuts.py: an --age_head regression run's age band edges
AGE_COLUMNS = ("age", "age_pred")  # --age_head regression: the person's age and the regressed one


@dataclass
class Heldout:
    """One run's held-out predictions, sorted by path."""
    source: str          # the file read
    paths: list          # image paths as written by the run (split.csv's)
    persons: np.ndarray  # person of each image ('' where unknown)
    labels: np.ndarray   # [N] int: the labels trained on (after --relabel)
    probs: np.ndarray    # [N, C] float64 softmax probabilities
    classes: list
    ages: np.ndarray = None       # --age_head regression: the person's age in years (-1: unknown) ...
    ages_pred: np.ndarray = None  # ... and the regressed one
    preds: np.ndarray = None      # [N] int: the prediction the run recorded (argmax of its probabilities)


def heldout_file(run_dir):
    """oof.csv for a k-fold parent, val_predictions.csv for a single run; a clear error otherwise."""
    for name in ("oof.csv", "val_predictions.csv"):
        path = os.path.join(run_dir, name)
        if os.path.isfile(path):
            return path
    if not os.path.isdir(run_dir):
        raise cli.UserError(f"{run_dir} is not a folder")
    raise cli.UserError(f"{run_dir} has neither oof.csv (a --kfold run) nor val_predictions.csv (a run with a "
                        f"validation side): nothing held out to fit on")


def read_heldout(run_dir, refolded=True):
    """The run's held-out predictions, every value checked (readers.py): a path per row, once; a
    label and pred within the run's classes (config.json); a probability per class in [0, 1],
    rows summing to 1; ages finite. An --age_head regression run's probabilities are `refolded`
    with its age_cuts.json (as inference predicts); without, as validation saw them (30, 60)."""
    path = heldout_file(run_dir)
    classes = read_config(run_dir)["classes"]
    table = read_table(path)
    fixed = {"path", "person", "fold", "label", "pred", *AGE_COLUMNS}
    found = [c for c in table.columns if c not in fixed]
    if "path" not in table or "label" not in table:
        raise cli.UserError(f"{path}: expected columns path, person, label, pred and one per class; found "
                            f"{', '.join(table.columns)}")
    if found != list(classes):
        shown = ", ".join(found[:3]) + (", ..." if len(found) > 3 else "")
        raise cli.UserError(f"{path} has {len(found)} class column(s) ({shown}); the run has {len(classes)} "
                            f"classes ({os.path.join(run_dir, 'config.json')}): "
                            f"expected one column per class, in its order")
    empty = (table["path"].str.strip() == "").to_numpy()
    if empty.any():
        raise cli.UserError(f"{path}: row {int(np.flatnonzero(empty)[0]) + 1} has no path")
    twice = table["path"].duplicated().to_numpy()
    if twice.any():
        raise cli.UserError(f"{path}: {table['path'].iloc[int(np.flatnonzero(twice)[0])]!r} appears twice")
    labels = labels_in_range(path, table, "label", len(classes))
    probs = probabilities(path, table, classes)
    preds = labels_in_range(path, table, "pred", len(classes)) if "pred" in table else probs.argmax(1)
    ages = numbers(path, table, "age", low=-1, high=MAX_AGE) if "age" in table else None
    ages_pred = numbers(path, table, "age_pred", low=-MAX_AGE, high=2 * MAX_AGE) if "age_pred" in table else None
    order = np.argsort(table["path"].to_numpy(dtype=str), kind="stable")
    persons = table["person"].to_numpy(dtype=str)[order] if "person" in table else np.full(len(table), "")
    ages, ages_pred = (None if a is None else a[order] for a in (ages, ages_pred))
    probs = probs[order]
    if ages_pred is not None and refolded and cuts_file(run_dir):
        probs = refold(probs, ages_pred, *load_cuts(run_dir)[:2])
    return Heldout(path, table["path"].to_numpy(dtype=str)[order].tolist(), persons, labels[order], probs,
                   list(classes), ages, ages_pred, preds[order])


def biased_preds(log_probs, bias):
    return (log_probs + bias).argmax(1)


def apply_bias(probs, bias):
    """Probabilities after adding `bias` to their logits (a softmax of log p + bias): argmax moves
    where the bias says, rows still sum to 1."""
    logits = np.log(np.clip(probs, 1e-12, None)) + np.asarray(bias, dtype=np.float64)
    logits -= logits.max(1, keepdims=True)
    out = np.exp(logits)
    return out / out.sum(1, keepdims=True)


def save_bias(run_dir, bias, classes, report):
    write_json(os.path.join(run_dir, BIAS_FILE), {"classes": list(classes), "bias": [round(float(b), 4) for b in bias],
                                                  **report})


MAX_BIAS = 50.0  # logits: an offset beyond this overrides any model (tune_bias.py's grid stops at --max_bias)
BIAS_REPORT = {"f1_before": "a macro F1 in [0, 1]", "f1_cross_fitted": "a macro F1 in [0, 1]",
               "fitted_on": "a file name"}  # what inference prints of the report


def load_bias(run_dir, classes):
    """(bias array, the file's report) of a run folder, or (None, None) where it has no bias.json.
    Every offset finite and within MAX_BIAS, fitted for the run's classes; the report's fields
    that inference prints of the right type."""
    path = os.path.join(run_dir, BIAS_FILE)
    if not os.path.isfile(path):
        return None, None
    saved = read_json(path, "per-class offsets from tune_bias.py")
    bias = saved.get("bias")
    if not isinstance(bias, list) or not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in bias):
        raise cli.UserError(f"{path}: bias is {bias!r}; expected a list of numbers (rerun tune_bias.py)")
    bias = np.asarray(bias, dtype=np.float64)
    if saved.get("classes") != list(classes) or bias.shape != (len(classes),):
        raise cli.UserError(f"{path} was fitted for other classes than the run's; rerun tune_bias.py")
    bad = np.flatnonzero(~np.isfinite(bias) | (np.abs(bias) > MAX_BIAS))
    if bad.size:
        raise cli.UserError(f"{path}: the offset of {classes[bad[0]]} is {bias[bad[0]]}; expected a finite number "
                            f"of logits within +-{MAX_BIAS:g} (rerun tune_bias.py)")
    for key, expected in BIAS_REPORT.items():
        value = saved.get(key)
        ok = value is None or (isinstance(value, str) if key == "fitted_on" else is_number(value) and 0 <= value <= 1)
        if not ok:
            raise cli.UserError(f"{path}: {key} is {value!r}; expected {expected}")
    return bias, saved


# ---------------------------------------------------------------- --age_head regression
def refold(probs, ages, cuts, width):
    """[N, 18] probabilities whose age band is re-derived from the regressed `ages` with other cut
    points (the mask x gender part is kept): what the model gives with `cuts` and `width` set."""
    logits = torch.from_numpy(np.log(np.clip(probs, 1e-12, None)))
    folded = fold_age(logits, torch.from_numpy(np.array(ages, dtype=np.float64)),
                      torch.tensor(cuts, dtype=torch.float64), float(width), tuple(TASKS.values()))
    return folded.double().exp().numpy()


def cuts_file(run_dir):
    """A run's age_cuts.json, or its k-fold parent's for a fold folder; None where there is none."""
    for folder in (run_dir, os.path.dirname(os.path.normpath(run_dir))):
        path = os.path.join(folder, AGE_CUTS_FILE)
        if os.path.isfile(path) and (folder == run_dir or os.path.isfile(os.path.join(folder, "kfold.json"))):
            return path
    return None


def load_cuts(run_dir):
    """(cuts, width, path) of a run's age_cuts.json; the training defaults and None without one."""
    path = cuts_file(run_dir)
    if path is None:
        return list(AGE_BINS), AGE_WIDTH, None
    saved = read_json(path, "age cut points from agecuts.py")
    cuts, width = saved.get("cuts"), saved.get("width")
    if not (isinstance(cuts, list) and len(cuts) == 2 and all(map(is_number, [*cuts, width]))):
        raise cli.UserError(f"{path}: expected cuts [low, high] and width, finite numbers of years; found cuts "
                            f"{cuts!r}, width {width!r} (rerun agecuts.py)")
    low, high, width = float(cuts[0]), float(cuts[1]), float(width)
    if not (0 < low < high < MAX_AGE and 0 < width <= MAX_AGE):
        raise cli.UserError(f"{path}: needs cuts 0 < low < high < {MAX_AGE} and a positive width, found {low:g}, "
                            f"{high:g}, width {width:g}")
    return [low, high], width, path


def write_val_predictions(path, rows, labels, probs, classes, ages_pred=None):
    """val_predictions.csv of the best epoch: path, person, label, pred, (with an age head: the age
    and the regressed age) and one probability per class (what the mistakes grid, bias tuning, the
    label audit, agecuts.py and oof.csv read)."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "person", "label", "pred", *(AGE_COLUMNS if ages_pred is not None else ()),
                         *classes])
        for k, ((image, person, age), label, p) in enumerate(zip(rows, labels, probs)):
            regressed = () if ages_pred is None else (age, round(float(ages_pred[k]), 2))
            writer.writerow([image, person, int(label), int(p.argmax()), *regressed, *p.round(6)])



def write_oof(run_dir, source, fold_dirs):
    """oof.csv (one row per held-out image of the folds trained: its fold's prediction, from the
    fold's val_predictions.csv, read back checked) and kfold.json."""
    helds = [read_heldout(os.path.join(run_dir, fold_dir), refolded=False) for fold_dir in fold_dirs]
    frames = []
    for fold_dir, held in zip(fold_dirs, helds):
        ages = {} if held.ages_pred is None else {"age": held.ages, "age_pred": held.ages_pred}
        frame = pd.DataFrame({"path": held.paths, "person": held.persons, "fold": int(fold_dir[len("fold"):]),
                              "label": held.labels, "pred": held.preds, **ages})
        frames.append(pd.concat([frame, pd.DataFrame(held.probs, columns=held.classes)], axis=1))
    oof = pd.concat(frames).sort_values("path", kind="stable")
    with replacing(os.path.join(run_dir, "oof.csv")) as tmp:
        oof.to_csv(tmp, index=False)
    summary = {"oof_f1": macro_f1(oof["label"], oof["pred"], source.num_classes),
               "fold_f1": [macro_f1(h.labels, h.preds, source.num_classes) for h in helds],
               "fold_dirs": list(fold_dirs)}
    write_json(os.path.join(run_dir, "kfold.json"), summary)
    return summary


def parts(persons, cv, seed=0):
    """Row indices of `cv` parts; people never span two parts (rows without a person: by row)."""
    from sklearn.model_selection import GroupKFold, KFold  # here: scikit-learn's splitters load in ~0.5 s
    n = len(persons)
    if (persons != "").all() and len(set(persons)) >= cv:
        rng = np.random.default_rng(seed)  # GroupKFold is deterministic by size; shuffle people first
        names = np.unique(persons)
        order = {name: i for i, name in enumerate(rng.permutation(names))}
        groups = np.array([order[p] for p in persons])
        return [val for _, val in GroupKFold(cv).split(np.zeros(n), groups=groups)]
    return [val for _, val in KFold(cv, shuffle=True, random_state=seed).split(np.zeros(n))]


def training_root(run_dir, data_dir):
    """The training folder a run's held-out paths refer to: --data_dir, else its config.json's."""
    if data_dir is None:
        data_dir = read_config(run_dir).get("data_dir")
    if not isinstance(data_dir, str) or not data_dir:
        raise cli.UserError(f"{os.path.join(run_dir, 'config.json')} names no data_dir; pass --data_dir")
    return resolve_train_dir(data_dir)
