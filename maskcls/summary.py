"""What a run folder says about itself, in one row: its scores (val F1 at the best epoch, the
out-of-fold F1 of a k-fold run, the per-task F1, the eval F1 of inference.py --answers), its best
epoch, length and minutes, and its options. A repeat over seeds (`train.py --seeds`) is one
group: each metric's mean, standard deviation, minimum and maximum over its seed runs
(`seeds.json`). `runs.py compare` prints these rows side by side.

Example: python runs.py compare runs/a runs/b --sort val_f1
"""
import math
import os

import numpy as np
import pandas as pd

from maskcls.atomic import write_json
from maskcls.cli import UserError
from maskcls.readers import member_dirs, read_config, read_json

EVAL_SCORES = "eval_scores.csv"  # inference.py --answers of this run alone: one row per scoring
SEEDS_FILE = "seeds.json"        # train.py --seeds: the summary over its seed runs
METRICS = ("val_f1", "oof_f1", "f1_mask", "f1_gender", "f1_age", "eval_f1")
TASK_COLUMNS = {"f1_mask": "val_f1_mask", "f1_gender": "val_f1_gender", "f1_age": "val_f1_age"}


def kind_of(config):
    """'seeds' (train.py --seeds parent), 'kfold' (a k-fold parent) or 'run'."""
    if config.get("seed_dirs"):
        return "seeds"
    return "kfold" if member_dirs(config) else "run"


def read_metrics(run_dir):
    path = os.path.join(run_dir, "metrics.csv")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} has no metrics.csv: no epoch has finished there")
    try:
        return pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse {path}: {str(err).strip().splitlines()[-1]}") from None


def eval_score(run_dir):
    """The eval macro F1 of the latest `inference.py --answers` of this run alone with its
    best.pth (not swa.pth, averaged.pth or its refit), or NaN."""
    path = os.path.join(run_dir, EVAL_SCORES)
    if not os.path.isfile(path):
        return math.nan
    scores = pd.read_csv(path)
    if "checkpoint" in scores:
        scores = scores[scores["checkpoint"].fillna("best.pth") == "best.pth"]
    return float(scores["macro_f1"].iloc[-1]) if len(scores) and "macro_f1" in scores else math.nan


def single_summary(run_dir, config):
    """A single run: its best epoch's val F1 (of the raw or EMA weights, as best.pth) and per-task
    F1, its length and minutes."""
    metrics = read_metrics(run_dir)
    best = best_epoch(metrics)
    scores = [best.get(key, math.nan) for key in ("val_f1", "ema_val_f1")]
    row = {"val_f1": float(np.nanmax(scores)) if np.isfinite(scores).any() else math.nan, "oof_f1": math.nan,
           "best_epoch": int(best["epoch"]), "epochs": int(metrics["epoch"].max()),
           "minutes": float(metrics["seconds"].sum()) / 60}
    for key, column in TASK_COLUMNS.items():
        row[key] = float(best[column]) if column in best else math.nan
    return row


def kfold_summary(run_dir, config):
    """A k-fold parent: its out-of-fold F1 (kfold.json) and per-task F1 (oof.csv), its folds'
    mean val F1, median best epoch and total minutes."""
    folds = [single_summary(os.path.join(run_dir, d), read_config(os.path.join(run_dir, d)))
             for d in member_dirs(config, os.path.join(run_dir, "config.json"))
             if os.path.isfile(os.path.join(run_dir, d, "metrics.csv"))]
    if not folds:
        raise UserError(f"{run_dir}: no fold has finished an epoch")
    row = {"val_f1": float(np.mean([f["val_f1"] for f in folds])),
           "best_epoch": int(np.median([f["best_epoch"] for f in folds])),
           "epochs": max(f["epochs"] for f in folds), "minutes": sum(f["minutes"] for f in folds),
           "oof_f1": math.nan, **{key: math.nan for key in TASK_COLUMNS}}
    if os.path.isfile(os.path.join(run_dir, "kfold.json")):
        saved = read_json(os.path.join(run_dir, "kfold.json"), "a k-fold summary")
        row["oof_f1"] = float(saved.get("oof_f1", math.nan))
        if config.get("label_scheme", "mask") == "mask" and os.path.isfile(os.path.join(run_dir, "oof.csv")):
            from maskcls.heldout import read_heldout
            from maskcls.labels import MASK_CLASSES
            from maskcls.metrics import task_f1
            held = read_heldout(run_dir, refolded=False)
            if held.classes == MASK_CLASSES:
                row.update({f"f1_{task}": f1 for task, f1 in task_f1(held.labels, held.preds).items()})
    return row


def summarize(run_dir):
    """One row for a run folder: 'run' (its path), 'kind', the METRICS, best epoch, epochs,
    minutes, 'seeds' (how many runs a seed group averages; 1 otherwise) and 'config' (the options
    as the run used them: a parent's are its first member's, resolved)."""
    config = read_config(run_dir)
    kind = kind_of(config)
    if kind == "seeds":
        return group_summary(run_dir, config)
    row = (kfold_summary if kind == "kfold" else single_summary)(run_dir, config)
    if kind == "kfold":
        first = os.path.join(run_dir, member_dirs(config)[0])
        config = {**read_config(first), "fold_dirs": config["fold_dirs"]} if os.path.isfile(
            os.path.join(first, "config.json")) else config
    return {"run": run_dir, "kind": kind, **row, "eval_f1": eval_score(run_dir), "seeds": 1, "config": config}


def group_summary(run_dir, config):
    """A seed group: every number the mean over its seed runs, with `<key>_sd`, `_min`, `_max`."""
    members = [os.path.join(run_dir, d) for d in member_dirs(config, os.path.join(run_dir, "config.json"))]
    rows = [summarize(m) for m in members if os.path.isfile(os.path.join(m, "config.json"))]
    rows = [r for r in rows if r is not None]
    if not rows:
        raise UserError(f"{run_dir}: none of its seed runs has finished an epoch")
    seeds = ",".join(str(r["config"].get("seed")) for r in rows)
    out = {"run": run_dir, "kind": "seeds", "seeds": len(rows), "config": {**rows[0]["config"], "seed": seeds},
           "member_kind": rows[0]["kind"], "members": [r["run"] for r in rows]}
    for key in (*METRICS, "best_epoch", "epochs", "minutes"):
        values = np.array([r[key] for r in rows], dtype=np.float64)
        known = values[np.isfinite(values)]
        out[key] = float(known.mean()) if known.size else math.nan
        out[f"{key}_sd"] = float(known.std(ddof=1)) if known.size > 1 else math.nan
        out[f"{key}_min"], out[f"{key}_max"] = (float(known.min()), float(known.max())) if known.size else (
            math.nan, math.nan)
    out["eval_f1"] = out["eval_f1"] if math.isfinite(out["eval_f1"]) else eval_score(run_dir)
    return out


def write_seed_summary(run_dir):
    """seeds.json of a seed group: each metric's mean, sd, min, max and per-seed values; one line
    says the spread of its val (and out-of-fold) F1."""
    row = summarize(run_dir)
    members = [summarize(m) for m in row["members"]]
    summary = {"seeds": [m["config"].get("seed") for m in members], "runs": [os.path.basename(m["run"]) for m in members],
               "metrics": {key: {"mean": row[key], "sd": row[f"{key}_sd"], "min": row[f"{key}_min"],
                                 "max": row[f"{key}_max"], "values": [m[key] for m in members]}
                           for key in (*METRICS, "best_epoch", "minutes") if math.isfinite(row[key])}}
    write_json(os.path.join(run_dir, SEEDS_FILE), summary)
    spread = [f"{key} {m['mean']:.4f} ± {m['sd']:.4f} (min {m['min']:.4f}, max {m['max']:.4f})"
              for key, m in summary["metrics"].items() if key in ("val_f1", "oof_f1") and m["sd"] == m["sd"]]
    print(f"seeds {', '.join(map(str, summary['seeds']))}: {'; '.join(spread) or 'see seeds.json'} -> "
          f"{os.path.join(run_dir, SEEDS_FILE)}")
    return summary


def best_epoch(metrics):
    """The row train.py keeps as best.pth (engine.is_better): the highest val F1 of the raw or EMA
    weights, a tie to the later epoch; without validation (no val_f1), the last epoch."""
    score = metrics["val_f1"]
    if "ema_val_f1" in metrics.columns:
        score = np.fmax(score, metrics["ema_val_f1"])
    if score.isna().all():
        return metrics.iloc[-1]
    best = score.max()
    return metrics[score == best].iloc[-1]
