"""--refit: one more model on every training image for the epochs validation chose, into RUN/refit,
used by inference.py --checkpoint refit."""
import argparse
import json
import os

import pandas as pd
import pytest
import torch

from conftest import FAST, one_line_error
from maskcls.refit import refit_args, refit_length


def _finished(folder, epoch, f1):
    os.makedirs(folder, exist_ok=True)
    torch.save({"epoch": 9, "best": {"epoch": epoch, "val_f1": f1, "val_loss": 1.0}, "finished": True},
               os.path.join(folder, "last.pth"))


def test_refit_length_is_the_best_epoch_or_the_folds_median(tmp_path):
    _finished(tmp_path / "single", 7, 0.61)
    assert refit_length(str(tmp_path / "single"))[:2] == (7, 0.61)
    parent = tmp_path / "kf"
    for name, epoch in zip(("fold1", "fold2", "fold3", "fold4"), (2, 3, 4, 5)):
        _finished(parent / name, epoch, 0.5)
    (parent / "kfold.json").write_text(json.dumps({"oof_f1": 0.7, "fold_f1": [0.5] * 4}))
    epochs, estimate, why = refit_length(str(parent), ["fold1", "fold2", "fold3", "fold4"])
    assert (epochs, estimate) == (4, 0.7) and "2, 3, 4, 5" in why  # median 3.5, rounded half up
    assert refit_length(str(parent), ["fold1", "fold2", "fold3"])[0] == 3


def test_refit_flags_drop_switches_it_does_not_reach():
    args = argparse.Namespace(swa_start=8, swa_lr=1e-4, swa_anneal_epochs=2, aug_off_epoch=3, mix_off_epoch=9,
                              epochs=10, kfold=5, folds=[1, 2], val_ratio=0.2, patience=3, average_top=2, refit=True,
                              seeds=None, name="x", model_dir="runs", resume=None)
    out = refit_args(args, "runs/x", 6, 0.8, resume=False)
    assert (out.epochs, out.kfold, out.folds, out.val_ratio, out.patience, out.average_top, out.refit) == \
        (6, 0, None, 0.0, 0, 0, False)
    assert (out.swa_start, out.swa_lr, out.swa_anneal_epochs, out.mix_off_epoch) == (0, None, 0, 0)
    assert out.aug_off_epoch == 3 and out.name == "refit" and out.model_dir == "runs/x" and out.refit_estimate == 0.8
    assert refit_args(args, "runs/x", 6, 0.8, resume=True).resume == os.path.join("runs/x", "refit")


@pytest.mark.slow
def test_refit_trains_the_best_epoch_count_on_every_image_and_inference_uses_it(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "3", "--refit", "True", "--name", "r", "--model_dir", tmp_path, cwd=work)
    run_dir, refit = tmp_path / "r", tmp_path / "r" / "refit"
    best = torch.load(run_dir / "last.pth", weights_only=True)["best"]
    config = json.loads((refit / "config.json").read_text())
    assert config["epochs"] == best["epoch"] and config["val_images"] == 0
    assert config["refit_estimate"] == pytest.approx(best["val_f1"])
    run_split = pd.read_csv(run_dir / "split.csv")
    refit_split = pd.read_csv(refit / "split.csv")
    assert set(refit_split["side"]) == {"train"} and sorted(refit_split["path"]) == sorted(run_split["path"])
    assert config["train_images"] == len(run_split)
    assert len(pd.read_csv(refit / "metrics.csv")) == best["epoch"]  # every epoch it was given, no more
    # the refit's weights are not the run's
    run_weights = torch.load(run_dir / "best.pth", weights_only=True)
    refit_weights = torch.load(refit / "best.pth", weights_only=True)
    key = next(k for k, v in run_weights["model"].items() if v.dtype.is_floating_point)
    assert not torch.equal(run_weights["model"][key], refit_weights["model"][key])

    out = run_here("inference.py", "--model_dir", run_dir, "--checkpoint", "refit", "--output", tmp_path / "sub.csv",
                   "--answers", work / "data" / "eval" / "answers.csv", cwd=work)
    assert str(refit) in out.stdout and len(pd.read_csv(tmp_path / "sub.csv")) > 0
    scores = pd.read_csv(run_dir / "eval_scores.csv")
    assert list(scores["checkpoint"]) == ["refit"]  # recorded as the refit's, not as the run's best.pth

    again = run_here("train.py", "--resume", run_dir, cwd=work)  # a finished refit is kept
    assert "finished earlier" in again.stdout


@pytest.mark.slow
def test_kfold_refit_trains_the_folds_median_best_epoch(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "3", "--kfold", "2", "--refit", "True", "--name", "kf",
             "--model_dir", tmp_path, cwd=work)
    parent = tmp_path / "kf"
    bests = [torch.load(parent / f / "last.pth", weights_only=True)["best"]["epoch"] for f in ("fold1", "fold2")]
    config = json.loads((parent / "refit" / "config.json").read_text())
    assert config["epochs"] == int(sum(bests) / 2 + 0.5)
    assert config["refit_estimate"] == pytest.approx(json.loads((parent / "kfold.json").read_text())["oof_f1"])
    assert config["train_images"] == len(pd.read_csv(parent / "oof.csv"))  # every image was held out once


@pytest.mark.slow
def test_refit_needs_validation_and_inference_needs_a_refit(work, tmp_path, run_here):
    one_line_error(run_here("train.py", *FAST, "--refit", "True", "--val_ratio", "0", "--model_dir", tmp_path,
                            cwd=work, check=False), "--refit", "--val_ratio")
    assert not os.listdir(tmp_path)
    run_here("train.py", *FAST, "--epochs", "1", "--name", "plain", "--model_dir", tmp_path, cwd=work)
    one_line_error(run_here("inference.py", "--model_dir", tmp_path / "plain", "--checkpoint", "refit",
                            "--output", tmp_path / "sub.csv", cwd=work, check=False), "no finished refit")


def test_checkpoint_refit_of_a_seed_group_is_every_seeds_refit(tmp_path):
    from maskcls.cli import UserError
    from maskcls.predict import refit_runs
    group = tmp_path / "group"
    group.mkdir()
    (group / "config.json").write_text(json.dumps({"seed_dirs": ["seed0", "seed1"], "classes": ["a", "b"]}))
    for seed in ("seed0", "seed1"):
        (group / seed / "refit").mkdir(parents=True)
        (group / seed / "refit" / "best.pth").write_bytes(b"")
    assert refit_runs([str(group)]) == [str(group / "seed0" / "refit"), str(group / "seed1" / "refit")]
    os.remove(group / "seed1" / "refit" / "best.pth")  # an unfinished refit is no model: one line naming the seed
    with pytest.raises(UserError, match="seed1"):
        refit_runs([str(group)])


@pytest.mark.slow
def test_seed_group_refit_end_to_end(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "2", "--seeds", "0,1", "--refit", "True", "--name", "g",
             "--model_dir", tmp_path, cwd=work)
    group = tmp_path / "g"
    for seed in ("seed0", "seed1"):
        best = torch.load(group / seed / "last.pth", weights_only=True)["best"]
        config = json.loads((group / seed / "refit" / "config.json").read_text())
        assert config["epochs"] == best["epoch"] and config["seed"] == int(seed[4:]) and config["val_images"] == 0
        assert (group / seed / "refit" / "best.pth").is_file()
    out = run_here("inference.py", "--model_dir", group, "--checkpoint", "refit", "--output", tmp_path / "sub.csv",
                   cwd=work)
    assert str(group / "seed0" / "refit") in out.stdout and str(group / "seed1" / "refit") in out.stdout
    assert pd.read_csv(tmp_path / "sub.csv")["ans"].between(0, 17).all()
