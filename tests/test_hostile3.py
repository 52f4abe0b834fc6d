"""Hostile, broken or unlucky input, round three (issue 20): a killed run resumes at once, every file
the project reads back is checked, flags from timm and typos get one clear line, and the cases
not tried before (a k-fold resume, SIGTERM, a read-only folder, odd path names, checkpoints after
a resume, tools on a run without validation)."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import FAST, ROOT, one_line_error, run_cli
from maskcls import cli
from maskcls import readers
from maskcls.cli import UserError
from maskcls.labels import MASK_CLASSES
from maskcls.runfolder import RunLock


def _start(cwd, script, *args):
    return subprocess.Popen([sys.executable, os.path.join(ROOT, script), *map(str, args)], cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def _wait_for(process, path, predicate, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            with contextlib.suppress(pd.errors.EmptyDataError, OSError):
                if predicate(pd.read_csv(path)):
                    return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.02)
    raise AssertionError("the run did not get there in time")


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
        return f.read().split(")")[-1].split()[0] != "Z"  # a zombie is dead
    return True


# ---------------------------------------------------------------- the lock and a killed run's workers
def _lock_then_fork(folder, ready):
    """In a forked process: take the run lock, fork a child that outlives us (as a DataLoader
    worker does), say so through the pipe `ready`, and wait to be killed."""
    RunLock(folder).acquire()
    if os.fork() == 0:
        time.sleep(5)
        os._exit(0)
    os.write(ready, b"locked")
    time.sleep(60)
    os._exit(0)


def test_a_run_lock_belongs_to_its_process_not_to_forked_children(tmp_path):
    read, write = os.pipe()
    holder = os.fork()
    if holder == 0:
        try:
            _lock_then_fork(str(tmp_path), write)
        finally:
            os._exit(1)
    try:
        assert os.read(read, 6) == b"locked"
        with pytest.raises(UserError, match=f"in use by process {holder}"):
            RunLock(str(tmp_path)).acquire()
        os.kill(holder, signal.SIGKILL)
        os.waitpid(holder, 0)
        with RunLock(str(tmp_path)):  # at once, though the forked child still sleeps
            pass
    finally:
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(holder, signal.SIGKILL)
            os.waitpid(holder, 0)
    with RunLock(str(tmp_path)), pytest.raises(UserError, match="in use by process .* \\(this one\\)"):
        RunLock(str(tmp_path)).acquire()  # a second lock in one process would release the first on close


WORKERS_THEN_KILLED = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    import torch
    from maskcls.images import make_loader
    class Pids(torch.utils.data.Dataset):
        def __len__(self):
            return 64
        def __getitem__(self, i):
            return os.getpid()
    loader = make_loader(Pids(), 4, 3, "cpu")
    print(" ".join(str(p) for p in sorted({{int(p) for batch in loader for p in batch}})), flush=True)
    time.sleep(60)
""")


def test_dataloader_workers_die_with_a_killed_parent():
    process = subprocess.Popen([sys.executable, "-c", WORKERS_THEN_KILLED.format(root=ROOT)], stdout=subprocess.PIPE,
                               text=True)
    workers = [int(p) for p in process.stdout.readline().split()]
    assert len(workers) == 3 and all(map(_alive, workers))
    process.kill()
    process.wait()
    deadline = time.time() + 1.0  # PyTorch's own watchdog takes up to 5 s
    while any(map(_alive, workers)) and time.time() < deadline:
        time.sleep(0.02)
    assert not any(map(_alive, workers))


KILL_ARGS = ["--model", "BaseModel", "--resize", "64,48", "--epochs", "4", "--batch_size", "16", "--seed", "7",
             "--cutmix", "True", "--augmentation", "AlbuAugmentation"]


@pytest.fixture(scope="module")
def uninterrupted(work, tmp_path_factory):
    runs = tmp_path_factory.mktemp("uninterrupted")
    run_cli("train.py", *KILL_ARGS, "--num_workers", "0", "--name", "cut", "--model_dir", runs, cwd=work)
    return pd.read_csv(runs / "cut" / "metrics.csv").drop(columns="seconds")


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
@pytest.mark.parametrize("workers", [None, "4"])
def test_kill_then_resume_at_once(work, tmp_path, uninterrupted, workers):
    extra = ["--num_workers", workers] if workers else []  # None: the default worker count
    process = _start(work, "train.py", *KILL_ARGS, *extra, "--name", "cut", "--model_dir", tmp_path)
    run_dir = tmp_path / "cut"
    _wait_for(process, run_dir / "metrics.csv", lambda m: len(m) >= 2)
    process.kill()
    process.wait()
    with RunLock(str(run_dir)):  # free the moment the run is dead, whatever its workers do
        pass
    resumed = run_cli("train.py", "--resume", run_dir, cwd=work)
    assert f"resuming {run_dir} after epoch" in resumed.stdout
    pd.testing.assert_frame_equal(uninterrupted, pd.read_csv(run_dir / "metrics.csv").drop(columns="seconds"))


# ---------------------------------------------------------------- held-out files, read back checked
def _heldout_run(folder, rows=14):
    """A k-fold parent with a valid oof.csv of `rows` images (2 persons' photos each)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(18), size=rows)
    frame = pd.DataFrame(probs.round(6), columns=MASK_CLASSES)
    frame.insert(0, "pred", probs.argmax(1))
    frame.insert(0, "label", np.arange(rows) % 18)
    frame.insert(0, "fold", 1)
    frame.insert(0, "person", [f"p{i // 7}" for i in range(rows)])
    frame.insert(0, "path", [f"images/p{i // 7}/mask{i % 7}.jpg" for i in range(rows)])
    frame.to_csv(folder / "oof.csv", index=False)
    (folder / "config.json").write_text(json.dumps({"classes": MASK_CLASSES, "fold_dirs": ["fold1"],
                                                    "data_dir": str(folder / "data")}))
    return folder


def _set_cell(run, row, column, value):
    frame = pd.read_csv(run / "oof.csv", dtype=str, keep_default_na=False)
    frame.loc[row, column] = value
    frame.to_csv(run / "oof.csv", index=False)


BAD_CELLS = [("label", "", "row 4"), ("label", "abc", "'abc' is not a class index"),
             ("label", "99", "'99' is not a class index 0..17"), ("label", "-1", "'-1'"), ("label", "cat", "'cat'"),
             (MASK_CLASSES[2], "nan", "'nan' is not a probability"), (MASK_CLASSES[2], "-5", "'-5'"),
             (MASK_CLASSES[2], "abc", "'abc'"), ("pred", "18", "'18'"), ("path", "", "row 4 has no path")]


@pytest.mark.parametrize("column,value,needle", BAD_CELLS)
def test_a_bad_held_out_cell_is_one_line_naming_file_row_and_column(tmp_path, column, value, needle):
    from maskcls.heldout import read_heldout
    run = _heldout_run(tmp_path / "kf")
    read_heldout(run)  # the untouched file reads
    _set_cell(run, 3, column, value)
    with pytest.raises(UserError, match="oof.csv") as err:
        read_heldout(run)
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_truncated_rows_and_missing_class_columns_are_refused(tmp_path):
    from maskcls.heldout import read_heldout
    run = _heldout_run(tmp_path / "kf")
    text = (run / "oof.csv").read_text()
    (run / "oof.csv").write_text(text[:len(text) - 40])  # a last row cut short, as by a full disk
    with pytest.raises(UserError, match="row 14 has .* cells|cut short|not a probability"):
        read_heldout(run)
    run = _heldout_run(tmp_path / "kf16")
    frame = pd.read_csv(run / "oof.csv").drop(columns=MASK_CLASSES[-2:])
    frame.to_csv(run / "oof.csv", index=False)
    with pytest.raises(UserError, match="16 class column.*18 classes"):
        read_heldout(run)


@pytest.mark.parametrize("tool,args", [("tune_bias.py", []), ("audit.py", ["--data_dir", "."]),
                                       ("persons.py", ["--data_dir", "."]), ("ensemble.py", ["--fit"]),
                                       ("agecuts.py", [])])
def test_every_tool_refuses_a_bad_held_out_file_in_one_line(tmp_path, run_here, tool, args):
    run = _heldout_run(tmp_path / "kf")
    _set_cell(run, 5, MASK_CLASSES[0], "nan")
    runs = [run, run] if tool == "ensemble.py" else [run]
    result = run_here(tool, *args, *runs, cwd=tmp_path, check=False)
    one_line_error(result, "oof.csv: row 6", "'nan' is not a probability")


def test_persons_refuses_missing_images_and_paths_leaving_the_data_folder(tmp_path, run_here):
    run = _heldout_run(tmp_path / "kf")
    data = tmp_path / "data"
    for path in pd.read_csv(run / "oof.csv")["path"]:
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        (data / path).write_bytes(b"")
    os.remove(data / "images/p1/mask3.jpg")
    result = run_here("persons.py", run, "--data_dir", data, check=False)
    one_line_error(result, "'images/p1/mask3.jpg' is not an image under")
    _set_cell(run, 0, "path", "../../secret.jpg")
    result = run_here("persons.py", run, "--data_dir", data, check=False)
    one_line_error(result, "'../../secret.jpg' leaves the data folder")


def test_audit_leaves_no_folder_when_the_disk_fills(tmp_path, run_here, monkeypatch):
    import errno

    from maskcls import plots
    run = _heldout_run(tmp_path / "kf")
    data = tmp_path / "data"
    for path in pd.read_csv(run / "oof.csv")["path"]:
        (data / path).parent.mkdir(parents=True, exist_ok=True)
        (data / path).write_bytes(b"")

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    monkeypatch.setattr(plots, "captioned_grid_png", full)
    result = run_here("audit.py", run, "--data_dir", data, check=False)
    one_line_error(result, "disk full")
    assert not (run / "audit").exists()


# ---------------------------------------------------------------- bias.json, recipes, config.json
def test_bias_files_are_checked_and_no_bias_does_not_read_them(tmp_path):
    import inference
    from maskcls.heldout import load_bias
    run = tmp_path / "run"
    run.mkdir()
    probs = np.full((3, 18), 1 / 18)
    for bias, needle in ((float("nan"), "expected a finite number"), (float("inf"), "expected a finite number"),
                         (1e9, r"within \+-50")):
        values = [0.0] * 18
        values[4] = bias
        (run / "bias.json").write_text(json.dumps({"classes": MASK_CLASSES, "bias": values}))
        with pytest.raises(UserError, match=needle):
            load_bias(str(run), MASK_CLASSES)
    (run / "bias.json").write_text(json.dumps({"classes": MASK_CLASSES, "bias": [0.0] * 18, "f1_before": "high"}))
    with pytest.raises(UserError, match="f1_before is 'high'"):
        load_bias(str(run), MASK_CLASSES)
    (run / "bias.json").write_text("[1, 2")  # not even JSON: --no_bias must not read it
    assert inference.maybe_bias(probs, [str(run)], MASK_CLASSES, off=True) is probs
    with pytest.raises(UserError, match="not valid JSON"):
        inference.maybe_bias(probs, [str(run)], MASK_CLASSES, off=False)


def test_recipes_are_checked_and_work_from_any_folder(tmp_path, monkeypatch):
    import ensemble
    import inference
    for folder in ("runs/a", "runs/b"):
        _heldout_run(tmp_path / folder)
    monkeypatch.chdir(tmp_path)
    args = ensemble.get_args_parser().parse_args(["--fit", "runs/a", "runs/b", "--recipe", "out/recipe.json"])
    ensemble.main(args)
    saved = json.loads((tmp_path / "out" / "recipe.json").read_text())
    assert all(m.startswith("../runs/") for m in saved["members"])  # relative to the recipe
    monkeypatch.chdir(tmp_path / "out")  # another working folder: the members are still found
    members, weights = inference.read_recipe("recipe.json")
    assert all(os.path.isdir(m) for m in members) and abs(sum(weights) - 1) < 1e-6
    for weights, needle in (([float("nan")] * len(members), "not a finite positive number"),
                            ([0.0] * len(members), "not a finite positive number"), ([1.0] * 5, "one weight per member"),
                            ("x", "one weight per member")):
        (tmp_path / "bad.json").write_text(json.dumps({**saved, "weights": weights}))
        with pytest.raises(UserError, match=needle):
            inference.read_recipe(str(tmp_path / "bad.json"))


GOOD_CONFIG = {"model": "BaseModel", "num_classes": 18, "classes": MASK_CLASSES, "input_size": [64, 48],
               "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.mark.parametrize("change,needle", [
    ({"input_size": "abc"}, "input_size is 'abc'; expected [H, W]"),
    ({"num_classes": "18"}, "num_classes is '18'; expected a whole number"),
    ({"classes": 5}, "classes is 5; expected a list"),
    ({"std": [0.2, 0, 0.2]}, "std is [0.2, 0, 0.2]; expected three numbers > 0"),
    ({"mean": [float("nan")] * 3}, "mean is [nan, nan, nan]"),
    ({"num_classes": 17}, "18 classes listed but num_classes is 17"),
    ({"model": None}, "model is None"),
    ({"fold_dirs": ["../elsewhere"]}, "fold_dirs is ['../elsewhere']"),
])
def test_a_bad_config_json_is_one_line(tmp_path, change, needle):
    (tmp_path / "config.json").write_text(json.dumps({**GOOD_CONFIG, **change}))
    with pytest.raises(UserError, match="config.json") as err:
        readers.read_config(str(tmp_path))
    assert needle in str(err.value)


def test_a_config_json_that_is_not_an_object(tmp_path):
    readers.check_config(dict(GOOD_CONFIG))
    (tmp_path / "config.json").write_text(json.dumps([GOOD_CONFIG]))
    with pytest.raises(UserError, match="holds a JSON list, expected"):
        readers.read_config(str(tmp_path))


def test_a_model_option_from_config_json_is_parsed_as_its_flag_would_be():
    import model
    from maskcls.registry import Option

    @model.MODELS.register("issue20Net", options={"width": Option("channels", type=cli.positive_int)})
    def net(num_classes, width=8, **kwargs):
        return torch.nn.Sequential(torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))
    try:
        config = {**GOOD_CONFIG, "model": "issue20Net", "width": "-3"}
        with pytest.raises(UserError, match="config.json: width is '-3'"):
            model.build_from_config(config, source="config.json")
        model.build_from_config({**config, "width": 16}, source="config.json")
    finally:
        model.MODELS._entries.pop("issue20Net")


def test_answers_with_a_bad_label_are_one_line(tmp_path):
    import inference
    (tmp_path / "answers.csv").write_text("ImageID,ans\na.jpg,3\nb.jpg,cat\n")
    with pytest.raises(UserError, match="row 2 \\(ImageID 'b.jpg'\\), column 'ans': 'cat'"):
        inference.score(str(tmp_path / "answers.csv"), ["a.jpg", "b.jpg"], np.array([3, 3]), 18)


def test_damaged_face_box_cache_rows_are_detected_again(tmp_path):
    import facecrop
    path = tmp_path / ".face_boxes.csv"
    rows = [["a.jpg", "f1", 100, 80, 10, 10, 50, 50], ["b.jpg", "f2", 100, 80, "nan", 10, 50, 50],
            ["c.jpg", "f3", 0, 80, "", "", "", ""]]
    pd.DataFrame([[*row, facecrop.DETECTOR_TAG] for row in rows], columns=facecrop.CACHE_COLUMNS).to_csv(path,
                                                                                                     index=False)
    entries = facecrop.load_cache(str(path))
    assert set(entries) == {"a.jpg"}


def test_a_damaged_metrics_csv_is_one_line_on_resume(tmp_path):
    from maskcls.runfolder import RunLog
    (tmp_path / "metrics.csv").write_text("epoch,train_loss\n1,0.5\nxx,0.4\n")
    with pytest.raises(UserError, match="row 2 starts with 'xx'"):
        RunLog(str(tmp_path), 3, resume_epoch=1)


# ---------------------------------------------------------------- flags
@pytest.mark.parametrize("args,needle", [
    (["--opt_betas", "2,3"], "--opt_betas 2,3: each beta"),
    (["--opt-betas", "nan,0.999"], "argument --opt-betas: expected comma-separated (finite) numbers"),
    (["--opt_kwargs", "lr=0.5"], "--opt_kwargs lr=0.5: lr has its own flag, --lr"),
    (["--aa", "rand-m9-xx"], "cannot read the part 'xx'"),
    (["--aa", "augmix-m5-foo"], "cannot read the part 'foo'"),
    (["--aa", "original-mstd"], "cannot read the part 'mstd'"),
    (["--aa", "randaug"], "starts with 'randaug'"),
    (["--decay_milestones", "60,30"], "increasing order"),
    (["--decay_milestones=-5,30"], "increasing order"), (["--decay_milestones", "0,30"], "increasing order"),
    (["--freeze_epochs", "10", "--epochs", "10"], "the backbone would never train"),
    (["--aug_off_epoch", "11", "--epochs", "10"], "it would never take effect"),
    (["--cycle_limit", "2", "--scheduler", "step"], "--scheduler step has no cycles"),
    (["--cycle_decay", "1.5"], "argument --cycle_decay:"), (["--backbone_lr_ratio", "0.5"], "--backbone_lr_ratio"),
    (["--scheduler", "onecycle", "--epochs", "0"], "--epochs"),
    (["--swa_start", "5", "--epochs", "4"], "--swa_start 5: an epoch of the run"),
    (["--swa_start", "2", "--freeze_epochs", "2", "--epochs", "4"], "after the frozen ones"),
    (["--swa_lr", "1e-3"], "give --swa_start E too"), (["--swa_lr", "0"], "argument --swa_lr:"),
    (["--refit", "--val_ratio", "0"], "--refit: it learns its epoch count from validation"),
    (["--refit", "--scheduler", "plateau"], "--refit: --scheduler plateau"), (["--refit", "maybe"], "--refit"),
    (["--lr-base", "0.1"], "--lr-base is timm's flag, not this one's"),
    (["--num-classes", "18"], "--num-classes is timm's flag"),
    (["--mixup", "0.2"], "timm's alpha is --mixup_alpha 0.2"),
    (["--cutmix", "1.0"], "timm's alpha is --cutmix_alpha 1.0"),
    (["--cutmix-alpha", "-1"], "argument --cutmix-alpha:"),
    (["--input-size", "1", "224", "224"], "C is 3"),
    (["--model-emaa"], "unrecognized arguments: --model-emaa"),
])
def test_bad_flags_are_one_line_before_any_work(work, tmp_path, run_here, args, needle):
    runs = tmp_path / "runs"
    result = run_here("train.py", *FAST, *args, "--model_dir", runs, cwd=work, check=False)
    one_line_error(result, needle)
    assert not runs.exists() or not os.listdir(runs)


def test_layer_decay_on_a_model_timm_cannot_split(work):
    from maskcls import optim
    from model import create_model
    with pytest.raises(UserError, match="cannot split BaseModel into layers"):
        optim.build_optimizer("adamw", create_model("BaseModel", 18), 1e-3, 0.05, layer_decay=0.7)
    optim.build_optimizer("adamw", create_model("resnet18", 18), 1e-3, 0.05, layer_decay=0.7)


@pytest.mark.parametrize("args,expected", [
    (["--model-ema"], {"ema": 0.9998}), (["--model-ema", "--model-ema-decay", "0.99"], {"ema": 0.99}),
    (["--input-size", "3", "224", "192"], {"resize": (224, 192)}), (["--torchcompile"], {"compile": True}),
    (["--torchcompile", "inductor", "--epochs", "3"], {"compile": True, "epochs": 3}),
    (["--opt-betas", "0.9", "0.98"], {"opt_betas": [0.9, 0.98]}), (["--amp-dtype", "bfloat16"], {"precision": "bf16"}),
    (["--scale", "0.5", "1"], {"scale": [0.5, 1.0]}), (["--mixup-off-epoch", "8"], {"mix_off_epoch": 8}),
    (["--experiment", "x"], {"name": "x"}), (["--initial-checkpoint", "w.pth"], {"weights": "w.pth"}),
])
def test_timm_flags_that_mean_the_same_are_accepted(args, expected):
    import train
    parsed = vars(train.get_args_parser().parse_args(args))
    assert {k: parsed[k] for k in expected} == expected


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_maskbasedataset_warns_that_validation_overestimates(work, tmp_path, run_here):
    result = run_here("train.py", *FAST, "--epochs", "1", "--dataset", "MaskBaseDataset", "--model_dir", tmp_path,
                      cwd=work)
    assert "warning: --dataset MaskBaseDataset splits images, not persons" in result.stderr
    assert "+0.061" in result.stderr
    result = run_here("train.py", *FAST, "--epochs", "1", "--model_dir", tmp_path, cwd=work)
    assert "MaskBaseDataset" not in result.stderr and "run eta" not in result.stdout  # one epoch: nothing left


def test_progress_lines_in_a_log_are_few_with_a_running_mean_and_time_left(monkeypatch, capsys):
    clock = {"now": 1000.0}
    monkeypatch.setattr(cli.time, "time", lambda: clock["now"])
    bar = cli.LogProgress(range(100), desc="epoch 1/3", unit="batch", file=sys.stderr)
    total = 0.0
    for i, _ in enumerate(bar):
        total += i
        cli.live_postfix(bar, lambda: {"loss": f"{total / (i + 1):.2f}"}, i)
        clock["now"] += 0.5  # 50 s for the epoch
    lines = capsys.readouterr().err.strip().splitlines()
    assert 2 <= len(lines) <= 5, lines
    assert "left" in lines[0] and "loss=" in lines[0]
    means = [float(line.rsplit("loss=", 1)[1]) for line in lines]
    assert means == sorted(means) and means[-1] == pytest.approx(49.5)  # the running mean at each line
    quick = cli.LogProgress(range(10), desc="short", file=sys.stderr)
    for _ in quick:
        clock["now"] += 0.5
    assert capsys.readouterr().err == ""  # a task of seconds says nothing


def test_run_clock_counts_every_fold():
    from maskcls.fit import RunClock
    clock = RunClock(3 * 4)  # 3 folds left of 4 epochs
    assert clock.tick(10.0) == pytest.approx(110.0)
    assert clock.tick(20.0) == pytest.approx(150.0)


def test_sample_data_says_where_the_planted_labels_are(tmp_path, run_here):
    result = run_here("make_sample_data.py", "--out", tmp_path / "d", "--persons", "60", "--eval_persons", "5",
                      "--difficulty", "real")
    assert "wrong training labels" in result.stdout and "label_noise.csv" in result.stdout


# ---------------------------------------------------------------- not tried before
@pytest.fixture()
def read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        if os.geteuid() == 0:
            pytest.skip("cannot mount a read-only tmpfs here, and root writes through file modes")
        folder.chmod(0o555)
    try:
        yield folder
    finally:
        if mounted.returncode == 0:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


def test_output_into_a_read_only_folder_is_one_line(work, tmp_path, read_only_folder, run_here):
    result = run_here("train.py", *FAST, "--epochs", "1", "--model_dir", read_only_folder / "runs", cwd=work,
                      check=False)
    one_line_error(result, str(read_only_folder))
    result = run_here("make_sample_data.py", "--out", read_only_folder / "d", "--persons", "2", "--eval_persons", "1",
                      check=False)
    one_line_error(result, str(read_only_folder))


@pytest.fixture(scope="module")
def no_val_run(work, tmp_path_factory):
    runs = tmp_path_factory.mktemp("noval")
    run_cli("train.py", *FAST, "--epochs", "1", "--val_ratio", "0", "--name", "all", "--model_dir", runs, cwd=work)
    return runs / "all"


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
@pytest.mark.parametrize("tool", ["tune_bias.py", "audit.py", "persons.py", "agecuts.py", "ensemble.py"])
def test_tools_on_a_run_without_validation_say_so_in_one_line(work, no_val_run, run_here, tool):
    runs = ["--fit", no_val_run, no_val_run] if tool == "ensemble.py" else [no_val_run]
    result = run_here(tool, *runs, cwd=work, check=False)
    one_line_error(result, "neither oof.csv", "nothing held out")


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_sigterm_saves_and_exits_like_ctrl_c_and_checkpoints_survive_the_resume(work, tmp_path):
    args = [*FAST, "--epochs", "4", "--checkpoint_hist", "2", "--average_top", "2", "--seed", "3"]
    run_cli("train.py", *args, "--name", "straight", "--model_dir", tmp_path, cwd=work)
    process = _start(work, "train.py", *args, "--name", "term", "--model_dir", tmp_path)
    run_dir = tmp_path / "term"
    _wait_for(process, run_dir / "metrics.csv", lambda m: len(m) >= 2)
    process.send_signal(signal.SIGTERM)
    out = process.communicate(timeout=120)[0]
    assert process.returncode == 143, out
    assert "stopped by SIGTERM" in out and "--resume" in out and "Traceback" not in out
    assert torch.load(run_dir / "last.pth", weights_only=True)["epoch"] >= 1
    with RunLock(str(run_dir)):  # released
        pass
    run_cli("train.py", "--resume", run_dir, cwd=work)
    straight = tmp_path / "straight"
    pd.testing.assert_frame_equal(pd.read_csv(straight / "metrics.csv").drop(columns="seconds"),
                                  pd.read_csv(run_dir / "metrics.csv").drop(columns="seconds"))
    assert sorted(p.name for p in run_dir.glob("top-*.pth")) == sorted(p.name for p in straight.glob("top-*.pth"))
    assert len(list(run_dir.glob("top-*.pth"))) == 2
    for name in ("averaged.pth", "best.pth"):
        resumed, whole = (torch.load(d / name, weights_only=True)["model"] for d in (run_dir, straight))
        assert all(torch.equal(resumed[k], whole[k]) for k in whole)
    run_cli("inference.py", "--model_dir", run_dir, "--checkpoint", "averaged.pth", "--output", tmp_path / "a.csv",
            cwd=work)


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_kfold_resume_after_a_kill_in_fold_two_gives_the_same_oof(work, tmp_path):
    args = [*FAST, "--epochs", "3", "--kfold", "2", "--seed", "4"]
    run_cli("train.py", *args, "--name", "straight", "--model_dir", tmp_path, cwd=work)
    process = _start(work, "train.py", *args, "--name", "killed", "--model_dir", tmp_path)
    run_dir = tmp_path / "killed"
    _wait_for(process, run_dir / "fold2" / "metrics.csv", lambda m: len(m) >= 1)
    process.kill()
    process.wait()
    assert not (run_dir / "oof.csv").exists()
    resumed = run_cli("train.py", "--resume", run_dir, cwd=work)
    assert "fold1 of 2: finished earlier" in resumed.stdout and "fold2 of 2 (resumed)" in resumed.stdout
    straight = pd.read_csv(tmp_path / "straight" / "oof.csv")
    pd.testing.assert_frame_equal(straight, pd.read_csv(run_dir / "oof.csv"))


ODD = "runs dir/ünï cödé"  # spaces and non-ASCII in the run folder's path


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_a_run_folder_with_spaces_and_non_ascii_through_every_command(work, tmp_path, run_here):
    parent = tmp_path / ODD
    run_here("train.py", *FAST, "--epochs", "1", "--kfold", "2", "--age_head", "regression", "--name", "kf ö",
             "--model_dir", parent, cwd=work)
    run = parent / "kf ö"
    assert (run / "oof.csv").exists() and (run / "age_cuts.json").exists()
    run_here("inference.py", "--model_dir", run, "--output", tmp_path / ODD / "sub mission.csv", "--save_probs",
             cwd=work)
    run_here("tune_bias.py", run, "--force", cwd=work)
    run_here("inference.py", "--model_dir", run, "--output", tmp_path / ODD / "biased.csv", cwd=work)
    run_here("audit.py", run, "--top", "5", cwd=work)
    assert (run / "audit" / "fixes.csv").exists()
    run_here("persons.py", run, cwd=work)
    run_here("agecuts.py", run, "--dry_run", cwd=work)
    run_here("ensemble.py", "--fit", run, run, "--recipe", tmp_path / ODD / "récipe.json", cwd=work)
    run_here("inference.py", "--recipe", tmp_path / ODD / "récipe.json", "--output", tmp_path / ODD / "r.csv",
             "--no_bias", cwd=work)
    run_here("ensemble.py", tmp_path / ODD / "sub mission_probs.csv", tmp_path / ODD / "sub mission_probs.csv",
             "--output", tmp_path / ODD / "ens.csv", cwd=work)
    assert len(pd.read_csv(tmp_path / ODD / "ens.csv")) == len(pd.read_csv(tmp_path / ODD / "r.csv"))
