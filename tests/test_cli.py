"""The CLIs end to end on generated data: the reference command as a real subprocess, the rest
through each CLI's main in this process (run_here: the same parsing, run folder and exit codes)."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAST, one_line_error, run_cli
from maskcls.labels import MASK_CLASSES, NUM_CLASSES



def _metrics(run_dir):
    return pd.read_csv(os.path.join(run_dir, "metrics.csv"))


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_reference_command_then_inference_with_defaults(work):
    """The seed command as written (one epoch), then `python inference.py` with no arguments."""
    run_cli("train.py", "--epochs", "1", "--augmentation", "AlbuAugmentation", "--model", "imgInceptionV3",
            "--criterion", "new_focal", "--lr", "1e-4", "--batch_size", "16", "--valid_batch_size", "64",
            "--dataset", "datasetSplitByClasses", "--optimizer", "Adam", "--cutmix", "True",
            "--resize", "299,299", cwd=work)
    run_dir = work / "runs" / "exp"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"] == "imgInceptionV3" and config["input_size"] == [299, 299]
    assert config["cutmix"] is True and config["criterion"] == "new_focal"
    assert config["classes"] == MASK_CLASSES and config["num_classes"] == NUM_CLASSES
    for name in ("best.pth", "last.pth", "split.csv", "metrics.csv"):
        assert (run_dir / name).is_file(), name
    assert any(n.startswith("events.out.tfevents") for n in os.listdir(run_dir))
    metrics = _metrics(run_dir)
    assert list(metrics.columns) == ["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1",
                                     "lr", "seconds", "val_f1_mask", "val_f1_gender", "val_f1_age"]
    assert len(metrics) == 1 and metrics["val_f1"].between(0, 1).all()

    result = run_cli("inference.py", cwd=work)
    submission = pd.read_csv(work / "output" / "submission.csv", dtype={"ImageID": str})
    info = pd.read_csv(work / "data" / "eval" / "info.csv", dtype={"ImageID": str})
    assert list(submission.columns) == list(info.columns)
    assert len(submission) == len(info)
    for row_sub, row_info in zip(submission.itertuples(), info.itertuples()):  # row by row, same order
        assert row_sub.ImageID == row_info.ImageID
        assert 0 <= row_sub.ans < NUM_CLASSES
    assert "wrote" in result.stdout


@pytest.fixture(scope="module")
def base_run(work):
    """A fast BaseModel run of 2 epochs."""
    run_cli("train.py", *FAST, "--epochs", "2", "--name", "base", "--seed", "5", cwd=work)
    return work / "runs" / "base"


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_same_seed_same_split_and_metrics(work, base_run, run_here):
    run_here("train.py", *FAST, "--epochs", "2", "--name", "base", "--seed", "5", cwd=work)
    again = work / "runs" / "base2"  # the name was taken: a new folder, nothing overwritten
    assert (base_run / "split.csv").read_text() == (again / "split.csv").read_text()
    first, second = _metrics(base_run), _metrics(again)
    assert len(first) == 2
    pd.testing.assert_frame_equal(first.drop(columns="seconds"), second.drop(columns="seconds"))


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_cache_setting_does_not_change_training(work, run_here):
    """--cache auto picks ram or nothing by free memory: either way the run must be the same."""
    runs = {}
    for kind in ("ram", "none"):
        result = run_here("train.py", *FAST, "--epochs", "2", "--name", f"cache_{kind}", "--seed", "5",
                          "--cache", kind, cwd=work)
        assert ("cache: " in result.stdout) == (kind == "ram")
        runs[kind] = _metrics(work / "runs" / f"cache_{kind}").drop(columns="seconds")
    pd.testing.assert_frame_equal(runs["ram"], runs["none"])


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_split_csv_is_a_person_split(work, base_run):
    split = pd.read_csv(base_run / "split.csv", dtype=str)
    assert (split.groupby("person")["side"].nunique() == 1).all()
    assert len(split) == 7 * len(pd.read_csv(work / "data" / "train" / "train.csv"))


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_inference_answers_and_ensemble(work, base_run, tmp_path, run_here):
    out = tmp_path / "sub.csv"
    result = run_here("inference.py", "--model_dir", base_run, "--model_dir", base_run, "--output", out,
                      "--answers", work / "data" / "eval" / "answers.csv", "--num_workers", "0", cwd=work)
    assert "macro F1" in result.stdout
    assert len(pd.read_csv(out)) == len(pd.read_csv(work / "data" / "eval" / "info.csv"))


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_ensemble_decodes_each_image_once_per_preprocessing(work, base_run, monkeypatch):
    """Runs that preprocess alike share one pass over the images; another input size, or a weight
    budget that holds one model at a time, means another pass. The probabilities do not change."""
    import dataset
    from maskcls import images
    import inference
    from maskcls import readers
    from maskcls.runtime import resolve_precision
    reads = []
    load_image = images.load_image
    monkeypatch.setattr(images, "load_image", lambda path, *a, **k: reads.append(path) or load_image(path, *a, **k))
    paths = dataset.read_eval_dir(str(work / "data" / "eval")).paths
    config = readers.read_config(base_run)
    assert config["prepared_size"] == config["input_size"]  # the default pipeline starts with A.Resize
    bigger = dict(config, input_size=[h + 16 for h in config["input_size"]],
                  prepared_size=[h + 16 for h in config["input_size"]])

    def probs(configs):
        reads.clear()
        return inference.ensemble_probs([base_run] * len(configs), configs, "best.pth", paths, (), 64, 0,
                                        torch.device("cpu"), resolve_precision("fp32", "cpu"))

    alone = probs([config])
    assert len(reads) == len(paths) and alone.shape == (len(paths), NUM_CLASSES)
    assert np.allclose(alone.sum(1), 1, atol=1e-5)
    three = probs([config] * 3)
    assert len(reads) == len(paths)  # one decoding pass for three models
    assert np.allclose(three, alone, atol=1e-6)
    mixed = probs([config, bigger])
    assert len(reads) == 2 * len(paths) and not np.allclose(mixed, alone, atol=1e-4)
    monkeypatch.setattr(inference, "SHARED_WEIGHTS_BYTES", 1)  # one model per pass
    assert np.allclose(probs([config] * 2), alone, atol=1e-6) and len(reads) == 2 * len(paths)


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_inference_on_a_plain_folder(work, base_run, tmp_path, run_here):
    images = tmp_path / "photos" / "nested"
    images.mkdir(parents=True)
    for src in list((work / "data" / "eval" / "images").iterdir())[:5]:
        shutil.copy(src, images / src.name)
    out = tmp_path / "plain.csv"
    run_here("inference.py", "--model_dir", base_run, "--data_dir", tmp_path / "photos", "--output", out, cwd=work)
    result = pd.read_csv(out)
    assert list(result.columns) == ["ImageID", "ans", "class_name"]
    assert len(result) == 5 and all(i.startswith("nested/") for i in result["ImageID"])
    assert all(MASK_CLASSES[a] == c for a, c in zip(result["ans"], result["class_name"]))


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_inference_checks_every_image_first(work, base_run, tmp_path, run_here):
    broken = tmp_path / "eval"
    shutil.copytree(work / "data" / "eval", broken)
    victim = pd.read_csv(broken / "info.csv")["ImageID"].iloc[-1]
    (broken / "images" / victim).unlink()
    result = run_here("inference.py", "--model_dir", base_run, "--data_dir", broken,
                      "--output", tmp_path / "x.csv", cwd=work, check=False)
    assert result.returncode != 0 and victim in result.stderr
    assert not (tmp_path / "x.csv").exists()


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_image_folder_training_and_weights(work, base_run, tmp_path, run_here):
    """A folder-per-class dataset trains from --weights (backbone of a run, new head)."""
    root = tmp_path / "folders"
    for person in sorted((work / "data" / "train" / "images").iterdir())[:12]:
        if person.name.startswith("."):
            continue
        for photo in person.iterdir():
            if photo.name.startswith("."):
                continue
            cls = "mask" if photo.stem.startswith("mask") else photo.stem
            (root / cls).mkdir(parents=True, exist_ok=True)
            shutil.copy(photo, root / cls / f"{person.name}_{photo.name}")
    run_here("train.py", *FAST, "--dataset", "ImageFolder", "--data_dir", root, "--epochs", "1",
             "--weights", base_run / "best.pth", "--name", "folders", cwd=work)
    run_dir = work / "runs" / "folders"
    config = json.loads((run_dir / "config.json").read_text())
    assert config["classes"] == ["incorrect_mask", "mask", "normal"] and config["num_classes"] == 3
    split = pd.read_csv(run_dir / "split.csv", keep_default_na=False)
    assert (split["person"] == "").all()


@pytest.mark.parametrize("flag,value,valid", [
    ("--model", "nosuchnet", "imgInceptionV3"),
    ("--dataset", "nosuchset", "datasetSplitByClasses"),
    ("--criterion", "nosuchloss", "new_focal"),
    ("--augmentation", "nosuchaug", "AlbuAugmentation"),
    ("--optimizer", "nosuchopt", "adamw"),
])
def test_unknown_registry_name_is_one_line(work, flag, value, valid, tmp_path, run_here):
    result = run_here("train.py", flag, value, "--model_dir", tmp_path / "runs", cwd=work, check=False)
    one_line_error(result, value, valid)
    assert not (tmp_path / "runs").exists()  # nothing written


@pytest.mark.parametrize("args,needle", [
    (["--cutmix", "maybe"], "--cutmix"),
    (["--resize", "a,b"], "--resize"),
    (["--data_dir", "no/such/dir"], "no/such/dir"),
    (["--val_ratio", "1.5"], "--val_ratio"),
])
def test_bad_flag_values_are_one_line(work, args, needle, tmp_path, run_here):
    result = run_here("train.py", *args, "--epochs", "1", "--model_dir", tmp_path / "runs", *FAST[:2], cwd=work,
                      check=False)
    one_line_error(result, needle)


def test_best_epoch_rule():
    from maskcls.engine import is_better
    best = {"val_f1": 0.8, "val_loss": 0.5}
    assert is_better({"val_f1": 0.81, "val_loss": 9.0}, best)
    assert is_better({"val_f1": 0.8, "val_loss": 0.9}, best)  # tie in F1: the later epoch wins, whatever its loss
    assert is_better({"val_f1": 0.8, "val_loss": 0.4}, best)
    assert not is_better({"val_f1": 0.79, "val_loss": 0.0}, best)  # accuracy or loss never beat F1


def test_early_stopping_counts_epochs_without_a_better_f1(work, monkeypatch, tmp_path):
    """--patience 2 stops after the second epoch in a row without a better val F1 (not the third); a
    tie is not worse (the later epoch becomes best)."""
    import train
    scores = iter([(0.5, 1.0), (0.6, 0.9), (0.6, 0.95), (0.55, 0.8), (0.58, 0.1), (0.95, 0.1)])

    def fake_evaluate(model, loader, *args, **kwargs):
        f1, loss = next(scores)
        n = len(loader.dataset)
        return {"val_f1": f1, "val_loss": loss, "val_acc": f1, "labels": torch.zeros(n, dtype=torch.long),
                "preds": torch.zeros(n, dtype=torch.long), "probs": torch.full((n, 18), 1 / 18).numpy()}
    from maskcls import fit
    monkeypatch.setattr(fit, "evaluate", fake_evaluate)
    args = train.get_args_parser().parse_args([*FAST, "--epochs", "6", "--patience", "2", "--cutmix", "False",
                                               "--mixup", "no", "--data_dir", str(work / "data" / "train"),
                                               "--model_dir", str(tmp_path), "--name", "patience"])
    run_dir = train.main(args)
    metrics = _metrics(run_dir)
    assert metrics["epoch"].tolist() == [1, 2, 3, 4, 5]  # epoch 3 ties epoch 2 and is best; 4 and 5 worse
    assert metrics["val_f1"].tolist() == [0.5, 0.6, 0.6, 0.55, 0.58]
    assert torch.load(os.path.join(run_dir, "best.pth"), weights_only=True)["epoch"] == 3
    config = json.loads(open(os.path.join(run_dir, "config.json")).read())
    assert config["cutmix"] is False and config["mixup"] is False


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_corrupt_training_image_is_one_line_from_a_worker(sample_data, tmp_path, run_here):
    data_copy = tmp_path / "data"
    shutil.copytree(sample_data, data_copy)
    for victim in (data_copy / "train" / "images").glob("*/mask2.*"):  # every person: whatever the order
        victim.write_bytes(victim.read_bytes()[:200])  # truncated
    result = run_here("train.py", *FAST[:4], "--num_workers", "2", "--epochs", "1", "--val_ratio", "0.5",
                      "--data_dir", data_copy / "train", "--model_dir", tmp_path / "runs", check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot read image" in lines[0] and "/mask2." in lines[0], result.stderr


def test_runs_from_before_prepared_size_was_recorded_keep_their_cache_size():
    import inference
    assert inference.run_prepared_size({"input_size": [64, 48]}) == (72, 54)  # the cache's 1.125x
    assert inference.run_prepared_size({"input_size": [64, 48], "prepared_size": [64, 48]}) == (64, 48)
