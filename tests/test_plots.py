"""plots.py: every figure writes a PNG and returns a Figure; the numbers behind them are right."""
import numpy as np
import pandas as pd
import pytest
import timm
import torch
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import confusion_matrix

from augmentation import AUGMENTATIONS, eval_transform, seed_transform
from cutmix import BatchMixer
from maskcls import plots
from maskcls.cli import UserError
from maskcls.labels import MASK_CLASSES, NUM_CLASSES, encode_label
from model import create_model

MEAN, STD = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)


@pytest.fixture
def images(tmp_path):
    """Eight small portrait photos of random colour blocks."""
    rng = np.random.default_rng(0)
    paths = []
    for i in range(8):
        pixels = np.kron(rng.integers(0, 256, (4, 3, 3)), np.ones((10, 10, 1))).astype(np.uint8)
        paths.append(str(tmp_path / f"img{i}.jpg"))
        Image.fromarray(pixels).save(paths[-1])
    return paths


def png_size(path):
    with Image.open(path) as image:
        image.verify()
    with Image.open(path) as image:
        return image.size


def random_predictions(n=200, classes=NUM_CLASSES, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    preds = np.where(rng.random(n) < 0.6, labels, rng.integers(0, classes, n))
    return labels, preds


# ---------------------------------------------------------------- confusion matrices
def test_confusion_matrices_match_sklearn():
    labels, preds = random_predictions()
    labels[labels == 5] = 4  # class 5 has no image: its rate row is NaN
    counts, rates = plots.confusion_matrices(labels, preds, NUM_CLASSES)
    np.testing.assert_array_equal(counts, confusion_matrix(labels, preds, labels=list(range(NUM_CLASSES))))
    assert np.isnan(rates[5]).all()
    np.testing.assert_allclose(np.delete(rates, 5, axis=0).sum(1), 1.0)


@pytest.mark.parametrize("classes", [2, NUM_CLASSES, 45])
def test_confusion_matrix_png(tmp_path, classes):
    labels, preds = random_predictions(classes=classes)
    names = MASK_CLASSES if classes == NUM_CLASSES else [f"class_{i}" for i in range(classes)]
    fig = plots.confusion_matrix_png(str(tmp_path), labels, preds, names, title="best epoch 3")
    assert isinstance(fig, Figure)
    width, height = png_size(tmp_path / "confusion_matrix.png")
    assert width >= (1000 if classes >= NUM_CLASSES else 600) and height >= 300


def test_task_confusions_hand_example():
    labels = [encode_label(0, 0, 0), encode_label(2, 1, 2), encode_label(1, 0, 1), encode_label(0, 1, 0)]
    preds = [encode_label(0, 0, 0), encode_label(2, 0, 2), encode_label(0, 0, 1), encode_label(0, 1, 2)]
    tasks = plots.task_confusions(labels, preds)
    np.testing.assert_array_equal(tasks["mask"][0], [[2, 0, 0], [1, 0, 0], [0, 0, 1]])
    np.testing.assert_array_equal(tasks["gender"][0], [[2, 0], [1, 1]])
    np.testing.assert_array_equal(tasks["age"][0], [[1, 0, 1], [0, 1, 0], [0, 0, 1]])
    assert tasks["gender"][1] == pytest.approx((0.8 + 2 / 3) / 2)  # F1 of M 0.8, of F 2/3


def test_task_confusion_png(tmp_path):
    labels, preds = random_predictions()
    fig = plots.task_confusion_png(str(tmp_path / "sub" / "tasks.png"), labels, preds)
    assert isinstance(fig, Figure)
    assert png_size(tmp_path / "sub" / "tasks.png")[0] >= 900


# ---------------------------------------------------------------- curves
def metrics_frame(tasks=True):
    frame = pd.DataFrame({"epoch": [1, 2, 3, 4], "train_loss": [2.0, 1.5, 1.2, 1.0], "train_acc": [.3, .5, .6, .7],
                          "val_loss": [2.1, 1.6, 1.4, 1.5], "val_acc": [.3, .4, .5, .5], "val_f1": [.2, .5, .5, .4],
                          "lr": [1e-3, 8e-4, 5e-4, 2e-4], "seconds": [1.0] * 4})
    if tasks:
        frame = frame.assign(val_f1_mask=[.5, .7, .8, .8], val_f1_gender=[.6, .7, .7, .7], val_f1_age=[.3, .4, .4, .4])
    return frame


def test_best_epoch_ties_go_to_the_later_epoch():
    assert plots.best_epoch(metrics_frame())["epoch"] == 3


@pytest.mark.parametrize("tasks", [True, False])
def test_curves_png_from_csv_and_frame(tmp_path, tasks):
    metrics_frame(tasks).to_csv(tmp_path / "metrics.csv", index=False)
    fig = plots.curves_png(str(tmp_path), str(tmp_path / "metrics.csv"))
    assert isinstance(fig, Figure) and png_size(tmp_path / "curves.png")[0] >= 800
    assert isinstance(plots.curves_png(str(tmp_path / "b.png"), metrics_frame(tasks).head(1)), Figure)


def test_curves_png_bad_input(tmp_path):
    with pytest.raises(UserError, match="not found"):
        plots.curves_png(str(tmp_path), str(tmp_path / "missing.csv"))
    with pytest.raises(UserError, match="val_f1"):
        plots.curves_png(str(tmp_path), metrics_frame().drop(columns="val_f1"))


# ---------------------------------------------------------------- image grids
def test_aug_preview_png_leaves_the_training_streams_alone(tmp_path, images):
    transform = AUGMENTATIONS.build("AlbuAugmentation", resize=(64, 48), mean=MEAN, std=STD)
    mixer = BatchMixer(cutmix=True, prob=0.5, seed=1)
    seed_transform(transform, 7)
    state = mixer.rng.bit_generator.state
    fig = plots.aug_preview_png(str(tmp_path), images, transform, MEAN, STD, mixer=mixer, n=6)
    assert isinstance(fig, Figure)
    width, height = png_size(tmp_path / "aug_preview.png")
    assert width >= 6 * 100 and height >= 5 * 100  # 6 columns; original, 3 draws, mixed
    after = transform(image=np.zeros((40, 30, 3), np.uint8))["image"]
    seed_transform(transform, 7)
    np.testing.assert_array_equal(after, transform(image=np.zeros((40, 30, 3), np.uint8))["image"])
    assert mixer.rng.bit_generator.state == state and mixer.prob == 0.5
    assert isinstance(plots.aug_preview_png(str(tmp_path / "plain.png"), images, transform, MEAN, STD, n=3), Figure)


def test_top_mistakes_most_confident_first():
    labels = [0, 1, 2, 0, 1]
    preds = [1, 1, 0, 2, 0]  # images 0, 2, 3, 4 are wrong
    probs = np.array([[.3, .6, .1], [.1, .8, .1], [.9, .05, .05], [.2, .1, .7], [.6, .3, .1]])
    assert plots.top_mistakes(labels, preds, probs, n=3).tolist() == [2, 3, 0]
    assert plots.top_mistakes(labels, labels, probs, n=3).tolist() == []


def test_mistakes_png(tmp_path, images):
    labels = [0, 1, 2, 3, 4, 5, 6, 7]
    preds = [0, 2, 2, 5, 4, 1, 6, 0]
    probs = np.full((8, NUM_CLASSES), 0.01)
    probs[np.arange(8), preds] = 0.8
    fig = plots.mistakes_png(str(tmp_path), images, labels, preds, probs, MASK_CLASSES, regions=[(0, 0, 20, 30)] * 8)
    assert isinstance(fig, Figure) and png_size(tmp_path / "mistakes.png")[0] >= 200
    none = plots.mistakes_png(str(tmp_path / "none.png"), images, labels, labels, probs, MASK_CLASSES)
    assert isinstance(none, Figure) and "no mistakes" in none.texts[0].get_text()
    png_size(tmp_path / "none.png")


# ---------------------------------------------------------------- Grad-CAM
@pytest.mark.parametrize("name", ["BaseModel", "resnet18", "efficientNet_b0"])
def test_gradcam_restores_the_model(tmp_path, images, name):
    torch.manual_seed(0)
    model = create_model(name, 4)
    model.train()
    frozen = next(model.parameters())
    frozen.requires_grad_(False)
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    bn.eval()  # a submodule's own mode (frozen BN) must come back too
    running_mean = bn.running_mean.clone()
    layer, _ = plots.find_cam_layer(model, (64, 64))
    cams, logits = plots.gradcam(model, torch.randn(3, 3, 64, 64), layer)
    assert cams.shape == (3, 64, 64) and logits.shape == (3, 4)
    assert cams.min() >= 0 and cams.max() <= 1 and np.isfinite(cams).all()
    assert model.training and not bn.training and not frozen.requires_grad
    assert all(p.grad is None for p in model.parameters())
    torch.testing.assert_close(bn.running_mean, running_mean)
    fig = plots.gradcam_png(str(tmp_path), model, images, eval_transform((64, 48), MEAN, STD),
                            ["a", "b", "c", "d"], labels=[0, 1, 2, 3, 0, 1, 2, 3], n=5)
    assert isinstance(fig, Figure) and png_size(tmp_path / "gradcam.png")[0] >= 400
    assert model.training


def test_gradcam_targets_a_given_class():
    model = create_model("BaseModel", 4).eval()
    layer, _ = plots.find_cam_layer(model, (32, 32))
    cams, _ = plots.gradcam(model, torch.randn(2, 3, 32, 32), layer, targets=[1, 3])
    assert cams.shape == (2, 32, 32)


@pytest.mark.parametrize("build", [
    lambda: timm.create_model("vit_tiny_patch16_224", num_classes=4, img_size=64),  # only conv: the patch embed
    lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 64 * 64, 4)),
], ids=["vit", "mlp"])
def test_gradcam_without_feature_map(tmp_path, images, capsys, build):
    model = build()
    assert plots.find_cam_layer(model, (64, 64)) is None
    assert plots.gradcam_png(str(tmp_path), model, images, eval_transform((64, 64), MEAN, STD), list("abcd")) is None
    assert "no convolutional feature map" in capsys.readouterr().out
    assert not (tmp_path / "gradcam.png").exists()
