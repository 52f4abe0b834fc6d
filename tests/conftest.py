"""Shared fixtures: small generated datasets in the competition layout, made once per session."""
import os
import shutil
import subprocess
import sys

import pytest

import make_sample_data

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
