"""Every augmentation entry: shapes, dtype, normalisation, reproducibility."""
import albumentations as A
import numpy as np
import pytest
import torch

from augmentation import AUGMENTATIONS, eval_transform, prepared_size, resizes_first, seed_transform, to_tensor
from dataset import MASK_MEAN, MASK_STD

IMAGE = np.random.default_rng(0).integers(0, 256, (512, 384, 3), dtype=np.uint8)


@pytest.mark.parametrize("name", AUGMENTATIONS.names())
def test_every_augmentation_gives_a_normalised_chw_tensor(name):
    transform = AUGMENTATIONS.build(name, resize=(64, 48), mean=MASK_MEAN, std=MASK_STD)
    out = transform(image=IMAGE)["image"]
    assert isinstance(out, torch.Tensor) and out.shape == (3, 64, 48) and out.dtype == torch.float32
    assert torch.isfinite(out).all() and -5 < out.mean() < 5


def test_eval_transform_is_resize_and_normalize_only():
    transform = eval_transform((64, 48), MASK_MEAN, MASK_STD)
    a, b = transform(image=IMAGE)["image"], transform(image=IMAGE)["image"]
    assert torch.equal(a, b)
    flat = eval_transform((8, 8), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))(image=np.full((16, 16, 3), 255, np.uint8))
    assert torch.allclose(flat["image"], torch.full((3, 8, 8), 2.0))


def test_seeded_transforms_decide_independently():
    # albumentations' own set_random_seed gives every transform the same stream: two
    # HorizontalFlip(p=0.5) in a row would then always cancel out
    image = np.arange(2 * 4 * 3, dtype=np.uint8).reshape(2, 4, 3)
    transform = A.Compose([A.HorizontalFlip(p=0.5), A.HorizontalFlip(p=0.5)])
    flipped = 0
    for seed in range(200):
        seed_transform(transform, seed)
        flipped += not np.array_equal(transform(image=image)["image"], image)
    assert 70 <= flipped <= 130  # exactly one flip with probability 1/2


def test_train_augmentation_is_random_and_seedable():
    transform = AUGMENTATIONS.build("AlbuAugmentation", resize=(64, 48), mean=MASK_MEAN, std=MASK_STD)
    seed_transform(transform, 7)
    first = [transform(image=IMAGE)["image"] for _ in range(4)]
    assert any(not torch.equal(first[0], x) for x in first[1:])
    seed_transform(transform, 7)
    again = [transform(image=IMAGE)["image"] for _ in range(4)]
    assert all(torch.equal(x, y) for x, y in zip(first, again))


def test_resizes_first_tells_which_pipelines_may_get_prepared_images():
    assert resizes_first(eval_transform((64, 48), MASK_MEAN, MASK_STD))
    for name in AUGMENTATIONS.names():  # the built-in pipelines all start with a resize
        assert resizes_first(AUGMENTATIONS.build(name, resize=(64, 48), mean=MASK_MEAN, std=MASK_STD)), name
    assert resizes_first(A.Compose([A.RandomResizedCrop(size=(64, 48), scale=(0.8, 1.0))]))
    # pixel units of the photo: needs the full-size photo
    assert not resizes_first(A.Compose([A.CenterCrop(320, 256), A.Resize(64, 48), *to_tensor(MASK_MEAN, MASK_STD)]))
    assert not resizes_first(A.Compose([]))


def test_prepared_size_is_the_input_size_unless_the_first_step_crops_or_zooms():
    # a plain resize to the input: prepared at exactly that size (one resampling, not two)
    assert prepared_size(eval_transform((64, 48), MASK_MEAN, MASK_STD), (64, 48)) == (64, 48)
    for name in AUGMENTATIONS.names():  # TimmAugmentation starts with a random resized crop: it zooms
        expected = (72, 54) if name == "TimmAugmentation" else (64, 48)
        assert prepared_size(AUGMENTATIONS.build(name, resize=(64, 48), mean=MASK_MEAN, std=MASK_STD), (64, 48)) \
            == expected, name
    # a first step that crops or zooms gets 1.125x, so its crops keep their detail
    assert prepared_size(A.Compose([A.RandomResizedCrop(size=(64, 48))]), (64, 48)) == (72, 54)
    assert prepared_size(A.Compose([A.Resize(80, 60), A.CenterCrop(64, 48)]), (64, 48)) == (72, 54)
    assert prepared_size(A.Compose([A.CenterCrop(320, 256), A.Resize(64, 48)]), (64, 48)) is None
