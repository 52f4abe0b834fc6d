"""The campaign of runs: compare them, know whether a gain is real, log the leaderboard.

    python runs.py compare                      # every run under runs/, one row each
    python runs.py compare runs/a runs/b --sort val_f1 --filter model=BaseModel --markdown
    python runs.py diff runs/a runs/b           # is b better than a? paired bootstrap over persons
    python runs.py submit runs/b --score 0.7412 --note "b, 5 folds"   # a public leaderboard score
    python runs.py gap                          # validation against the leaderboard: PNG + Spearman

`compare` shows each run's scores (val F1 at the best epoch, out-of-fold F1 of a k-fold run,
per-task F1, the eval F1 that inference.py --answers recorded), best epoch, epochs and minutes,
and only the options that differ between the runs shown; a repeat over seeds (`train.py --seeds
0,1,2`) is one row of mean +- sd.

`diff A B` resamples the persons of the held-out images both runs predicted (the same
validation split, or the same images out of fold) 2,000 times and reports the macro F1
difference B - A with its 95% interval and the share of resamples in which B is better. Two seed
groups are paired seed by seed and the seeds are resampled too, so the seed spread is in the
interval. Runs that did not predict the same held-out images are refused in one line.

`submit` appends to runs/submissions.csv (the run's val and OOF F1 beside the public score);
`gap` draws validation against the leaderboard, one point per submission, and says in one line
whether validation ranks the submissions as the leaderboard does (Spearman's rank correlation).
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import math
import os
import time

import numpy as np
import pandas as pd

from maskcls import cli
from maskcls.atomic import check_outputs, write_csv
from maskcls.heldout import read_heldout
from maskcls.metrics import macro_f1, paired_bootstrap
from maskcls.readers import member_dirs, read_config
from maskcls.summary import METRICS, summarize

SUBMISSIONS = "submissions.csv"
SHOWN = ("val_f1", "oof_f1", "f1_mask", "f1_gender", "f1_age", "eval_f1", "best_epoch", "epochs", "minutes")
# options that name or place a run, or that the data decides: never "what differs" between runs
NOT_OPTIONS = {"name", "model_dir", "resume", "config", "fold_dirs", "seed_dirs", "seeds", "train_images",
               "val_images", "world_size", "classes", "num_classes", "mean", "std", "tasks", "label_scheme",
               "prepared_size", "input_size", "wandb"}


# ---------------------------------------------------------------- compare
def find_runs(root):
    """Every run folder directly under `root` (a k-fold or seed parent counts as one), oldest first."""
    if not os.path.isdir(root):
        raise cli.UserError(f"{root} is not a folder: train a run first (python train.py) or name runs")
    found = [e.path for e in os.scandir(root) if e.is_dir() and os.path.isfile(os.path.join(e.path, "config.json"))]
    return sorted(found, key=os.path.getmtime)


def differing_options(configs):
    """The option keys whose values differ between the configs (a key one of them lacks counts)."""
    keys = sorted(set().union(*configs) - NOT_OPTIONS)
    return [k for k in keys if len({repr(c.get(k)) for c in configs}) > 1]


def cell(row, key):
    value = row.get(key)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if key in ("best_epoch", "epochs") and row["seeds"] == 1:
        return str(int(value))
    text = f"{value:.1f}" if key == "minutes" else f"{value:.4f}" if key not in ("best_epoch", "epochs") else \
        f"{value:.1f}"
    spread = row.get(f"{key}_sd")
    return f"{text} ± {spread:.4f}" if spread is not None and not math.isnan(spread) and key in METRICS else text


def compare_table(rows, root=None):
    """A DataFrame of strings: run, the metrics, then the options that differ."""
    options = differing_options([r["config"] for r in rows])
    table = []
    for row in rows:
        name = os.path.relpath(row["run"], root) if root else row["run"]
        entry = {"run": name + (f" ({row['seeds']} seeds)" if row["kind"] == "seeds" else "")}
        entry.update({key: cell(row, key) for key in SHOWN})
        entry.update({key: _option(row["config"].get(key)) for key in options})
        table.append(entry)
    frame = pd.DataFrame(table, columns=["run", *SHOWN, *options])
    return frame.loc[:, [c for c in frame.columns if c == "run" or (frame[c] != "").any()]]


def _option(value):
    if isinstance(value, list):
        return ",".join(map(str, value))
    return "" if value is None else str(value)


def matches(row, filters):
    for key, value in filters:
        have = row.get(key) if key in row and key != "config" else row["config"].get(key)
        if _option(have) != value and str(have) != value:
            return False
    return True


def markdown(frame):
    lines = ["| " + " | ".join(frame.columns) + " |", "|" + "|".join(" --- " for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines)


def compare_main(args):
    runs = args.runs or find_runs(args.root)
    if not runs:
        raise cli.UserError(f"no run under {args.root}/: train one first (python train.py)")
    rows = [summarize(r) for r in runs]
    filters = [parse_filter(f) for f in args.filter or []]
    rows = [r for r in rows if matches(r, filters)]
    if not rows:
        raise cli.UserError(f"no run matches {' and '.join(f'{k}={v}' for k, v in filters)}")
    if args.sort:
        if args.sort not in rows[0] and args.sort not in rows[0]["config"]:
            raise cli.UserError(f"--sort {args.sort}: not a column or option; columns: {', '.join(SHOWN)}")
        rows.sort(key=lambda r: _sort_key(r, args.sort), reverse=args.sort in (*METRICS, "epochs", "best_epoch"))
    frame = compare_table(rows, None if args.runs else args.root)
    print(markdown(frame) if args.markdown else frame.to_string(index=False))
    if args.csv:
        check_outputs([args.csv], overwrite=True)
        write_csv(frame, args.csv)
        print(f"wrote {args.csv}")
    return frame


def _sort_key(row, key):
    value = row.get(key, row["config"].get(key))
    if isinstance(value, (int, float)):
        return (0, -math.inf if math.isnan(value) else value)
    return (1, str(value))


def parse_filter(text):
    key, eq, value = text.partition("=")
    if not eq or not key:
        raise cli.UserError(f"--filter {text}: expected key=value, e.g. model=BaseModel")
    return key.strip().replace("-", "_"), value.strip()


# ---------------------------------------------------------------- diff
def aligned(run_a, run_b):
    """(labels, preds_a, preds_b, groups, classes) of two runs' held-out predictions of the same
    images; one line where they are not the same images."""
    a, b = read_heldout(run_a), read_heldout(run_b)
    if a.classes != b.classes:
        raise cli.UserError(f"{run_a} and {run_b} have other classes: nothing to compare")
    if a.paths != b.paths or not (a.labels == b.labels).all():
        raise cli.UserError(f"{a.source} and {b.source} do not hold the same held-out images (another split or "
                            f"other folds: --seed changes them); compare runs of one split, or k-fold runs "
                            f"(oof.csv covers every image)")
    groups = a.persons if (a.persons != "").all() else np.array(a.paths)  # images where persons are unknown
    return a.labels, a.probs.argmax(1), b.probs.argmax(1), groups, a.classes


def pairs_of(run_a, run_b):
    """[(run a, run b)]: one pair, or seed groups paired seed by seed."""
    configs = [read_config(r) for r in (run_a, run_b)]
    groups = [bool(c.get("seed_dirs")) for c in configs]
    if groups == [False, False]:
        return [(run_a, run_b)]
    if groups != [True, True]:
        raise cli.UserError(f"{run_a if groups[1] else run_b} is a seed group and the other a single run: compare "
                            f"two groups (seed by seed) or two runs")
    seeds = [dict(zip((read_config(os.path.join(r, d)).get("seed") for d in member_dirs(c, r)),
                      (os.path.join(r, d) for d in member_dirs(c, r)))) for r, c in zip((run_a, run_b), configs)]
    common = sorted(set(seeds[0]) & set(seeds[1]))
    if not common:
        raise cli.UserError(f"{run_a} and {run_b} share no seed: nothing to pair")
    return [(seeds[0][s], seeds[1][s]) for s in common]


def diff_main(args):
    pairs = pairs_of(args.a, args.b)
    per_pair = [aligned(a, b) for a, b in pairs]
    num_classes = len(per_pair[0][4])
    start = time.perf_counter()
    diffs = paired_bootstrap([p[:4] for p in per_pair], num_classes, args.resamples, args.seed)
    observed = float(np.mean([macro_f1(l, pb, num_classes) - macro_f1(l, pa, num_classes)
                              for l, pa, pb, _, _ in per_pair]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    better = float((diffs > 0).mean())
    scores = [(macro_f1(l, pa, num_classes), macro_f1(l, pb, num_classes)) for l, pa, pb, _, _ in per_pair]
    persons = len(set(per_pair[0][3]))
    what = f"{len(pairs)} seed pairs, " if len(pairs) > 1 else ""
    print(f"A {args.a}: macro F1 {np.mean([s[0] for s in scores]):.4f}; B {args.b}: {np.mean([s[1] for s in scores]):.4f} "
          f"({what}{len(per_pair[0][0])} held-out images of {persons} persons)")
    print(f"B - A: {observed:+.4f}, 95% interval [{low:+.4f}, {high:+.4f}] ({args.resamples} paired resamples of "
          f"the persons{' and seeds' if len(pairs) > 1 else ''}, {time.perf_counter() - start:.1f}s); B better in "
          f"{better:.1%} of them: {verdict(low, high)}")
    return {"diff": observed, "low": float(low), "high": float(high), "p_better": better}


def verdict(low, high):
    if low > 0:
        return "B is better (the interval is above 0)"
    if high < 0:
        return "A is better (the interval is below 0)"
    return "no difference shown (the interval holds 0)"


# ---------------------------------------------------------------- the leaderboard
def submit_main(args):
    row = summarize(args.run)
    path = os.path.join(args.root, SUBMISSIONS)
    entry = {"time": time.strftime("%Y-%m-%d %H:%M"), "run": os.path.normpath(args.run), "score": args.score,
             "val_f1": row["val_f1"], "oof_f1": row["oof_f1"], "eval_f1": row["eval_f1"], "note": args.note or ""}
    table = read_submissions(path, missing_ok=True)
    table = pd.concat([table, pd.DataFrame([entry])], ignore_index=True) if len(table) else pd.DataFrame([entry])
    os.makedirs(args.root, exist_ok=True)
    write_csv(table.round(5), path)
    validation = [f"{name} {entry[key]:.4f}" for name, key in (("val F1", "val_f1"), ("out-of-fold F1", "oof_f1"))
                  if not math.isnan(entry[key])]
    print(f"recorded {args.run}: leaderboard {args.score:.4f} beside {', '.join(validation) or 'no validation score'}"
          f" -> {path} ({len(table)} submission(s))")


def read_submissions(path, missing_ok=False):
    if not os.path.isfile(path):
        if missing_ok:
            return pd.DataFrame()
        raise cli.UserError(f"{path} not found: record submissions first (python runs.py submit RUN --score S)")
    table = pd.read_csv(path)
    for column in ("run", "score", "val_f1", "oof_f1"):
        if column not in table:
            raise cli.UserError(f"{path}: no {column} column (written by runs.py submit)")
    return table


def gap_main(args):
    from scipy.stats import spearmanr
    table = read_submissions(os.path.join(args.root, SUBMISSIONS))
    validation = table["oof_f1"].where(table["oof_f1"].notna(), table["val_f1"]).astype(float)
    known = validation.notna() & table["score"].notna()
    if known.sum() < 2:
        raise cli.UserError(f"{int(known.sum())} submission(s) with a validation score: the gap needs 2 or more")
    x, y = validation[known].to_numpy(), table["score"][known].astype(float).to_numpy()
    rho = float(spearmanr(x, y).statistic) if len(x) > 2 else math.nan
    output = args.output or os.path.join(args.root, "gap.png")
    from maskcls import plots
    plots.gap_png(output, x, y, [os.path.basename(r) for r in table["run"][known]], rho)
    agree = "ranks the submissions as the leaderboard does" if rho > 0.7 else \
        "ranks them partly like the leaderboard" if rho > 0.3 else "does not rank them like the leaderboard"
    where = f"Spearman {rho:+.2f} over {len(x)} submissions" if len(x) > 2 else "2 submissions: too few to rank"
    print(f"validation {agree} ({where}); mean gap leaderboard - validation {float(np.mean(y - x)):+.4f} -> {output}")
    return rho


# ---------------------------------------------------------------- the command line
def get_args_parser():
    parser = cli.ArgumentParser(description="Compare runs, test whether a gain is real, log leaderboard scores.",
                                epilog="Every flag also has a kebab-case spelling (--resamples).")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{compare,diff,submit,gap}")
    compare = sub.add_parser("compare", help="one table of runs: scores, length, the options that differ")
    compare.add_argument("runs", nargs="*", metavar="RUN", help="run folders (default: every run under --root)")
    compare.add_argument("--root", default="runs", help="where the runs are")
    compare.add_argument("--sort", default=None, metavar="KEY", help="a column (val_f1, oof_f1, ...) or option")
    compare.add_argument("--filter", action="append", default=None, metavar="KEY=VALUE",
                         help="only runs whose option or column has this value (repeatable)")
    compare.add_argument("--csv", default=None, metavar="FILE", help="also write the table as CSV")
    cli.bool_flag(compare, "--markdown", help="print the table as Markdown")
    diff = sub.add_parser("diff", help="B - A in macro F1 on the same held-out images, with a 95%% interval")
    diff.add_argument("a", metavar="A", help="a run folder (or a seed group)")
    diff.add_argument("b", metavar="B", help="a run folder of the same held-out images (or a seed group)")
    diff.add_argument("--resamples", type=cli.number(int, 100), default=2000, help="bootstrap resamples")
    diff.add_argument("--seed", type=cli.number(int, 0), default=0, help="seeds the resampling")
    submit = sub.add_parser("submit", help="record a submission's public leaderboard score")
    submit.add_argument("run", metavar="RUN", help="the run folder the submission came from")
    submit.add_argument("--score", type=cli.number(float, 0, 1), required=True, help="its public score (macro F1)")
    submit.add_argument("--note", default=None, help="a word on what was submitted")
    submit.add_argument("--root", default="runs", help="where runs/submissions.csv lives")
    gap = sub.add_parser("gap", help="validation against the leaderboard: a PNG and Spearman's rank correlation")
    gap.add_argument("--root", default="runs", help="where runs/submissions.csv lives")
    gap.add_argument("--output", default=None, help="the PNG (default: <root>/gap.png)")
    return parser


COMMANDS = {"compare": compare_main, "diff": diff_main, "submit": submit_main, "gap": gap_main}


def main(args):
    return COMMANDS[args.command](args)


if __name__ == "__main__":
    cli.run(main, get_args_parser)
