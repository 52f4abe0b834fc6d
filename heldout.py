"""A run's held-out predictions, and the per-class bias fitted on them.

Every run folder holds predictions for images its model did not train on: a k-fold parent's
`oof.csv` (each training image once, from the fold that held it out) and a single run's
`val_predictions.csv` (its validation side at the best epoch). `tune_bias.py`, `audit.py` and
`ensemble.py --fit` read them through `read_heldout`; `inference.py` applies a run's `bias.json`
through `load_bias` and `apply_bias`.

Example: python tune_bias.py runs/kf     # then python inference.py --model_dir runs/kf
"""
import json
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.metrics import f1_score

import cli
from atomic import write_json

BIAS_FILE = "bias.json"


@dataclass
class Heldout:
    """One run's held-out predictions, sorted by path."""
    source: str          # the file read
    paths: list          # image paths as written by the run (split.csv's)
    persons: np.ndarray  # person of each image ('' where unknown)
    labels: np.ndarray   # [N] int: the labels trained on (after --relabel)
    probs: np.ndarray    # [N, C] float64 softmax probabilities
    classes: list


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


def read_heldout(run_dir):
    path = heldout_file(run_dir)
    try:
        frame = pd.read_csv(path, dtype={"path": str, "person": str}, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise cli.UserError(f"cannot parse {path}: {str(err).strip().splitlines()[-1]}") from None
    fixed = {"path", "person", "fold", "label", "pred"}
    classes = [c for c in frame.columns if c not in fixed]
    if not {"path", "label"} <= set(frame.columns) or not classes:
        raise cli.UserError(f"{path}: expected path, person, label, pred and one column per class")
    frame = frame.sort_values("path", kind="stable")
    probs = frame[classes].to_numpy(dtype=np.float64)
    if len(frame) == 0:
        raise cli.UserError(f"{path} has no rows")
    persons = frame["person"].to_numpy(dtype=str) if "person" in frame else np.full(len(frame), "")
    return Heldout(path, frame["path"].tolist(), persons, frame["label"].to_numpy(dtype=int), probs, classes)


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
