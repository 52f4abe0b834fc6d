"""Search and shortcuts (issue 23): tune.py over Optuna (pruning, a kill and a resume, two
processes on one study), train.py --lr_find, --smoke, --dry_run, --overfit_batches and
--batch_size auto."""
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest

from conftest import FAST, ROOT, one_line_error


SPACE = "lr: {low: 1.0e-4, high: 1.0e-2, log: true}\ncriterion: {choices: [cross_entropy, new_focal]}\n"
TRIAL = [*FAST, "--epochs", "3"]


def finished(study_dir):
    """(trials that count: complete or pruned, not over budget; their numbers) of a study's trials.csv."""
    trials = pd.read_csv(os.path.join(study_dir, "trials.csv"))
    done = trials[trials["state"].isin(["COMPLETE", "PRUNED"])]
    return len(done), sorted(done["number"])


def start_tune(work, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "tune.py"), *map(str, args)], cwd=work,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


@pytest.mark.parametrize("space,needle", [("nosuch: {low: 1, high: 2}\n", "'nosuch' is not a train.py flag"),
                                          ("lr: {low: 2, high: 1}\n", "needs numbers low < high"),
                                          ("lr: 0.1\n", "expected {low: A, high: B"),
                                          ("lr: {choices: []}\n", "choices must be a non-empty list")])
def test_a_bad_space_is_one_line(tmp_path, run_here, space, needle):
    (tmp_path / "space.yaml").write_text(space)
    result = run_here("tune.py", "--trials", "2", "--space", tmp_path / "space.yaml", "--model_dir", tmp_path,
                      cwd=tmp_path, check=False)
    one_line_error(result, needle)


def test_a_bad_fixed_flag_is_one_line_before_any_trial(tmp_path, run_here):
    (tmp_path / "space.yaml").write_text(SPACE)
    result = run_here("tune.py", "--trials", "2", "--space", tmp_path / "space.yaml", "--lr", "nan",
                      "--model_dir", tmp_path, cwd=tmp_path, check=False)
    one_line_error(result, "argument --lr")
    assert not (tmp_path / "study").exists()


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_three_trials_with_pruning_and_the_best_config(work, tmp_path, run_here):
    (tmp_path / "space.yaml").write_text(SPACE)
    result = run_here("tune.py", "--trials", "3", "--space", tmp_path / "space.yaml", "--pruner", "median",
                      "--sampler_seed", "0", *TRIAL, "--model_dir", tmp_path, cwd=work)
    study = tmp_path / "study"
    count, numbers = finished(study)
    assert count == 3 and numbers == [0, 1, 2]
    assert "importance:" in result.stdout and (study / "study.db").exists()
    for number in numbers:  # every trial a normal run folder
        assert (study / f"trial{number:03d}" / "config.json").exists()
    best = (study / "best_config.yaml").read_text()
    assert "lr:" in best and "model_dir" not in best
    import train
    parsed = train.get_args_parser().parse_args(["--config", str(study / "best_config.yaml")])
    assert parsed.model == "BaseModel" and parsed.resize == (64, 48)


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_a_killed_study_resumes_without_repeating_a_trial(work, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    args = ["--trials", "3", "--space", tmp_path / "space.yaml", "--pruner", "none", *TRIAL, "--model_dir", tmp_path]
    process = start_tune(work, *args)
    study = tmp_path / "study"
    deadline = time.time() + 300
    while not (study / "trial001" / "metrics.csv").exists():  # trial 0 done, trial 1 under way
        assert process.poll() is None and time.time() < deadline, process.communicate()[0][-3000:]
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    first = (study / "trial000" / "metrics.csv").read_text()
    result = start_tune(work, *args)
    out = result.communicate(timeout=600)[0]
    assert result.returncode == 0, out[-3000:]
    assert "1 trial(s) of a killed tune.py queued again" in out and "1 of 3 trials taken" in out
    count, numbers = finished(study)
    assert count == 3 and 0 in numbers and 1 not in numbers  # trial 0 kept, the killed one retried as 2
    assert (study / "trial000" / "metrics.csv").read_text() == first  # not run again
    trials = pd.read_csv(study / "trials.csv")
    retried = trials[trials["number"] == 2]["lr"].iloc[0]
    assert retried == pytest.approx(trials[trials["number"] == 1]["lr"].iloc[0])  # the same values, tried again


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_two_processes_share_one_study(work, tmp_path):
    (tmp_path / "space.yaml").write_text(SPACE)
    args = ["--trials", "4", "--space", tmp_path / "space.yaml", "--pruner", "none", *TRIAL, "--epochs", "2",
            "--model_dir", tmp_path]
    first = start_tune(work, *args)
    time.sleep(3)  # the second finds the study the first made
    second = start_tune(work, *args)
    outs = [p.communicate(timeout=600)[0] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, [o[-2000:] for o in outs]
    count, numbers = finished(tmp_path / "study")
    assert count == 4, numbers
    folders = sorted(p.name for p in (tmp_path / "study").iterdir() if p.name.startswith("trial"))
    assert len(folders) == len(set(folders)) >= 4  # no trial folder shared


# ---------------------------------------------------------------- train.py's shortcuts
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_lr_find_suggests_a_rate_inside_the_sweep_and_draws_it(work, tmp_path, run_here):
    plot = tmp_path / "lr.png"
    result = run_here("train.py", *FAST, "--lr_find", "--lr_find_steps", "60", "--lr_find_plot", plot,
                      "--model_dir", tmp_path / "runs", cwd=work)
    line = next(line for line in result.stdout.splitlines() if line.startswith("lr finder:"))
    rate = float(line.split("suggested --lr ")[1].split()[0])
    assert 1e-7 < rate < 10 and "valley" in line and plot.stat().st_size > 10_000
    assert not (tmp_path / "runs").exists()  # no run folder


def test_the_valley_suggestion_on_a_known_curve():
    from maskcls.shortcuts import suggest
    rates = np.geomspace(1e-6, 1, 100)
    x = np.log10(rates)
    losses = 2.0 - 1.0 / (1 + np.exp(-(x + 3) * 3)) + np.where(x > -1, (x + 1) * 5, 0)  # falls around 1e-3
    suggestion = suggest(rates, losses)
    assert 1e-4 < suggestion["valley"] < 1e-1 and suggestion["steepest"] == pytest.approx(1e-3, rel=0.3)


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
@pytest.mark.parametrize("shortcut,needle", [("--smoke", "smoke test passed"), ("--dry_run", "an epoch")])
def test_smoke_and_dry_run_write_nothing(work, tmp_path, run_here, shortcut, needle):
    before = sorted(os.listdir(work))
    result = run_here("train.py", *FAST, shortcut, "--model_dir", tmp_path / "runs", cwd=work)
    assert needle in result.stdout and "nothing written" in result.stdout
    assert not (tmp_path / "runs").exists() and sorted(os.listdir(work)) == before


def test_smoke_catches_a_crash_in_seconds(work, tmp_path, run_here, monkeypatch):
    from maskcls import fold
    monkeypatch.setattr(fold, "build_criterion", lambda *a, **k: (_ for _ in ()).throw(
        ValueError("a loss that cannot be built")))
    with pytest.raises(ValueError, match="cannot be built"):
        run_here("train.py", *FAST, "--smoke", "--model_dir", tmp_path / "runs", cwd=work, check=False)
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_overfit_batches_learns_a_fixed_set(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--overfit_batches", "1", "--batch_size", "16", "--epochs", "25", "--lr", "3e-3",
             "--model", "resnet10t", "--name", "of", "--model_dir", tmp_path, cwd=work)
    metrics = pd.read_csv(tmp_path / "of" / "metrics.csv")
    assert metrics["train_loss"].iloc[-1] < 0.5 * metrics["train_loss"].iloc[0]
    assert metrics["val_acc"].max() >= 0.8  # validated on the same 16 images
    import json
    config = json.loads((tmp_path / "of" / "config.json").read_text())
    assert config["augmentation"] == "BaseAugmentation" and config["train_images"] == 16


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_batch_size_auto_keeps_the_default_on_a_cpu(work, tmp_path, run_here):
    result = run_here("train.py", *FAST[:2], "--num_workers", "0", "--batch_size", "auto", "--dry_run",
                      "--model_dir", tmp_path, cwd=work)
    assert "--batch_size auto: on a CPU memory is not the limit" in result.stdout


@pytest.mark.parametrize("args,needle", [(["--smoke", "--seeds", "0,1"], "not with --resume or --seeds"),
                                         (["--lr_find", "--lr_find_range", "1,0.1"], "0 < MIN < MAX"),
                                         (["--overfit_batches", "2", "--kfold", "2"], "not with --kfold"),
                                         (["--batch_size", "big"], "argument --batch_size")])
def test_shortcut_mistakes_are_one_line(work, tmp_path, run_here, args, needle):
    one_line_error(run_here("train.py", *FAST[:2], *args, "--model_dir", tmp_path, cwd=work, check=False), needle)
