"""--prefetcher (on by default): the workers hand over uint8 batches, which are normalized and
flipped on the device (the GPU, or the main process on a CPU); the same pixels as normalizing in
the workers."""
import json
import time

import albumentations as A
import numpy as np
import pytest
import torch
from albumentations.pytorch import ToTensorV2

from augmentation import TimmAutoAugment, eval_transform, split_for_device, train_transform
from conftest import FAST
from maskcls.images import (DeviceLoader, EpochSampler, ImageDataset, ReusedBatches, device_loader, flip_images,
                            make_loader)

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


@pytest.fixture()
def photos(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        from PIL import Image
        Image.fromarray(rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def _batches(paths, transform, prefetch, sampler=None, epoch=0):
    dataset = ImageDataset(paths, list(range(len(paths))), transform)
    loader = make_loader(dataset, 3, 0, "cpu", sampler=sampler)
    if prefetch:
        loader = device_loader(loader, transform, "cpu", seed=0)
    if sampler is not None:
        sampler.set_epoch(epoch)
    return [(images, labels) for images, labels in loader]


def test_device_normalization_gives_the_pixels_the_workers_gave(photos):
    transform = eval_transform((16, 24), MEAN, STD)
    cpu_side = split_for_device(transform)[0]
    assert ImageDataset(photos, [0] * 6, cpu_side)[0][0].dtype == torch.uint8  # the workers only decode
    plain, fetched = _batches(photos, transform, False), _batches(photos, transform, True)
    for (a, la), (b, lb) in zip(plain, fetched, strict=True):
        assert b.dtype == torch.float32 and b.shape == a.shape and torch.equal(la, lb)
        assert torch.allclose(a, b, atol=1e-5)


def test_device_flips_are_the_flips_the_workers_made(photos):
    always = A.Compose([A.Resize(16, 24), A.HorizontalFlip(p=1.0), A.Normalize(MEAN, STD), ToTensorV2()])
    cpu, mean, std, hflip = split_for_device(always)
    assert hflip == 1.0 and not any(isinstance(t, A.HorizontalFlip) for t in cpu.transforms)
    assert mean == pytest.approx([m * 255 for m in MEAN]) and std == pytest.approx([s * 255 for s in STD])
    for (a, _), (b, _) in zip(_batches(photos, always, False), _batches(photos, always, True), strict=True):
        assert torch.allclose(a, b, atol=1e-5)


@pytest.mark.parametrize("channels", [1, 3, 4, 5])
def test_cpu_flips_in_place_mirror_exactly_the_chosen_images(channels):
    batch = torch.randint(0, 256, (6, 5, 7, channels), dtype=torch.uint8)
    chosen = torch.tensor([True, False, True, True, False, False])
    want = torch.where(chosen.view(-1, 1, 1, 1), batch.flip(2), batch)
    assert torch.equal(flip_images(batch.clone(), chosen), want)  # OpenCV in place (5 channels: torch)
    strided = batch.clone().permute(0, 2, 1, 3)  # not contiguous: torch's flip, on a copy
    assert torch.equal(flip_images(strided, chosen), torch.where(chosen.view(-1, 1, 1, 1), strided.flip(2), strided))


def test_device_flips_depend_on_seed_and_epoch_only(photos):
    half = A.Compose([A.Resize(16, 24), A.HorizontalFlip(p=0.5), A.Normalize(MEAN, STD), ToTensorV2()])
    unflipped = torch.cat([b for b, _ in _batches(photos * 20, eval_transform((16, 24), MEAN, STD), True)])

    def flips(epoch):
        sampler = EpochSampler(120, seed=3)
        images = torch.cat([b for b, _ in _batches(photos * 20, half, True, sampler, epoch)])
        order = [i for i, _ in sampler]
        same = [torch.equal(x, unflipped[i]) for x, i in zip(images, order)]
        mirrored = [torch.equal(x, unflipped[i].flip(-1)) for x, i in zip(images, order)]
        assert all(s or m for s, m in zip(same, mirrored))  # each image as it was, or mirrored
        return mirrored
    first = flips(1)
    assert 30 < sum(first) < 90  # about half of 120
    assert flips(1) == first and flips(2) != first  # the same epoch again flips the same images


def test_pipelines_that_cannot_split_keep_normalizing_on_the_cpu(photos):
    assert split_for_device(A.Compose([A.Resize(16, 24), ToTensorV2()])) is None
    assert split_for_device(A.Compose([A.Normalize(MEAN, STD), A.Resize(16, 24), ToTensorV2()])) is None
    odd = A.Compose([A.Resize(16, 24), ToTensorV2()])
    loader = make_loader(ImageDataset(photos, [0] * 6, odd), 3, 0, "cpu")
    assert device_loader(loader, odd, "cpu") is loader


def test_every_bundled_training_pipeline_splits_and_keeps_its_other_steps():
    for name in ("AlbuAugmentation", "TimmAugmentation", "BaseAugmentation"):
        full = train_transform(name, (32, 32), MEAN, STD, {"aa": "rand-m9-mstd0.5", "reprob": 0.25})
        cpu, _, _, hflip = split_for_device(full)
        assert not any(isinstance(t, A.Normalize) for t in cpu.transforms)
        assert any(isinstance(t, TimmAutoAugment) for t in cpu.transforms)  # --aa and --reprob stay on the CPU
        assert any(isinstance(t, A.Erasing) for t in cpu.transforms)
        assert hflip == (0.0 if name == "BaseAugmentation" else 0.5)
        image = np.random.default_rng(0).integers(0, 256, (40, 40, 3), dtype=np.uint8)
        out = cpu(image=image)["image"]
        assert out.dtype == torch.uint8 and out.shape == (32, 32, 3)  # H x W x C: stacked channels-last


def test_a_wrapped_loader_passes_its_attributes_through(photos):
    transform = eval_transform((16, 24), MEAN, STD)
    loader = device_loader(make_loader(ImageDataset(photos, [0] * 6, transform), 4, 0, "cpu"), transform, "cpu")
    assert isinstance(loader, DeviceLoader) and len(loader) == 2 and loader.batch_size == 4
    subset = loader.wrap(make_loader(torch.utils.data.Subset(loader.dataset, range(2)), 4, 0, "cpu"))
    (images, _), = list(subset)
    assert images.dtype == torch.float32 and len(images) == 2


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_prefetcher_run_trains_and_predicts(work, tmp_path, run_here):
    """On by default (train.py and inference.py); a prediction off the prefetcher is the same file."""
    run_here("train.py", *FAST, "--epochs", "2", "--ema", "0.9", "--ema_bn_refresh", "True",
             "--name", "pf", "--model_dir", tmp_path, cwd=work)
    config = json.loads((tmp_path / "pf" / "config.json").read_text())
    assert config["prefetcher"] is True
    run_here("inference.py", "--model_dir", tmp_path / "pf", "--output", tmp_path / "a.csv", cwd=work)
    run_here("inference.py", "--model_dir", tmp_path / "pf", "--prefetcher", "False", "--output", tmp_path / "b.csv",
             cwd=work)
    assert (tmp_path / "a.csv").read_text() == (tmp_path / "b.csv").read_text()


class NumberedImages(torch.utils.data.Dataset):
    """Item i: a uint8 4x5 image filled with i and the label i. Every fourth item takes 30 ms, so
    the workers finish out of order and the fast ones run as far ahead as the loader lets them."""

    def __init__(self, count):
        self.count, self.transform = count, None

    def __len__(self):
        return self.count

    def __getitem__(self, item):
        index = item[0] if isinstance(item, tuple) else item
        if index % 4 == 0:
            time.sleep(0.03)
        return torch.full((4, 5, 3), index, dtype=torch.uint8), index


def test_reused_batch_buffers_are_never_overwritten_while_read():
    """The --prefetcher path's workers stack each batch into one of a few shared buffers they
    reuse (images.ReusedBatches): every image still arrives with its own label, over shuffled
    epochs, a short last batch, out-of-order workers and a slow consumer, and the main process
    maps each buffer once (no fresh segment per batch). The raw loader keeps torch's collate."""
    transform = eval_transform((4, 5), MEAN, STD)
    dataset = NumberedImages(23)
    sampler = EpochSampler(len(dataset), seed=1)
    raw = make_loader(dataset, 2, 2, "cpu", sampler=sampler)
    assert raw.collate_fn is torch.utils.data.default_collate
    loader = device_loader(raw, transform, "cpu")
    assert isinstance(raw.collate_fn, ReusedBatches) and raw.collate_fn.count == raw.prefetch_factor + 2
    mapped, normalize = [], loader.normalize
    loader.normalize = lambda images: (mapped.append(images.untyped_storage().data_ptr()), normalize(images))[1]
    mean, std = torch.tensor(MEAN) * 255, torch.tensor(STD) * 255
    for epoch in range(3):
        sampler.set_epoch(epoch)
        seen = []
        for images, labels in loader:
            time.sleep(0.01)  # a step: the workers fill every buffer they may
            values = images * std.view(1, 3, 1, 1) + mean.view(1, 3, 1, 1)
            expected = labels.view(-1, 1, 1, 1).float().expand_as(values)
            assert torch.allclose(values, expected, atol=1e-3), (epoch, labels.tolist())
            seen += labels.tolist()
        assert sorted(seen) == list(range(23)) and seen != sorted(seen)
    assert len(mapped) == 36 and len(set(mapped)) <= raw.collate_fn.count * 2
