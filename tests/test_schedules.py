"""The fine-tuning schedules winners use: one-cycle, flat-then-cosine, cosine with warm restarts
(timm's cycle options fitted into --epochs), discriminative backbone rates, and the recipe
switch at --aug_off_epoch."""
import math
import os
import warnings

import pandas as pd
import pytest
import torch

from conftest import FAST, lrs_by_epoch
from maskcls.optim import FLAT_SHARE, ONE_CYCLE_DIV, Freezer, build_optimizer, build_scheduler
from model import create_model


def _optimizer(lr=1e-2):
    return build_optimizer("adamw", torch.nn.Linear(4, 2), lr=lr)


def test_one_cycle_rises_to_the_peak_at_30_percent_then_anneals_to_almost_nothing():
    optimizer = _optimizer()
    lrs = lrs_by_epoch(build_scheduler(optimizer, "onecycle", 20, 1), optimizer, 20)
    assert lrs[0] == pytest.approx(1e-2 / ONE_CYCLE_DIV)
    assert max(lrs) == pytest.approx(1e-2) and lrs.index(max(lrs)) == 6  # 30% of 20 epochs
    assert all(a < b for a, b in zip(lrs[:6], lrs[1:7])) and all(a > b for a, b in zip(lrs[6:], lrs[7:]))
    assert lrs[-1] < 1e-2 * 0.02  # the last epoch starts 95% of the way down
    # per update, with a warmup: the warmup's first rate, then the shape over the remaining updates
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, "onecycle", 10, 4, on_updates=True, warmup_epochs=1, warmup_lr=1e-5)
    seen = []
    for update in range(40):
        scheduler.step_update(update)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen[0] == pytest.approx(1e-5) and seen[4] == pytest.approx(1e-2 / ONE_CYCLE_DIV)
    assert seen[-1] < 1e-3


def test_the_plateau_schedule_is_built_without_timm_s_deprecation_warning():
    """timm warns that a resumed plateau run restarts its logic; the project keeps its counters
    (tests/test_recipe.py), so the warning would only mislead: none reaches the user."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        scheduler = build_scheduler(_optimizer(), "plateau", 10, 1)
    assert type(scheduler).__name__ == "PlateauLRScheduler"


def test_flat_then_cosine_holds_the_peak_then_anneals():
    optimizer = _optimizer()
    lrs = lrs_by_epoch(build_scheduler(optimizer, "flatcos", 25, 1, min_lr=1e-5), optimizer, 25)
    flat = math.ceil(FLAT_SHARE * 25)  # the first 72% of the epochs at the peak
    assert lrs[:flat] == pytest.approx([1e-2] * flat)
    assert all(a >= b for a, b in zip(lrs, lrs[1:])) and lrs[flat + 1] < lrs[flat]
    assert lrs[-1] < 1e-3 and min(lrs) >= 1e-5


def test_cosine_warm_restarts_fit_their_cycles_into_the_run():
    optimizer = _optimizer()
    lrs = lrs_by_epoch(build_scheduler(optimizer, "cosine", 12, 1, cycle_limit=2, cycle_decay=0.5), optimizer, 12)
    assert lrs[0] == pytest.approx(1e-2) and lrs[6] == pytest.approx(0.5e-2)  # the restart, at half the peak
    assert lrs[5] < 1e-3 and lrs[-1] < lrs[6] / 5  # each cycle anneals
    optimizer = _optimizer()  # cycle_mul 2: 3 cycles of 2, 4 and 8 epochs in a 14-epoch run
    lrs = lrs_by_epoch(build_scheduler(optimizer, "cosine", 14, 1, cycle_limit=3, cycle_mul=2.0), optimizer, 14)
    restarts = [i for i in range(1, 14) if lrs[i] > lrs[i - 1]]
    assert restarts == [2, 6] and lrs[2] == pytest.approx(1e-2)


@pytest.mark.parametrize("sched", ["onecycle", "flatcos"])
def test_shaped_schedules_resume_where_they_stopped(sched):
    optimizer = _optimizer()
    scheduler = build_scheduler(optimizer, sched, 10, 1)
    lrs = lrs_by_epoch(scheduler, optimizer, 10)
    state = scheduler.state_dict()
    assert "shape" not in state  # plain data: last.pth loads with weights_only=True
    optimizer = _optimizer()
    resumed = build_scheduler(optimizer, sched, 10, 1)
    resumed.load_state_dict(state)
    resumed.step(6)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[6])


def test_backbone_learns_at_the_ratio_of_the_head_rate():
    model = create_model("BaseModel", 3)
    optimizer = build_optimizer("adamw", model, lr=1e-2, weight_decay=0.05)
    freezer = Freezer(model, optimizer, epochs=0, backbone_ratio=10)
    scheduler = build_scheduler(optimizer, "cosine", 4, 1)
    for epoch in (1, 2):
        freezer.set_epoch(epoch)
        heads = [g["lr"] for g in optimizer.param_groups if not g["backbone"]]
        backbones = [g["lr"] for g in optimizer.param_groups if g["backbone"]]
        assert heads and backbones
        assert all(b == pytest.approx(max(heads) / 10) for b in backbones)
        scheduler.step(epoch)
    assert max(heads) < 1e-2  # the cosine moved both


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_aug_off_epoch_sends_the_last_epochs_through_the_validation_transform(work, tmp_path, capsys):
    import albumentations as A

    import augmentation
    import train
    calls = []

    @augmentation.AUGMENTATIONS.register()  # for this test only: unregistered below
    def Counting(resize, mean, std, **kwargs):
        def count(image, **params):
            calls.append(1)
            return image
        return A.Compose([A.Resize(*resize), A.Lambda(image=count), *augmentation.to_tensor(mean, std)])

    try:
        args = train.get_args_parser().parse_args([*FAST, "--epochs", "3", "--augmentation", "Counting",
                                                   "--aug_off_epoch", "2", "--data_dir", str(work / "data" / "train"),
                                                   "--model_dir", str(tmp_path), "--name", "augoff"])
        run_dir = train.main(args)
    finally:
        augmentation.AUGMENTATIONS.unregister("Counting")
    split = pd.read_csv(os.path.join(run_dir, "split.csv"))
    trained = int((split["side"] == "train").sum())
    assert trained <= len(calls) < 2 * trained  # every training image in epoch 1 (and the preview's), none after
    assert "--aug_off_epoch 2" in capsys.readouterr().out
    assert len(pd.read_csv(os.path.join(run_dir, "metrics.csv"))) == 3
