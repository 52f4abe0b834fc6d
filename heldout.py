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
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import f1_score

import cli
from atomic import write_json
from labels import AGE_BINS, TASKS
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
    """The run's held-out predictions. An --age_head regression run's probabilities are `refolded`
    with its age_cuts.json (as inference predicts); without, as validation saw them (30, 60)."""
    path = heldout_file(run_dir)
    try:
        frame = pd.read_csv(path, dtype={"path": str, "person": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise cli.UserError(f"cannot parse {path}: {str(err).strip().splitlines()[-1]}") from None
    fixed = {"path", "person", "fold", "label", "pred", *AGE_COLUMNS}
    classes = [c for c in frame.columns if c not in fixed]
    if not {"path", "label"} <= set(frame.columns) or not classes:
        raise cli.UserError(f"{path}: expected path, person, label, pred and one column per class")
    frame = frame.sort_values("path", kind="stable")
    probs = frame[classes].to_numpy(dtype=np.float64)
    if len(frame) == 0:
        raise cli.UserError(f"{path} has no rows")
    persons = frame["person"].to_numpy(dtype=str) if "person" in frame else np.full(len(frame), "")
    ages, ages_pred = (frame[c].to_numpy(dtype=np.float64) if c in frame else None for c in AGE_COLUMNS)
    if ages_pred is not None and refolded and cuts_file(run_dir):
        probs = refold(probs, ages_pred, *load_cuts(run_dir)[:2])
    return Heldout(path, frame["path"].tolist(), persons, frame["label"].to_numpy(dtype=int), probs, classes,
                   ages, ages_pred)


def macro_f1(labels, preds, num_classes):
    return float(f1_score(labels, preds, average="macro", labels=list(range(num_classes)), zero_division=0))


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


def load_bias(run_dir, classes):
    """(bias array, the file's report) of a run folder, or (None, None) where it has no bias.json."""
    path = os.path.join(run_dir, BIAS_FILE)
    if not os.path.isfile(path):
        return None, None
    try:
        with open(path) as f:
            saved = json.load(f)
        bias = np.asarray(saved["bias"], dtype=np.float64)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise cli.UserError(f"{path} is not a bias file ({err}); delete it or rerun tune_bias.py") from None
    if saved.get("classes") != list(classes) or bias.shape != (len(classes),):
        raise cli.UserError(f"{path} was fitted for other classes than the run's; rerun tune_bias.py")
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
    try:
        with open(path) as f:
            saved = json.load(f)
        low, high = (float(c) for c in saved["cuts"])
        width = float(saved["width"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise cli.UserError(f"{path} is not an age cut file ({err}); delete it or rerun agecuts.py") from None
    if not (low < high and width > 0):
        raise cli.UserError(f"{path}: needs cuts low < high and a positive width")
    return [low, high], width, path
