"""The campaign of runs (issue 22): runs.py compare / diff / submit / gap, train.py --seeds and
validate.py, on run folders written here (quick) and on real trainings (slow)."""
import json
import os

import numpy as np
import pandas as pd
import pytest

from conftest import FAST, one_line_error
from maskcls.labels import MASK_CLASSES
from maskcls.metrics import macro_f1, paired_bootstrap

CONFIG = {"model": "BaseModel", "num_classes": 18, "classes": MASK_CLASSES, "input_size": [64, 48],
          "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25], "lr": 0.001, "epochs": 3, "seed": 0,
          "criterion": "cross_entropy", "name": "x", "model_dir": "runs"}


def fake_run(folder, preds, labels, persons, val_f1s=(0.2, 0.4, 0.3), **options):
    """A single run folder as train.py leaves it: config.json, metrics.csv, val_predictions.csv."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({**CONFIG, **options}))
    pd.DataFrame({"epoch": range(1, len(val_f1s) + 1), "train_loss": 1.0, "train_acc": 0.5, "val_loss": 1.0,
                  "val_acc": 0.5, "val_f1": val_f1s, "lr": 0.001, "seconds": 30.0, "val_f1_mask": 0.9,
                  "val_f1_gender": 0.8, "val_f1_age": 0.7}).to_csv(folder / "metrics.csv", index=False)
    probs = np.full((len(preds), 18), 0.01 / 17)
    probs[np.arange(len(preds)), preds] = 0.99
    frame = pd.DataFrame(probs.round(6), columns=MASK_CLASSES)
    frame.insert(0, "pred", preds)
    frame.insert(0, "label", labels)
    frame.insert(0, "person", persons)
    frame.insert(0, "path", [f"images/{p}/{i % 7}.jpg" for i, p in enumerate(persons)])
    frame.to_csv(folder / "val_predictions.csv", index=False)
    return folder


def heldout(persons=100, accuracy=0.7, seed=0):
    """(labels, preds, persons) of a model right on `accuracy` of 7 photos of each person."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(rng.integers(0, 18, persons), 7)
    preds = np.where(rng.random(len(labels)) < accuracy, labels, rng.integers(0, 18, len(labels)))
    return labels, preds, np.repeat([f"p{i:03d}" for i in range(persons)], 7)


# ---------------------------------------------------------------- compare
def test_compare_shows_scores_and_only_the_options_that_differ(tmp_path, run_here):
    labels, preds, persons = heldout()
    fake_run(tmp_path / "runs" / "a", preds, labels, persons)
    fake_run(tmp_path / "runs" / "b", preds, labels, persons, val_f1s=(0.5, 0.6, 0.6), lr=0.003)
    result = run_here("runs.py", "compare", "--root", tmp_path / "runs", "--csv", tmp_path / "c.csv")
    table = pd.read_csv(tmp_path / "c.csv", dtype=str, keep_default_na=False)
    assert list(table["run"]) == ["a", "b"]
    assert list(table["val_f1"]) == ["0.4000", "0.6000"] and list(table["best_epoch"]) == ["2", "3"]
    assert "lr" in table.columns and not {"epochs_opt", "criterion", "model", "seed"} & set(table.columns)
    assert list(table["lr"]) == ["0.001", "0.003"] and list(table["minutes"]) == ["1.5", "1.5"]
    result = run_here("runs.py", "compare", "--root", tmp_path / "runs", "--sort", "val_f1", "--filter",
                      "criterion=cross_entropy", "--markdown")
    assert result.stdout.splitlines()[0].startswith("| run | val_f1") and "| b |" in result.stdout.splitlines()[2]
    result = run_here("runs.py", "compare", "--root", tmp_path / "runs", "--filter", "lr=0.003")
    assert " b " in result.stdout and " a " not in result.stdout


def test_compare_reads_a_seed_group_as_mean_and_sd(tmp_path, run_here):
    from maskcls.summary import write_seed_summary
    group = tmp_path / "runs" / "rep"
    labels, preds, persons = heldout()
    for seed, best in zip((0, 1, 2), (0.4, 0.5, 0.6)):
        fake_run(group / f"seed{seed}", preds, labels, persons, val_f1s=(0.1, best), seed=seed)
    (group / "config.json").write_text(json.dumps({**CONFIG, "seeds": [0, 1, 2], "seed_dirs": ["seed0", "seed1",
                                                                                                  "seed2"]}))
    summary = write_seed_summary(str(group))
    assert summary["seeds"] == [0, 1, 2] and summary["metrics"]["val_f1"]["mean"] == pytest.approx(0.5)
    assert summary["metrics"]["val_f1"]["sd"] == pytest.approx(0.1) and summary["metrics"]["val_f1"]["max"] == 0.6
    fake_run(tmp_path / "runs" / "single", preds, labels, persons)
    result = run_here("runs.py", "compare", "--root", tmp_path / "runs")
    line = next(line for line in result.stdout.splitlines() if "rep" in line)
    assert "rep (3 seeds)" in line and "0.5000 ± 0.1000" in line and "0,1,2" in line


# ---------------------------------------------------------------- diff
def test_diff_of_a_run_against_itself_is_an_interval_around_zero(tmp_path, run_here):
    labels, preds, persons = heldout()
    run = fake_run(tmp_path / "a", preds, labels, persons)
    result = run_here("runs.py", "diff", run, run)
    assert "B - A: +0.0000, 95% interval [+0.0000, +0.0000]" in result.stdout and "holds 0" in result.stdout


def test_diff_finds_a_planted_better_model(tmp_path, run_here):
    labels, preds, persons = heldout(accuracy=0.6)
    better = preds.copy()
    wrong = np.flatnonzero(better != labels)
    fixed = np.random.default_rng(1).choice(wrong, len(wrong) // 3, replace=False)
    better[fixed] = labels[fixed]  # a third of A's mistakes put right
    a = fake_run(tmp_path / "a", preds, labels, persons)
    b = fake_run(tmp_path / "b", better, labels, persons)
    result = run_here("runs.py", "diff", a, b)
    low = float(result.stdout.split("interval [")[1].split(",")[0])
    assert low > 0 and "B is better" in result.stdout and "B better in 100.0%" in result.stdout
    assert "A is better" in run_here("runs.py", "diff", b, a).stdout


def test_paired_bootstrap_folds_the_seed_spread_in():
    labels, a0, persons = heldout(seed=0)
    rng = np.random.default_rng(5)  # another model of the same images
    b0 = np.where(rng.random(len(labels)) < 0.7, labels, rng.integers(0, 18, len(labels)))
    one = paired_bootstrap([(labels, a0, b0, persons)], 18, 1000)
    both = paired_bootstrap([(labels, a0, b0, persons), (labels, b0, a0, persons)], 18, 1000)
    observed = macro_f1(labels, b0, 18) - macro_f1(labels, a0, 18)
    assert abs(np.median(one) - observed) < 0.02
    assert abs(np.median(both)) < 0.02 and np.percentile(both, 97.5) - np.percentile(both, 2.5) > \
        np.percentile(one, 97.5) - np.percentile(one, 2.5)  # two opposite seeds: wider, centred on 0


def test_diff_refuses_runs_of_other_images_and_runs_without_held_out_predictions(tmp_path, run_here):
    labels, preds, persons = heldout()
    a = fake_run(tmp_path / "a", preds, labels, persons)
    b = fake_run(tmp_path / "b", preds[:-7], labels[:-7], persons[:-7])
    one_line_error(run_here("runs.py", "diff", a, b, check=False), "do not hold the same held-out images")
    os.remove(b / "val_predictions.csv")
    one_line_error(run_here("runs.py", "diff", a, b, check=False), "nothing held out")
    one_line_error(run_here("runs.py", "diff", a, tmp_path / "nowhere", check=False), "is not a folder")


# ---------------------------------------------------------------- the leaderboard
def test_submit_and_gap_write_the_log_and_the_figure(tmp_path, run_here):
    labels, preds, persons = heldout()
    root = tmp_path / "runs"
    for name, best, score in (("a", 0.5, 0.61), ("b", 0.6, 0.66), ("c", 0.7, 0.64)):
        run = fake_run(root / name, preds, labels, persons, val_f1s=(0.1, best))
        run_here("runs.py", "submit", run, "--score", score, "--note", f"run {name}", "--root", root)
    log = pd.read_csv(root / "submissions.csv")
    assert list(log["score"]) == [0.61, 0.66, 0.64] and list(log["val_f1"]) == [0.5, 0.6, 0.7]
    assert list(log["note"]) == ["run a", "run b", "run c"]
    result = run_here("runs.py", "gap", "--root", root)
    assert "Spearman +0.50 over 3 submissions" in result.stdout and (root / "gap.png").stat().st_size > 10_000


def test_campaign_mistakes_are_one_line(tmp_path, run_here):
    one_line_error(run_here("runs.py", "compare", "--root", tmp_path / "none", check=False), "is not a folder")
    (tmp_path / "empty").mkdir()
    one_line_error(run_here("runs.py", "compare", "--root", tmp_path / "empty", check=False), "no run under")
    labels, preds, persons = heldout()
    fake_run(tmp_path / "runs" / "a", preds, labels, persons)
    one_line_error(run_here("runs.py", "compare", "--root", tmp_path / "runs", "--filter", "lr", check=False),
                   "expected key=value")
    one_line_error(run_here("runs.py", "compare", "--root", tmp_path / "runs", "--sort", "zzz", check=False),
                   "--sort zzz")
    one_line_error(run_here("runs.py", "gap", "--root", tmp_path / "runs", check=False), "record submissions first")
    one_line_error(run_here("runs.py", "submit", tmp_path / "runs" / "a", "--score", "1.5", check=False),
                   "--score")
    run_here("runs.py", "submit", tmp_path / "runs" / "a", "--score", "0.5", "--root", tmp_path / "runs")
    one_line_error(run_here("runs.py", "gap", "--root", tmp_path / "runs", check=False), "needs 2 or more")
    one_line_error(run_here("validate.py", tmp_path / "runs" / "nowhere", check=False), "is not a folder")


# ---------------------------------------------------------------- real runs
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_seeds_repeat_the_recipe_and_write_the_summary(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "1", "--seeds", "0,1,2", "--split_seed", "0", "--name", "rep",
             "--model_dir", tmp_path, cwd=work)
    group = tmp_path / "rep"
    summary = json.loads((group / "seeds.json").read_text())
    assert summary["seeds"] == [0, 1, 2] and summary["runs"] == ["seed0", "seed1", "seed2"]
    values = summary["metrics"]["val_f1"]["values"]
    assert len(values) == 3 and summary["metrics"]["val_f1"]["mean"] == pytest.approx(np.mean(values))
    splits = [pd.read_csv(group / f"seed{s}" / "split.csv") for s in range(3)]
    assert all(s.equals(splits[0]) for s in splits)  # --split_seed: the same images held out
    configs = [json.loads((group / f"seed{s}" / "config.json").read_text()) for s in range(3)]
    assert [c["seed"] for c in configs] == [0, 1, 2]
    result = run_here("runs.py", "diff", group / "seed0", group / "seed1", cwd=work)
    assert "95% interval" in result.stdout
    result = run_here("runs.py", "compare", "--root", tmp_path, cwd=work)
    assert "rep (3 seeds)" in result.stdout
    result = run_here("train.py", "--resume", group, cwd=work)  # finished: every seed says so
    assert result.stdout.count("finished earlier") == 3
    run_here("inference.py", "--model_dir", group, "--output", tmp_path / "sub.csv", "--answers",
             work / "data" / "eval" / "answers.csv", cwd=work)  # the three seeds ensembled
    assert (group / "eval_scores.csv").exists()
    assert "eval_f1" in run_here("runs.py", "compare", "--root", tmp_path, cwd=work).stdout


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_validate_reproduces_the_best_val_f1_and_writes_its_report(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "2", "--name", "v", "--model_dir", tmp_path, cwd=work)
    run = tmp_path / "v"
    result = run_here("validate.py", run, "--num_workers", "0", cwd=work)
    assert "reproduced exactly" in result.stdout, result.stdout
    for name in ("report.txt", "per_class.csv", "confused_pairs.csv", "confusion_matrix.png",
                 "confusion_tasks.png"):
        assert (run / "validate" / name).exists()
    per_class = pd.read_csv(run / "validate" / "per_class.csv")
    assert list(per_class["class"]) == MASK_CLASSES and {"precision", "recall", "f1-score"} <= set(per_class)
    assert "precision" in (run / "validate" / "report.txt").read_text()
    one_line_error(run_here("validate.py", run, check=False, cwd=work), "already exists")
    result = run_here("validate.py", run, "--data_dir", work / "data" / "eval", "--answers",
                      work / "data" / "eval" / "answers.csv", "--output_dir", tmp_path / "ev", cwd=work)
    assert "70 images" in result.stdout and "reproduced" not in result.stdout
    one_line_error(run_here("validate.py", run, "--use_ema", "--output_dir", tmp_path / "e", check=False,
                            cwd=work), "no EMA weights")
