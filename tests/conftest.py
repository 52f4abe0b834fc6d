"""Shared fixtures: small generated datasets in the competition layout, made once per session."""
import importlib
import os
import re
import shutil
import subprocess
import sys

import pytest

import make_sample_data
from maskcls import cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def sample_data(tmp_path_factory):
    """30 train persons (every gender x age cell present) and 10 eval persons."""
    out = tmp_path_factory.mktemp("sample") / "data"
    make_sample_data.generate(str(out), persons=30, eval_persons=10, seed=0)
    return out


FAST = ["--model", "BaseModel", "--resize", "64,48", "--batch_size", "32", "--num_workers", "0"]  # tiny runs


@pytest.fixture(scope="module")
def work(sample_data, tmp_path_factory):
    """A working folder holding the sample data at data/, where the CLIs look by default."""
    folder = tmp_path_factory.mktemp("work")
    shutil.copytree(sample_data, folder / "data")
    return folder


def run_cli(script, *args, cwd=None, check=True, timeout=900):
    """Run one of the project's CLIs as a real subprocess; returns the CompletedProcess."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, os.path.join(ROOT, script), *map(str, args)],
                            cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{script} {' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


PROGRESS_LINE = re.compile(r"^[^:]+: \d+(/\d+ \(\d+%\))? \w+, \d+ s, ")  # cli.LogProgress, in a log


def one_line_error(result, *needles):
    """A CompletedProcess that failed the way a user error should: exit 2, one line on stderr (progress
    lines aside), no traceback, holding every needle. Returns the line."""
    assert result.returncode == 2, (result.stdout[-2000:], result.stderr[-2000:])
    lines = [line for line in result.stderr.strip().splitlines() if not PROGRESS_LINE.match(line)]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.fixture()
def run_here(capsys, monkeypatch):
    """run_cli's twin that runs a CLI's main in this process (no interpreter start-up, ~9 s a call):
    run_here("train.py", *args, cwd=..., check=...) -> CompletedProcess with the exit code and output."""
    def call(script, *args, cwd=None, check=True):
        module = importlib.import_module(script[:-len(".py")])
        if cwd is not None:
            monkeypatch.chdir(cwd)
        monkeypatch.setattr(sys, "argv", [script])
        capsys.readouterr()
        try:
            cli.run(module.main, module.get_args_parser, [str(a) for a in args])
            code = 0
        except SystemExit as exit_:
            code = exit_.code
        out, err = capsys.readouterr()
        if check and code != 0:
            raise AssertionError(f"{script} {args} failed ({code}):\n{out[-3000:]}\n{err[-3000:]}")
        return subprocess.CompletedProcess(args, code, out, err)
    return call


def lrs_by_epoch(scheduler, optimizer, epochs):
    """The first group's learning rate at the start of each of `epochs` epochs, stepping `scheduler`."""
    out = []
    for epoch in range(1, epochs + 1):
        out.append(optimizer.param_groups[0]["lr"])
        scheduler.step(epoch)
    return out
