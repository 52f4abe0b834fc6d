"""Hostile, broken or unlucky input, round two: each case is one clear line and a non-zero exit
(or the right behaviour), nothing lost on disk and no stray file. The numbers are issue 11's."""
import contextlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from conftest import FAST, ROOT, one_line_error as _one_line_error, run_cli
from maskcls import atomic
from maskcls import cli
from maskcls.cli import UserError
from maskcls.images import ImageDataset, load_image
from maskcls.runfolder import RunLock


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def write_bomb(path, side=30000):
    """A PNG that says it is side x side pixels (900 M for 30000) in well under 1 MB."""
    header = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)  # 8-bit greyscale
    rows = zlib.compress(b"\x00" * (side + 1) * 4)  # a few rows; PIL refuses the size before decoding
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", rows) + _chunk(b"IEND", b""))


def _person_photo(data_dir, index=0, stem="mask1"):
    train = pd.read_csv(data_dir / "train" / "train.csv", dtype=str)
    folder = data_dir / "train" / "images" / train["path"][index]
    return next(p for p in folder.iterdir() if p.stem == stem)


@pytest.fixture(scope="module")
def small_run(work, tmp_path_factory):
    runs = tmp_path_factory.mktemp("hostile_runs")
    # a step schedule: --resume --epochs N may lengthen it (tests 6, 9, 12)
    run_cli("train.py", *FAST, "--epochs", "1", "--scheduler", "step", "--name", "small", "--model_dir", runs, cwd=work)
    return runs / "small"


@pytest.fixture()
def data_copy(sample_data, tmp_path):
    shutil.copytree(sample_data, tmp_path / "data")
    return tmp_path / "data"


# ---------------------------------------------------------------- 1. decompression bomb
@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_1_decompression_bomb_is_one_line_everywhere(data_copy, tmp_path, run_here):
    victim = _person_photo(data_copy)
    write_bomb(victim)
    assert victim.stat().st_size < 2**20
    with pytest.raises(UserError, match="cannot read image.*exceeds"):
        load_image(str(victim))
    runs = tmp_path / "runs"
    result = run_cli("train.py", *FAST, "--epochs", "1", "--data_dir", data_copy / "train", "--model_dir", runs,
                     cwd=tmp_path, check=False)
    _one_line_error(result, "cannot read image", victim.name)
    assert not runs.exists() or not os.listdir(runs)  # no half-made run folder
    result = run_here("train.py", *FAST, "--epochs", "1", "--data_dir", data_copy / "train", "--model_dir", runs,
                      "--skip_bad_images", cwd=tmp_path)
    assert "skipped 1 unreadable image(s)" in result.stdout
    result = run_cli("facecrop.py", "--data_dir", data_copy / "train", cwd=tmp_path, check=False)
    _one_line_error(result, "cannot read image", victim.name)
    eval_image = next((data_copy / "eval" / "images").iterdir())
    write_bomb(eval_image)
    result = run_here("inference.py", "--model_dir", runs / "exp", "--data_dir", data_copy / "eval", "--output",
                     tmp_path / "sub.csv", "--num_workers", "0", cwd=tmp_path, check=False)
    _one_line_error(result, "cannot read image", eval_image.name)
    assert not (tmp_path / "sub.csv").exists()


# ---------------------------------------------------------------- 2. 16-bit greyscale
def test_2_sixteen_bit_greyscale_is_read_at_its_values(tmp_path):
    values = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "grey16.png")
    assert Image.open(tmp_path / "grey16.png").mode.startswith("I")
    image = load_image(str(tmp_path / "grey16.png"))
    assert image.dtype == np.uint8 and image.shape == (48, 64, 3)
    expected = np.round(values / 257.0)
    assert np.abs(image[..., 0] - expected).max() <= 1 and 100 < image.mean() < 155  # not all white
    # the path training and inference take (prepare + transform) sees the same values
    from augmentation import eval_transform
    dataset = ImageDataset([str(tmp_path / "grey16.png")], [0], eval_transform((48, 64), (0, 0, 0), (1, 1, 1)),
                           prepare_to=(48, 64))
    tensor = dataset[0][0]
    assert abs(tensor.mean().item() - image.mean() / 255) < 0.01


# ---------------------------------------------------------------- 3. values checked at parse time
@pytest.mark.parametrize("flag,value", [("--lr", "nan"), ("--lr", "-1"), ("--num_workers", "-1"),
                                        ("--weight_decay", "inf"), ("--ema", "1.5"), ("--beta", "0")])
def test_3_bad_numbers_are_refused_at_parse_time(work, tmp_path, flag, value, run_here):
    runs = tmp_path / "runs"
    result = run_here("train.py", *FAST, flag, value, "--model_dir", runs, cwd=work, check=False)
    _one_line_error(result, flag)
    assert not runs.exists()


# ---------------------------------------------------------------- 4. an info.csv with only a header
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_4_header_only_info_csv(work, small_run, tmp_path, run_here):
    (tmp_path / "eval" / "images").mkdir(parents=True)
    (tmp_path / "eval" / "info.csv").write_text("ImageID,ans\n")
    result = run_here("inference.py", "--model_dir", small_run, "--data_dir", tmp_path / "eval",
                     "--output", tmp_path / "sub.csv", cwd=work, check=False)
    _one_line_error(result, "lists no image")


# ---------------------------------------------------------------- 5. killed after the metrics row
KILL_IN_WINDOW = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from maskcls import runfolder
    save_best = runfolder.Checkpoint.save_best
    def killed_after_the_row(self, weights, scores):
        save_best(self, weights, scores)
        if scores["epoch"] == 1:  # the metrics row of epoch 1 is written, its last.pth is not
            os.kill(os.getpid(), signal.{signal})
    runfolder.Checkpoint.save_best = killed_after_the_row
    import train
    from maskcls import cli
    sys.argv[0] = "train.py"
    cli.run(train.main, train.get_args_parser, sys.argv[1:])
""")


WINDOW_ARGS = [*FAST, "--epochs", "2", "--seed", "5"]


@pytest.fixture(scope="module")
def straight_metrics(work, tmp_path_factory):
    runs = tmp_path_factory.mktemp("straight")
    run_cli("train.py", *WINDOW_ARGS, "--name", "straight", "--model_dir", runs, cwd=work)
    return pd.read_csv(runs / "straight" / "metrics.csv").drop(columns="seconds")


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
@pytest.mark.parametrize("signal_name", ["SIGKILL", "SIGINT"])
def test_5_kill_between_the_metrics_row_and_last_pth(work, tmp_path, signal_name, straight_metrics):
    args = [*WINDOW_ARGS, "--model_dir", str(tmp_path)]
    script = KILL_IN_WINDOW.format(root=ROOT, signal=signal_name)
    done = subprocess.run([sys.executable, "-c", script, *args, "--name", "window"], cwd=work, capture_output=True,
                          text=True, timeout=600)
    run_dir = tmp_path / "window"
    assert len(pd.read_csv(run_dir / "metrics.csv")) == 1
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] == 0
    if signal_name == "SIGINT":  # Ctrl-C: says what last.pth really holds
        assert done.returncode == 130 and f"{run_dir}/last.pth holds epoch 0;" in done.stdout, done.stdout
    resumed = run_cli("train.py", "--resume", run_dir, cwd=work)
    assert f"resuming {run_dir} after epoch 0" in resumed.stdout
    pd.testing.assert_frame_equal(straight_metrics, pd.read_csv(run_dir / "metrics.csv").drop(columns="seconds"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    steps = [event.step for event in EventAccumulator(str(run_dir)).Reload().Scalars("val_f1")]
    assert sorted(steps) == [1, 2]  # the purge dropped the first epoch 1


# ---------------------------------------------------------------- 6. two --resume of one folder
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_6_a_locked_run_folder_is_refused(work, small_run, tmp_path, run_here):
    shutil.copytree(small_run, tmp_path / "busy")
    before = (tmp_path / "busy" / "metrics.csv").read_text()
    with RunLock(str(tmp_path / "busy")):
        result = run_here("train.py", "--resume", tmp_path / "busy", "--epochs", "2", cwd=work, check=False)
    _one_line_error(result, "in use by process", str(os.getpid()))
    assert (tmp_path / "busy" / "metrics.csv").read_text() == before
    run_here("train.py", "--resume", tmp_path / "busy", "--epochs", "2", cwd=work)  # free again
    assert len(pd.read_csv(tmp_path / "busy" / "metrics.csv")) == 2


# ---------------------------------------------------------------- 7. --output is a folder
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_7_output_that_is_a_folder(work, small_run, tmp_path, run_here):
    (tmp_path / "out").mkdir()
    for extra in ([], ["--overwrite"]):
        result = run_here("inference.py", "--model_dir", small_run, "--output", tmp_path / "out", *extra, cwd=work,
                         check=False)
        _one_line_error(result, "is a folder")
    assert os.listdir(tmp_path / "out") == [] and not [n for n in os.listdir(tmp_path) if ".tmp" in n]
    run_here("inference.py", "--model_dir", small_run, "--output_dir", tmp_path / "out", cwd=work)
    assert os.listdir(tmp_path / "out") == ["submission.csv"]


# ---------------------------------------------------------------- 8. disk full
@contextlib.contextmanager
def tiny_disk(path, size):
    path.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({mounted.stderr.strip() or 'mount failed'})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def _fill(disk, leave):
    """Fill the disk but for about `leave` bytes."""
    stat = os.statvfs(disk)
    free = stat.f_bavail * stat.f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(free - leave, 0))


def _temps(folder):
    return [os.path.join(d, n) for d, _, names in os.walk(folder) for n in names if ".tmp" in n]


def test_8_disk_full_for_a_checkpoint(work, tmp_path, run_here):
    with tiny_disk(tmp_path / "disk", "400k") as disk:  # config.json and split.csv fit, last.pth does not
        result = run_here("train.py", *FAST, "--epochs", "1", "--model_dir", disk, cwd=work, check=False)
        _one_line_error(result, "disk full", str(disk))
        assert not _temps(disk) and not (disk / "exp").exists()


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_8_disk_full_during_training(work, tmp_path, run_here):
    with tiny_disk(tmp_path / "disk", "8m") as disk:
        run_here("train.py", *FAST, "--epochs", "1", "--scheduler", "step", "--name", "full", "--model_dir", disk,
                 cwd=work)
        kept = {name: (disk / "full" / name).read_bytes() for name in ("metrics.csv", "best.pth", "last.pth")}
        _fill(disk, 64 * 1024)
        result = run_here("train.py", "--resume", disk / "full", "--epochs", "3", cwd=work, check=False)
        _one_line_error(result, "disk full")
        assert not _temps(disk)
        metrics = pd.read_csv(disk / "full" / "metrics.csv")
        assert 1 <= len(metrics) <= 3 and metrics["epoch"].is_monotonic_increasing  # no half rows
        assert torch.load(disk / "full" / "last.pth", weights_only=True)["epoch"] >= 1  # readable
        assert (disk / "full" / "metrics.csv").read_bytes().startswith(kept["metrics.csv"])  # earlier rows intact


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_8_disk_full_for_inference_and_ensemble_outputs(work, small_run, tmp_path, run_here):
    with tiny_disk(tmp_path / "disk", "1m") as disk:
        (disk / "sub.csv").write_text("precious\n")
        (disk / "sub_probs.csv").write_text("precious probs\n")
        _fill(disk, 6 * 1024)  # room for the submission (~3 KB), not for its probabilities
        result = run_here("inference.py", "--model_dir", small_run, "--output", disk / "sub.csv", "--save_probs",
                         "--overwrite", cwd=work, check=False)
        _one_line_error(result, "disk full", str(disk))
        assert (disk / "sub.csv").read_text() == "precious\n"  # the pair is written as a pair, or not at all
        assert (disk / "sub_probs.csv").read_text() == "precious probs\n" and not _temps(disk)
        os.remove(disk / "filler")
        for name in ("a", "b"):
            run_here("inference.py", "--model_dir", small_run, "--output", tmp_path / f"{name}.csv", "--save_probs",
                    cwd=work)
        _fill(disk, 6 * 1024)
        result = run_here("ensemble.py", tmp_path / "a_probs.csv", tmp_path / "b_probs.csv", "--output",
                         disk / "ens.csv", "--save_probs", cwd=work, check=False)
        _one_line_error(result, "disk full")
        assert not (disk / "ens.csv").exists() and not _temps(disk)


@pytest.mark.slow  # trains (seconds): `pytest -m 'not slow'` skips it
def test_a_run_from_before_gp_resumes_and_predicts_with_its_average_pool(work, tmp_path, run_here):
    run_dir = tmp_path / "old"
    run_here("train.py", *FAST, "--epochs", "1", "--scheduler", "step", "--gp", "avg", "--name", "old",
             "--model_dir", tmp_path, cwd=work)
    config = json.loads((run_dir / "config.json").read_text())
    assert config["gp"] == "avg"
    del config["gp"]  # as config.json was written before --gp existed (BaseModel pooled by average)
    (run_dir / "config.json").write_text(json.dumps(config))
    resumed = run_here("train.py", "--resume", run_dir, "--epochs", "2", cwd=work)
    assert "resuming" in resumed.stdout
    assert torch.load(run_dir / "best.pth", weights_only=True)["model"]["fc.weight"].shape[1] == 128
    run_here("inference.py", "--model_dir", run_dir, "--output", tmp_path / "sub.csv", cwd=work)
    assert len(pd.read_csv(tmp_path / "sub.csv")) == 70


# ---------------------------------------------------------------- 9. what a SIGKILL leaves behind
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_9_resume_clears_what_a_killed_run_left(work, small_run, tmp_path, run_here):
    run_dir = tmp_path / "left"
    shutil.copytree(small_run, run_dir)
    (run_dir / "last.pth.tmp99999999").write_bytes(b"half a checkpoint")
    (run_dir / ".image_cache99999999.npy").write_bytes(b"\0" * 1000)
    result = run_here("train.py", "--resume", run_dir, "--epochs", "2", cwd=work)
    assert "removed 2 file(s) a killed run left" in result.stdout
    assert not _temps(run_dir) and not list(run_dir.glob(".image_cache*"))
    # an output's temporary file from a dead process goes too; a live one's stays
    (tmp_path / "sub.csv.tmp99999999").write_text("half")
    (tmp_path / f"sub.csv.tmp{os.getppid()}").write_text("another writer's")
    run_here("inference.py", "--model_dir", run_dir, "--output", tmp_path / "sub.csv", cwd=work)
    assert sorted(n for n in os.listdir(tmp_path) if ".tmp" in n) == [f"sub.csv.tmp{os.getppid()}"]


# ---------------------------------------------------------------- 10. checked before the folder exists
def test_10_errors_after_the_folder_would_exist_leave_none(work, tmp_path, monkeypatch, run_here):
    runs = tmp_path / "runs"
    torch.save({"model": {"nothing": torch.zeros(1)}}, tmp_path / "other.pth")
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb raises ImportError, as where it is missing
    cases = [(["--weights", tmp_path / "other.pth"], "does not fit"),
             (["--optimizer", "adam", "--opt_kwargs", "nonsense=1"], "refused its arguments"),
             (["--criterion", "focal", "--focal_gamma", "-1"], "--focal_gamma"),
             (["--wandb", "p"], "pip install wandb")]
    for args, needle in cases:
        result = run_here("train.py", *FAST, "--epochs", "1", *args, "--model_dir", runs, cwd=work, check=False)
        _one_line_error(result, needle)
        assert not runs.exists() or os.listdir(runs) == [], os.listdir(runs)
    from maskcls.runfolder import make_run_dir
    assert make_run_dir(str(runs), "exp") == os.path.join(str(runs), "exp")  # the name is free


# ---------------------------------------------------------------- 11. Muon
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_11_muon_gets_the_parameter_groups_it_needs(work, tmp_path, run_here):
    """timm's Muon (the optimizers are timm's now) takes the 2-D weights and falls back to AdamW for
    the rest: a CNN trains with it instead of dying on its 4-D convolution weights."""
    assert "muon" in run_here("train.py", "--help", cwd=work).stdout
    run_here("train.py", *FAST, "--epochs", "1", "--optimizer", "Muon", "--name", "muon", "--model_dir", tmp_path,
             cwd=work)
    assert len(pd.read_csv(tmp_path / "muon" / "metrics.csv")) == 1


# ---------------------------------------------------------------- 12. --resume with another --epochs
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_12_resume_with_another_length(work, small_run, tmp_path, run_here):
    shutil.copytree(small_run, tmp_path / "cos")
    config = json.loads((tmp_path / "cos" / "config.json").read_text())
    (tmp_path / "cos" / "config.json").write_text(json.dumps({**config, "scheduler": "cosine"}))
    result = run_here("train.py", "--resume", tmp_path / "cos", "--epochs", "8", cwd=work, check=False)
    _one_line_error(result, "spans 1 epochs")
    shutil.copytree(small_run, tmp_path / "step")
    result = run_here("train.py", "--resume", tmp_path / "step", "--epochs", "2", cwd=work)
    assert "now runs to epoch 2 (was 1)" in result.stdout
    assert json.loads((tmp_path / "step" / "config.json").read_text())["epochs"] == 2
    assert len(pd.read_csv(tmp_path / "step" / "metrics.csv")) == 2


# ---------------------------------------------------------------- 13. racing writers, contradictions
def test_13_a_new_output_that_appears_meanwhile_is_not_replaced(tmp_path):
    target = tmp_path / "sub.csv"
    with pytest.raises(UserError, match="appeared while this run was writing it"):
        with atomic.replacing(str(target), overwrite=False) as tmp:
            open(tmp, "w").write("mine\n")
            target.write_text("the other run's\n")  # another inference finished first
    assert target.read_text() == "the other run's\n" and not _temps(tmp_path)


def test_13_amp_false_with_bf16_is_a_contradiction(work, tmp_path, run_here):
    result = run_here("train.py", *FAST, "--amp", "False", "--precision", "bf16", "--model_dir", tmp_path, cwd=work,
                     check=False)
    _one_line_error(result, "--amp False", "--precision bf16")


# ---------------------------------------------------------------- the flags users bring
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_baseline_and_timm_spellings(work, small_run, tmp_path, run_here):
    import train
    args = train.get_args_parser().parse_args(["--resize", "128", "96", "-b", "16", "--opt", "adamw", "--sched",
                                               "cosine", "--workers", "1", "--epochs", "2"])
    assert (args.resize, args.batch_size, args.optimizer, args.scheduler, args.num_workers) == \
        ((128, 96), 16, "adamw", "cosine", 1)
    assert train.get_args_parser().parse_args(["--img-size", "224"]).resize == (224, 224)
    assert train.get_args_parser().parse_args(["--resize", "128,96"]).resize == (128, 96)
    run_here("train.py", *FAST[:2], "--resize", "64", "48", *FAST[4:], "--epochs", "1", "--optimizer", "AdamW",
            "--model", "basemodel", "--name", "spell", "--model_dir", tmp_path, cwd=work)
    config = json.loads((tmp_path / "spell" / "config.json").read_text())
    assert (config["optimizer"], config["model"], config["resize"]) == ("adamw", "BaseModel", [64, 48])
    result = run_here("train.py", "--optimizer", "adamww", "--model_dir", tmp_path, cwd=work, check=False)
    _one_line_error(result, "did you mean 'adamw'")


def test_help_shows_each_default_once():
    import argparse

    import agecuts
    import audit
    import ensemble
    import inference
    import make_sample_data
    import persons
    import runs
    import train
    import tune_bias
    import validate
    parsers = [m.get_args_parser() for m in (train, inference, ensemble, tune_bias, audit, persons, agecuts,
                                             make_sample_data, validate)]
    parsers += next(a for a in runs.get_args_parser()._actions if a.dest == "command").choices.values()
    for parser in parsers:
        for action in parser._actions:
            if not action.option_strings or action.help == argparse.SUPPRESS:
                continue
            text = parser._get_formatter()._expand_help(action) if action.help else ""
            assert text.count("default") <= 1, (parser.prog, action.dest, text)
            if action.default not in (None, False, argparse.SUPPRESS) and action.dest != "help":
                assert "default" in text, (parser.prog, action.dest, text)


def test_progress_in_a_log(monkeypatch, capsys):
    clock = {"now": 1000.0}
    monkeypatch.setattr(cli.time, "time", lambda: clock["now"])
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    bar = cli.progress(range(100), desc="epoch 1/3", unit="batch")
    assert isinstance(bar, cli.LogProgress)
    for _ in bar:
        clock["now"] += 0.5  # 50 s for 100 batches: a line per quarter, at least 20 s apart
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 3 and lines[0].startswith("epoch 1/3: 40/100 (40%)") and "(100%)" in lines[-1]
    assert "30 s left" in lines[0]
    slow = cli.LogProgress(total=None, desc="face boxes")  # unknown total: every minute
    for _ in range(13):
        clock["now"] += 10
        slow.update(1)
    assert len(capsys.readouterr().err.strip().splitlines()) == 2
    quick = cli.LogProgress(range(50), desc="quick")
    for _ in quick:
        clock["now"] += 0.01  # half a second in all: nothing to say
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_progress_lines_reach_a_log_file(tmp_path):
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    script = "import sys; from maskcls import cli; cli.LOG_MIN_SECONDS = 0; import make_sample_data as m; " \
             "sys.argv[0] = 'x'; cli.run(m.main, m.get_args_parser, sys.argv[1:])"  # a log line however quick the task
    result = subprocess.run([sys.executable, "-c", script, "--out", str(tmp_path / "d"), "--persons", "100",
                             "--eval_persons", "100", "--workers", "1"], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True)
    lines = [line for line in result.stderr.splitlines() if line.startswith("persons:")]
    assert lines and lines[-1].startswith("persons: 200/200 (100%)"), result.stderr


def test_an_option_the_criterion_ignores_is_one_warning(capsys):
    import train
    train.get_args_parser().parse_args(["--criterion", "cross_entropy", "--focal_gamma", "3"])
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert warnings == ["warning: --focal_gamma is ignored: --criterion cross_entropy does not take it "
                        "(it is for focal, new_focal)"]
    train.get_args_parser().parse_args(["--criterion", "focal", "--focal_gamma", "3"])
    assert "warning:" not in capsys.readouterr().err
