"""Knowledge distillation (--teacher), out-of-fold self-distillation (--soft_oof) and the ONNX
export (issue 23)."""
import builtins
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from conftest import FAST, one_line_error
from cutmix import mixed_loss
from loss import SoftTargetLoss, build_criterion
from maskcls.distill import Teacher
from maskcls.images import ImageDataset


def stub_teacher(weight, temperature, logits_fn, size=(8, 8)):
    """A Teacher whose one model returns logits_fn(images), without a run folder."""
    teacher = Teacher.__new__(Teacher)
    teacher.models = [logits_fn]
    teacher.inputs = [(size, [0.5] * 3, [0.25] * 3)]
    teacher.student = (size, [0.5] * 3, [0.25] * 3)
    teacher.weight, teacher.temperature, teacher.num_classes, teacher.members = weight, temperature, 4, 1
    return teacher


def test_distillation_blends_the_kl_to_the_teacher_into_the_loss():
    images = torch.randn(6, 3, 8, 8)
    student = torch.randn(6, 4)
    same = stub_teacher(0.5, 4.0, lambda x: student.clone())
    assert same.blend(torch.tensor(2.0), student, images).item() == pytest.approx(1.0, abs=1e-6)  # KL 0: half
    other = torch.randn(6, 4) * 3
    teacher = stub_teacher(0.5, 4.0, lambda x: other)
    p = torch.softmax(other / 4, 1)
    kl = (p * (p.log() - torch.log_softmax(student / 4, 1))).sum(1).mean() * 16
    assert teacher.blend(torch.tensor(2.0), student, images).item() == pytest.approx(1.0 + 0.5 * kl.item(), rel=1e-5)
    assert stub_teacher(0.0, 4.0, lambda x: other).blend(torch.tensor(2.0), student, images).item() == 2.0
    # the gradient of the blended loss pulls the student towards the teacher
    logits = student.clone().requires_grad_()
    teacher.blend(torch.tensor(0.0), logits, images).backward()
    moved = logits.detach() - 0.5 * logits.grad
    before = F.kl_div(torch.log_softmax(student / 4, 1), p, reduction="batchmean")
    after = F.kl_div(torch.log_softmax(moved / 4, 1), p, reduction="batchmean")
    assert after < before


def test_a_teacher_of_another_size_and_normalization_gets_its_own_input():
    seen = {}
    teacher = stub_teacher(0.5, 2.0, lambda x: (seen.setdefault("x", x), torch.zeros(len(x), 4))[1], size=(16, 12))
    teacher.inputs = [((16, 12), [0.0] * 3, [1.0] * 3)]
    raw = torch.rand(2, 3, 8, 8)
    student_batch = (raw - 0.5) / 0.25
    teacher.targets(student_batch)
    assert seen["x"].shape[-2:] == (16, 12)
    assert torch.allclose(F.interpolate(raw, (16, 12), mode="bilinear", antialias=True), seen["x"], atol=1e-5)


def test_soft_targets_blend_the_label_with_out_of_fold_probabilities():
    ce = build_criterion("cross_entropy", 4)
    logits = torch.randn(5, 4)
    labels = torch.tensor([0, 1, 2, 3, 0])
    soft = torch.softmax(torch.randn(5, 4), 1)
    target = torch.cat([labels[:, None].float(), soft], 1)
    loss = SoftTargetLoss(ce, 4, 0.3)
    expected = 0.7 * F.cross_entropy(logits, labels) - 0.3 * (soft * torch.log_softmax(logits, 1)).sum(1).mean()
    assert loss(logits, target).item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss(logits, labels).item() == pytest.approx(F.cross_entropy(logits, labels).item())  # validation
    onehot = torch.cat([labels[:, None].float(), F.one_hot(labels, 4).float()], 1)
    assert loss(logits, onehot).item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    # the mixing contract: lam x loss(y_a) + (1 - lam) x loss(y_b)
    mixed = mixed_loss(loss, logits, target, target.flip(0), 0.25)
    assert mixed.item() == pytest.approx(0.25 * loss(logits, target).item() + 0.75 * loss(logits, target.flip(0)).item())


def test_the_loader_gives_label_and_soft_targets(tmp_path):
    from PIL import Image
    paths = []
    for i in range(2):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    from augmentation import eval_transform
    dataset = ImageDataset(paths, [2, 1], eval_transform((8, 8), (0.5,) * 3, (0.25,) * 3),
                           targets=[np.array([0.1, 0.2, 0.7], dtype=np.float32), None])
    assert torch.allclose(dataset[0][1], torch.tensor([2.0, 0.1, 0.2, 0.7]))
    assert torch.equal(dataset[1][1], torch.tensor([1.0, 0.0, 1.0, 0.0]))  # no soft targets: the one-hot


@pytest.fixture(scope="module")
def teacher_run(work, tmp_path_factory):
    from conftest import run_cli
    runs = tmp_path_factory.mktemp("teacher")
    run_cli("train.py", *FAST, "--epochs", "1", "--kfold", "2", "--name", "kf", "--model_dir", runs, cwd=work)
    return runs / "kf"


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
@pytest.mark.parametrize("extra", [["--teacher"], ["--soft_oof"]])
def test_teacher_and_soft_oof_change_the_loss_and_train(work, tmp_path, run_here, teacher_run, extra):
    base = [*FAST, "--epochs", "2", "--seed", "3", "--cutmix", "True", "--model_dir", tmp_path]
    run_here("train.py", *base, "--name", "plain", cwd=work)
    run_here("train.py", *base, *extra, teacher_run, "--name", "distilled", cwd=work)
    plain, distilled = (pd.read_csv(tmp_path / n / "metrics.csv") for n in ("plain", "distilled"))
    assert np.isfinite(distilled["train_loss"]).all() and np.isfinite(distilled["val_f1"]).all()
    assert not np.allclose(plain["train_loss"], distilled["train_loss"])  # the loss is another
    config = json.loads((tmp_path / "distilled" / "config.json").read_text())
    assert config[extra[0][2:]] == str(teacher_run)
    run_here("inference.py", "--model_dir", tmp_path / "distilled", "--output", tmp_path / "s.csv", cwd=work)


def test_distillation_mistakes_are_one_line(work, tmp_path, run_here):
    one_line_error(run_here("train.py", *FAST, "--teacher", tmp_path / "nowhere", "--model_dir", tmp_path, cwd=work,
                            check=False), "is not a folder")
    (tmp_path / "single").mkdir()
    (tmp_path / "single" / "config.json").write_text("{}")
    one_line_error(run_here("train.py", *FAST, "--soft_oof", tmp_path / "single", "--model_dir", tmp_path, cwd=work,
                            check=False), "no oof.csv")
    one_line_error(run_here("train.py", *FAST, "--soft_oof", tmp_path, "--age_head", "regression", "--model_dir",
                            tmp_path, cwd=work, check=False), "give one")


# ---------------------------------------------------------------- ONNX
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
@pytest.mark.parametrize("model", ["BaseModel", "resnet10t"])
def test_onnx_export_matches_pytorch_on_real_images(work, tmp_path, run_here, model):

    run_here("train.py", *FAST, "--model", model, "--epochs", "1", "--name", "x", "--model_dir", tmp_path, cwd=work)
    result = run_here("export.py", tmp_path / "x", "--onnx", cwd=work)
    difference = float(result.stdout.split("max |difference| of probabilities ")[1].split(",")[0])
    assert difference < 1e-4 and "parity within" in result.stdout
    recipe = json.loads((tmp_path / "x" / "export" / "preprocessing.json").read_text())
    assert recipe["input_size"] == [64, 48] and len(recipe["classes"]) == 18 and recipe["model_file"] == "model.onnx"
    one_line_error(run_here("export.py", tmp_path / "x", "--onnx", check=False, cwd=work), "already exists")


def test_export_without_onnx_installed_is_one_line(tmp_path, run_here, monkeypatch):
    real_import = builtins.__import__

    def no_onnx(name, *args, **kwargs):
        if name in ("onnx", "onnxruntime"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)
    monkeypatch.setattr(builtins, "__import__", no_onnx)
    one_line_error(run_here("export.py", tmp_path, "--onnx", check=False), "pip install onnx onnxruntime")
