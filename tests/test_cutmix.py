"""CutMix and MixUp: pasted area matches lambda, pixels come from the partner, axes are right."""
import numpy as np
import pytest
import torch

from cutmix import BatchMixer, mixed_loss, rand_box
from maskcls.cli import UserError

# Non-square on purpose: a box cut with H and W swapped lands in the wrong place or off the image.
N, C, H, W = 6, 3, 12, 9


def constant_batch(n=N, height=H, width=W):
    """Image i is filled with the value i, so each pixel tells which sample it came from."""
    x = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, C, height, width).clone()
    return x, torch.arange(n)


def box_of(mixed, x):
    """The (y1, y2, x1, x2) bounding box of the pixels that changed, and the change mask."""
    changed = (mixed != x).any(dim=1)  # [N, H, W]
    assert changed.any(), "nothing was pasted"
    rows = changed.any(dim=(0, 2)).nonzero().flatten()
    cols = changed.any(dim=(0, 1)).nonzero().flatten()
    return (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1), changed


def test_rand_box_stays_inside_the_image():
    rng = np.random.default_rng(0)
    for lam in np.linspace(0.0, 1.0, 21):
        for mode in ("box", "vertical"):
            y1, y2, x1, x2 = rand_box(H, W, lam, rng, mode)
            assert all(isinstance(v, int) for v in (y1, y2, x1, x2))
            assert 0 <= y1 <= y2 <= H and 0 <= x1 <= x2 <= W


def test_rand_box_area_is_about_one_minus_lambda():
    rng = np.random.default_rng(0)
    height, width = 384, 512
    # An unclipped box covers about (1 - lam) of the image; clipping can only shrink it.
    areas = [(y2 - y1) * (x2 - x1) / (height * width) for y1, y2, x1, x2 in
             (rand_box(height, width, 0.75, rng) for _ in range(200))]
    assert max(areas) == pytest.approx(0.25, abs=0.01)
    y1, y2, x1, x2 = rand_box(height, width, 0.75, rng, "vertical")
    assert (y1, y2) == (0, height) and x2 - x1 == 128


@pytest.mark.parametrize("seed", range(10))
def test_cutmix_lambda_is_the_unpasted_share_and_pixels_come_from_the_partner(seed):
    x, y = constant_batch()
    mixer = BatchMixer(cutmix=True, prob=1.0, seed=seed)
    mixed, y_a, y_b, lam = mixer(x, y)
    assert torch.equal(y_a, y)
    if lam == 1.0:  # an empty box: nothing may have changed
        assert torch.equal(mixed, x)
        return
    # A partner can be the sample itself; count pasted pixels over the samples that moved.
    moved = y_b != y
    (y1, y2, x1, x2), changed = box_of(mixed[moved], x[moved])
    assert lam == pytest.approx(1 - changed[0].sum().item() / (H * W))
    assert lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (H * W))
    inside = torch.zeros(H, W, dtype=torch.bool)
    inside[y1:y2, x1:x2] = True
    for i in range(N):
        # Inside the box: the partner's value (y_b); outside: the sample's own (y_a).
        assert (mixed[i][:, inside] == y_b[i].item()).all()
        assert (mixed[i][:, ~inside] == y_a[i].item()).all()


def test_cutmix_on_a_wide_image():
    x, y = constant_batch(height=8, width=30)
    for seed in range(10):
        mixed, _, y_b, lam = BatchMixer(cutmix=True, prob=1.0, seed=seed)(x, y)
        moved = y_b != y
        if lam < 1.0 and moved.any():
            (y1, y2, x1, x2), changed = box_of(mixed[moved], x[moved])
            assert lam == pytest.approx(1 - (y2 - y1) * (x2 - x1) / (8 * 30))


def test_vertical_mode_pastes_a_full_height_strip():
    x, y = constant_batch()
    for seed in range(10):
        mixed, _, y_b, lam = BatchMixer(cutmix=True, prob=1.0, mode="vertical", seed=seed)(x, y)
        moved = y_b != y
        if lam == 1.0 or not moved.any():
            continue
        (y1, y2, x1, x2), changed = box_of(mixed[moved], x[moved])
        assert (y1, y2) == (0, H)
        assert changed[:, :, x1:x2].all()
        assert lam == pytest.approx(1 - (x2 - x1) / W)


def test_cutmix_does_not_modify_the_input():
    x, y = constant_batch()
    before = x.clone()
    mixed, *_ = BatchMixer(cutmix=True, prob=1.0, beta=1.0, seed=1)(x, y)
    assert torch.equal(x, before)
    assert mixed.data_ptr() != x.data_ptr()


def test_mixup_is_a_convex_combination():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.rand(N, C, H, W, generator=gen), torch.arange(N)
    before = x.clone()
    mixed, y_a, y_b, lam = BatchMixer(mixup=True, prob=1.0, seed=3)(x, y)
    assert 0.0 <= lam <= 1.0 and lam != 1.0
    assert torch.equal(y_a, y)
    assert torch.allclose(mixed, lam * x + (1 - lam) * x[y_b])  # y_b[i] == perm[i] here
    assert torch.equal(x, before)


def test_both_on_uses_both_kinds():
    x, y = constant_batch()
    mixer = BatchMixer(cutmix=True, mixup=True, prob=1.0, seed=0)
    kinds = set()
    for _ in range(40):
        mixed, _, _, lam = mixer(x, y)
        # CutMix leaves integer values (whole pixels copied); MixUp blends them.
        kinds.add("cutmix" if torch.equal(mixed, mixed.round()) else "mixup")
    assert kinds == {"cutmix", "mixup"}


def test_prob_0_never_mixes():
    x, y = constant_batch()
    mixer = BatchMixer(cutmix=True, mixup=True, prob=0.0, seed=0)
    for _ in range(20):
        mixed, y_a, y_b, lam = mixer(x, y)
        assert mixed is x and y_a is y and y_b is y and lam == 1.0


def test_prob_1_always_mixes():
    x, y = constant_batch()
    mixer = BatchMixer(mixup=True, prob=1.0, seed=0)
    for _ in range(20):
        _, _, y_b, lam = mixer(x, y)
        assert lam < 1.0


def test_prob_half_mixes_about_half_the_batches():
    x, y = constant_batch()
    mixer = BatchMixer(mixup=True, prob=0.5, seed=0)
    mixed = sum(mixer(x, y)[3] < 1.0 for _ in range(400))
    assert 150 < mixed < 250


def test_same_seed_same_batches():
    x, y = constant_batch()
    runs = []
    for _ in range(2):
        mixer = BatchMixer(cutmix=True, mixup=True, prob=0.5, seed=7)
        runs.append([mixer(x, y) for _ in range(10)])
    for (m1, a1, b1, l1), (m2, a2, b2, l2) in zip(*runs):
        assert torch.equal(m1, m2) and torch.equal(a1, a2) and torch.equal(b1, b2) and l1 == l2


def test_mixer_does_not_touch_the_global_rngs():
    x, y = constant_batch()
    torch.manual_seed(0)
    np.random.seed(0)
    expected = torch.rand(1), np.random.rand()
    torch.manual_seed(0)
    np.random.seed(0)
    BatchMixer(cutmix=True, mixup=True, prob=1.0, seed=0)(x, y)
    assert torch.equal(torch.rand(1), expected[0]) and np.random.rand() == expected[1]


def test_enabled():
    assert not BatchMixer().enabled
    assert BatchMixer(cutmix=True).enabled
    assert BatchMixer(mixup=True).enabled
    x, y = constant_batch()
    mixed, y_a, y_b, lam = BatchMixer(prob=1.0)(x, y)
    assert mixed is x and lam == 1.0


@pytest.mark.parametrize("options,message", [({"mode": "diagonal"}, "box, vertical"),
                                             ({"beta": 0.0}, "beta"),
                                             ({"prob": 1.5}, "cutmix_prob")])
def test_bad_options_raise_a_user_error(options, message):
    with pytest.raises(UserError, match=message):
        BatchMixer(cutmix=True, **options)


def test_mixed_loss():
    calls = []

    def criterion(logits, target):
        calls.append(target)
        return target.float().mean()

    y_a, y_b = torch.tensor([2, 2]), torch.tensor([4, 4])
    assert mixed_loss(criterion, None, y_a, y_b, 0.25).item() == pytest.approx(0.25 * 2 + 0.75 * 4)
    calls.clear()
    assert mixed_loss(criterion, None, y_a, y_b, 1.0).item() == 2.0
    assert len(calls) == 1, "an unmixed batch calls the criterion once"
