"""Reading back what the project wrote, checked: one validating reader per file kind.

A run folder's files are read again by later commands: config.json by inference and every tool,
oof.csv / val_predictions.csv by tune_bias.py, audit.py, persons.py, agecuts.py and
`ensemble.py --fit`, probability files by ensemble.py and `--pseudo_labels`. A file edited by
hand, cut short by a full disk or written by another version must not reach a prediction
unchecked: a NaN offset or weight turns every prediction into class 0 without a word. So each
reader checks types, ranges, finiteness, the class count and the label range, and a bad value is
one line (UserError) naming the file, the row or key, and what was expected.

- `read_json(path, what)`: a JSON object (a dict), or one line.
- `read_table(path)`: a CSV as strings (every cell present, no column twice).
- `numbers(...)`, `probabilities(...)`: columns of a table as checked arrays.
- `read_probs(path)`: a probability file of inference.py --save_probs (ImageID + a column per
  class).
- `check_config(config, path)` / `read_config(run_dir)`: a run's config.json, as inference and
  the tools need it.

Example: python -c "from maskcls import readers; print(readers.read_config('runs/exp')['classes'])"
"""
import json
import math
import os

import numpy as np
import pandas as pd

from maskcls.cli import UserError

ROW_SUM_TOLERANCE = 0.01  # probabilities rounded in a CSV still sum to 1 within this; logits do not
CONFIG_NAME = "config.json"
REFIT_DIR = "refit"  # train.py --refit: the full-data refit inside its run folder
ID_COLUMN = "ImageID"  # the first column of a probability file (inference.py --save_probs)


def read_json(path, what):
    """The JSON object (dict) in `path`; `what` names the file kind in the one-line errors."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found" if not os.path.exists(path) else f"{path} is not a file")
    try:
        with open(path) as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); expected {what}") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} holds a JSON {type(value).__name__}, expected {what} (a JSON object)")
    return value


def read_table(path):
    """A CSV as a DataFrame of strings: every cell present (a row cut short, as by a full disk,
    is refused), no column twice, at least one row."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found" if not os.path.exists(path) else f"{path} is not a file")
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, header=None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse {path}: {str(err).strip().splitlines()[-1]}") from None
    header = [str(name) for name in table.iloc[0]]
    duplicated = sorted({name for name in header if header.count(name) > 1})
    if duplicated:
        raise UserError(f"{path}: column(s) {', '.join(duplicated)} appear twice")
    table = table.iloc[1:].reset_index(drop=True).set_axis(header, axis=1)
    if table.empty:
        raise UserError(f"{path} has no rows")
    short = table.isna().any(axis=1).to_numpy()
    if short.any():
        row = int(np.flatnonzero(short)[0])
        raise UserError(f"{path}: row {row + 1} has {int(table.iloc[row].notna().sum())} of {len(header)} cells "
                        f"(a row cut short?)")
    return table


def _where(path, table, row, column, id_column):
    name = f" ({id_column} {table[id_column].iloc[row]!r})" if id_column in table else ""
    return f"{path}: row {row + 1}{name}, column {column!r}"


def numbers(path, table, column, integer=False, low=-math.inf, high=math.inf, id_column="path", expected=None):
    """A column as a checked array: numbers (whole numbers with `integer`), finite, in [low, high]."""
    raw = table[column]
    values = pd.to_numeric(raw, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(values) | (values < low) | (values > high)
    if integer:
        bad |= values != np.round(values)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        kind = "a whole number" if integer else "a number"
        expected = expected or (f"{kind} in [{low:g}, {high:g}]" if math.isfinite(high) or math.isfinite(low)
                                else f"a finite {kind[2:]}")
        raise UserError(f"{_where(path, table, row, column, id_column)}: {raw.iloc[row]!r} is not {expected}")
    return values.astype(np.int64) if integer else values


def probabilities(path, table, columns, id_column="path"):
    """[N, C] float64 of the class columns: each a probability in [0, 1], each row summing to 1."""
    probs = np.stack([numbers(path, table, c, low=0.0, high=1.0, id_column=id_column,
                              expected="a probability between 0 and 1") for c in columns], axis=1)
    sums = probs.sum(1)
    off = np.flatnonzero(np.abs(sums - 1) > ROW_SUM_TOLERANCE)
    if off.size:
        row = int(off[0])
        name = f" ({id_column} {table[id_column].iloc[row]!r})" if id_column in table else ""
        raise UserError(f"{path}: row {row + 1}{name} sums to {sums[row]:.4g}, not 1: expected softmax "
                        f"probabilities, not logits")
    return probs


def labels_in_range(path, table, column, num_classes, id_column="path"):
    return numbers(path, table, column, integer=True, low=0, high=num_classes - 1, id_column=id_column,
                   expected=f"a class index 0..{num_classes - 1}")


def read_probs(path):
    """(image_ids, class_names, probs [N, C] float64) of one probability file, checked
    (readers.py): ImageIDs once each, every cell a probability in [0, 1], rows summing to 1."""
    table = read_table(path)
    header = list(table.columns)
    if ID_COLUMN not in header:
        raise UserError(f"{path}: no {ID_COLUMN} column; expected {ID_COLUMN} then one column per class, "
                            f"found {','.join(header)}")
    class_names = [name for name in header if name != ID_COLUMN]
    if not class_names:
        raise UserError(f"{path}: no class columns after {ID_COLUMN}")
    image_ids = table[ID_COLUMN].tolist()
    seen = set()
    for row, image_id in enumerate(image_ids, 1):
        if image_id in seen:
            raise UserError(f"{path}: ImageID {image_id!r} appears twice (again at row {row})")
        seen.add(image_id)
    return image_ids, class_names, probabilities(path, table, class_names, id_column=ID_COLUMN)


def data_path(root, relative, source):
    """The image a held-out file names (`relative`, as split.csv writes it) under the data folder
    `root`: one line if it leaves that folder (`../`, an absolute path) or is missing."""
    full = os.path.normpath(os.path.join(root, relative))
    base = os.path.normpath(os.path.abspath(root))
    if os.path.isabs(relative) or os.path.commonpath([os.path.abspath(full), base]) != base:
        raise UserError(f"{source}: path {relative!r} leaves the data folder {root}")
    if not os.path.isfile(full):
        raise UserError(f"{source}: {relative!r} is not an image under {root} (moved, or another --data_dir?)")
    return full


# ---------------------------------------------------------------- config.json
def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value):
    """A finite int or float from a JSON file (a bool is not a number here)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _size(value):
    return isinstance(value, list) and len(value) == 2 and all(_is_int(v) and v > 0 for v in value)


def _triple(value, low, low_open=False):
    return isinstance(value, list) and len(value) == 3 and all(
        is_number(v) and (v > low if low_open else v >= low) for v in value)


def _rate(value):
    return value is None or (is_number(value) and 0 <= value < 1)


# key -> (check, what is expected, required in a single run's config.json)
CONFIG_KEYS = {
    "model": (lambda v: isinstance(v, str) and v.strip() != "", "a model name", True),
    "num_classes": (lambda v: _is_int(v) and v >= 2, "a whole number >= 2", True),
    "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v) and len(set(v)) == len(v),
                "a list of distinct class names", True),
    "input_size": (_size, "[H, W], two positive whole numbers", True),
    "prepared_size": (lambda v: v is None or _size(v), "[H, W], two positive whole numbers", False),
    "mean": (lambda v: _triple(v, 0.0), "three numbers >= 0 (R, G, B)", True),
    "std": (lambda v: _triple(v, 0.0, low_open=True), "three numbers > 0 (R, G, B)", True),
    "facecrop": (lambda v: isinstance(v, bool), "true or false", False),
    "face_margin": (lambda v: is_number(v) and 0 <= v <= 2, "a number in [0, 2]", False),
    "head": (lambda v: v in ("linear", "multitask"), "linear or multitask", False),
    "age_head": (lambda v: v in ("none", "regression"), "none or regression", False),
    "tasks": (lambda v: v is None or (isinstance(v, list) and all(_is_int(t) and t > 0 for t in v)),
              "null or a list of positive whole numbers", False),
    "msd": (lambda v: _is_int(v) and v >= 0, "a whole number >= 0", False),
    "msd_p": (_rate, "a rate in [0, 1)", False),
    "drop": (_rate, "null or a rate in [0, 1)", False),
    "drop_path": (_rate, "null or a rate in [0, 1)", False),
    "gp": (lambda v: v is None or (isinstance(v, str) and v != ""), "null or a pool type (avg, catavgmax...)", False),
}


def member_dirs(config, path=CONFIG_NAME):
    """The run folders a parent's config.json lists: a k-fold parent's folds (`fold_dirs`; runs
    from before it kept them under `folds`) or a seed group's runs (`seed_dirs`, train.py
    --seeds); [] for a single run. Each a plain folder name inside the parent."""
    key = "seed_dirs" if config.get("seed_dirs") is not None else "fold_dirs"
    dirs = config.get(key)
    if dirs is None and isinstance(config.get("folds"), list) and all(isinstance(f, str) for f in config["folds"]):
        dirs = config["folds"]
    if dirs is None:
        return []
    if not isinstance(dirs, list) or not all(isinstance(d, str) and d and d == os.path.basename(d)
                                             and d not in (".", "..") for d in dirs):
        raise UserError(f"{path}: {key} is {dirs!r}; expected a list of folder names inside the run (fold1, "
                        f"seed0, ...)")
    return list(dirs)



def check_config(config, path=CONFIG_NAME):
    """A run's config.json as inference and the tools read it: every key they use of the right
    type and range, the classes as many as num_classes. A parent (a k-fold run, a seed group)
    needs its member folders and classes only (its members are checked one by one)."""
    parent = bool(member_dirs(config, path))
    for key, (check, expected, required) in CONFIG_KEYS.items():
        if key not in config:
            if required and not (parent and key != "classes"):
                raise UserError(f"{path} lacks {key!r} ({expected})")
            continue
        if not check(config[key]):
            raise UserError(f"{path}: {key} is {config[key]!r}; expected {expected}")
    if not parent and len(config["classes"]) != config["num_classes"]:
        raise UserError(f"{path}: {len(config['classes'])} classes listed but num_classes is {config['num_classes']}")
    return config


def read_config(run_dir):
    """The checked config.json of a run folder (check_config), or one line."""
    path = os.path.join(run_dir, CONFIG_NAME)
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} is not a folder")
    if not os.path.isfile(path):
        raise UserError(f"{run_dir} is not a run folder: no {CONFIG_NAME}")
    return check_config(read_json(path, "a run's options"), path)
