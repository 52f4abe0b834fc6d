"""The fine-tuning controls (issue 12): each flag is in --help, and each does what it says, checked
on tiny models: accumulation equals one large batch, clipping bounds the gradient (also under a
grad scaler), warmup's first learning rates, schedules, optimizer arguments and parameter groups,
freezing, drop rates, auto-augment, mixing, smoothing on any criterion, top-K weights and their
average, training without validation, validating every N epochs, and k-fold runs by fold."""
import json
import math

import albumentations as A
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F

from augmentation import train_transform
from conftest import FAST, lrs_by_epoch
from cutmix import BatchMixer
from dataset import MASK_MEAN, MASK_STD
from loss import CRITERIONS, build_criterion
from maskcls import cli, distributed
from maskcls import engine
from maskcls.optim import Freezer, SchedulerState, build_optimizer, build_scheduler
from maskcls.distributed import Context
from maskcls.fold import build_networks, optimizer_for
from maskcls.runtime import Precision, Runtime
from model import build_from_config, create_model
import train

NEW_FLAGS = ["--grad_accum_steps", "--clip_grad", "--clip_mode", "--warmup_epochs", "--warmup_lr", "--min_lr",
             "--sched_on_updates", "--scheduler", "--decay_milestones", "--momentum", "--opt_betas", "--opt_eps",
             "--opt_kwargs", "--layer_decay", "--freeze_epochs", "--drop", "--drop_path", "--sync_bn",
             "--grad_checkpointing", "--aa", "--reprob", "--hflip", "--vflip", "--scale", "--ratio", "--color_jitter",
             "--mixup_alpha", "--cutmix_alpha", "--beta", "--cutmix", "--mix_switch_prob", "--mix_off_epoch",
             "--smoothing", "--checkpoint_hist", "--average_top", "--val_ratio", "--val_every", "--folds"]
FP32 = Precision("fp32", "cpu", False)
CPU_FP32 = Runtime(torch.device("cpu"), FP32, Context(), (32, 32))


def _args(*argv):
    return train.get_args_parser().parse_args([*FAST, *map(str, argv)])


def test_every_flag_is_in_help():
    text = train.get_args_parser().format_help()
    for flag in NEW_FLAGS:
        assert flag in text, flag
    for alias in ("--opt", "--sched", "--decay_epochs", "--decay_rate", "--mixup_prob"):
        assert alias in text, alias


def _batches(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g)


def _loader(x, y, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=batch)


def _step(model, accum=1, clip=None, scaler=None, lr=0.1):
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    return engine.Step(torch.nn.CrossEntropyLoss(), optimizer, scaler or torch.amp.GradScaler("cpu", enabled=False),
                       FP32, accum=accum, clip=clip)


def test_accumulation_of_4_batches_of_8_matches_one_batch_of_32():
    x, y = _batches()
    torch.manual_seed(0)
    big = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))  # no batch norm
    small = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    small.load_state_dict(big.state_dict())
    one, four = _step(big), _step(small, accum=4)
    engine.train_one_epoch(big, _loader(x, y, 32), one, "cpu", "one")
    engine.train_one_epoch(small, _loader(x, y, 8), four, "cpu", "four")
    assert one.updates == four.updates == 1
    for a, b in zip(big.parameters(), small.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    # a ragged last update: 5 batches with accum 2 make 3 updates, the last of one batch
    three = _step(small, accum=2)
    engine.train_one_epoch(small, _loader(*_batches(40), 8), three, "cpu", "ragged")
    assert three.updates == 3 == engine.updates_per_epoch(5, 2)


@pytest.mark.parametrize("scaled", [False, True])
def test_clipping_bounds_the_gradient_norm(scaled):
    """With a grad scaler the gradients are unscaled before clipping: the bound is in true units."""
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, enabled=scaled) if scaled else None
    step = _step(model, clip=0.05, scaler=scaler)
    norms = []
    real_step = step.optimizer.step

    def recording_step(*a, **k):
        norms.append(torch.norm(torch.stack([p.grad.norm() for p in model.parameters()])).item())
        return real_step(*a, **k)
    step.optimizer.step = recording_step
    x, y = _batches()
    engine.train_one_epoch(model, _loader(x * 100, y, 8), step, "cpu", "clip")
    assert norms and max(norms) <= 0.05 * (1 + 1e-4), norms
    unclipped = torch.nn.Linear(6, 3)
    loss = F.cross_entropy(unclipped(x[:8] * 100), y[:8])
    loss.backward()
    assert unclipped.weight.grad.norm() > 1  # the clip did bite


def test_warmup_first_lrs_then_the_schedule_and_its_floor():
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    scheduler = build_scheduler(optimizer, "cosine", 10, 1, warmup_epochs=3, warmup_lr=1e-5, min_lr=1e-4)
    lrs = lrs_by_epoch(scheduler, optimizer, 10)
    assert lrs[:3] == pytest.approx([1e-5, 1e-5 + (1e-3 - 1e-5) / 3, 1e-5 + 2 * (1e-3 - 1e-5) / 3])
    assert lrs[3] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4) * (1 + math.cos(math.pi * 3 / 10)))
    assert min(lrs[3:]) >= 1e-4 and lrs[-1] < lrs[4]  # after the warmup: never under the floor
    # per update: warmup rises within the first epoch already
    optimizer = build_optimizer("adamw", model, lr=1e-3)
    scheduler = build_scheduler(optimizer, "cosine", 10, 4, on_updates=True, warmup_epochs=1, warmup_lr=1e-5)
    seen = []
    for update in range(0, 5):
        scheduler.step_update(update)
        seen.append(optimizer.param_groups[0]["lr"])
    assert seen[:4] == pytest.approx([1e-5 + u * (1e-3 - 1e-5) / 4 for u in range(4)])  # 4 updates of warmup
    assert seen[4] == pytest.approx(0.5 * 1e-3 * (1 + math.cos(math.pi * 4 / 40)))  # then cosine, per update
    with pytest.raises(cli.UserError, match="once per epoch"):
        build_scheduler(optimizer, "plateau", 10, 4, on_updates=True)


def test_step_multistep_and_plateau():
    model = torch.nn.Linear(4, 2)
    optimizer = build_optimizer("sgd", model, lr=0.1)
    assert lrs_by_epoch(build_scheduler(optimizer, "multistep", 6, 1, decay_milestones=(2, 4), decay_rate=0.5), optimizer, 6) \
        == pytest.approx([0.1, 0.05, 0.05, 0.025, 0.025, 0.025])  # epochs 2 and 4 start lower (timm)
    optimizer = build_optimizer("sgd", model, lr=0.1)
    plateau = build_scheduler(optimizer, "plateau", 10, 1, decay_rate=0.5, patience_epochs=1)
    for epoch, f1 in enumerate([0.5, 0.5, 0.5, 0.5], start=1):
        plateau.step(epoch, f1)
    assert optimizer.param_groups[0]["lr"] < 0.1  # no better F1 for longer than the patience: decayed
    optimizer = build_optimizer("sgd", model, lr=0.1)
    assert lrs_by_epoch(build_scheduler(optimizer, "none", 3, 1), optimizer, 3) == pytest.approx([0.1] * 3)


def test_a_resumed_plateau_schedule_decays_when_an_uninterrupted_one_does():
    scores = [0.5, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6]

    def plateau():
        optimizer = build_optimizer("sgd", torch.nn.Linear(4, 2), lr=0.1)
        return optimizer, build_scheduler(optimizer, "plateau", 10, 1, decay_rate=0.5, patience_epochs=2)

    optimizer, scheduler = plateau()
    whole = []
    for epoch, f1 in enumerate(scores, start=1):
        scheduler.step(epoch, f1)
        whole.append(optimizer.param_groups[0]["lr"])
    optimizer, scheduler = plateau()
    for epoch, f1 in enumerate(scores[:4], start=1):  # killed after epoch 4, a bad-epoch count of 2
        scheduler.step(epoch, f1)
    saved = torch.load(_roundtrip(SchedulerState(scheduler).state_dict()), weights_only=True)
    optimizer, scheduler = plateau()
    SchedulerState(scheduler).load_state_dict(saved)
    optimizer.param_groups[0]["lr"] = whole[3]  # last.pth's optimizer carries the lr
    resumed = whole[:4]
    for epoch, f1 in enumerate(scores[4:], start=5):
        scheduler.step(epoch, f1)
        resumed.append(optimizer.param_groups[0]["lr"])
    assert resumed == pytest.approx(whole) and min(whole) < 0.1


def _roundtrip(state):
    import io
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    return buffer


def test_optimizer_arguments_and_param_groups():
    model = timm.create_model("resnet10t", num_classes=3)
    args = _args("--opt", "sgd", "--momentum", "0.8", "--weight_decay", "0.05", "--opt_kwargs", "nesterov=False")
    optimizer = optimizer_for(args, model)
    assert type(optimizer).__name__ == "SGD" and optimizer.param_groups[0]["momentum"] == 0.8
    assert optimizer.param_groups[0]["nesterov"] is False
    decays = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    norm_and_bias = [p for n, p in model.named_parameters() if p.ndim <= 1]
    assert norm_and_bias and all(decays[id(p)] == 0 for p in norm_and_bias)  # no decay on norm and bias
    assert decays[id(model.conv1[0].weight)] == 0.05
    adam = optimizer_for(_args("--opt", "AdamW", "--opt_betas", "0.8,0.95", "--opt_eps", "1e-6"), model)
    assert adam.param_groups[0]["betas"] == (0.8, 0.95) and adam.param_groups[0]["eps"] == 1e-6
    layered = optimizer_for(_args("--opt", "adamw", "--layer_decay", "0.5"), model)
    scales = sorted({g["lr_scale"] for g in layered.param_groups})
    assert len(scales) > 2 and scales[-1] == 1.0 and scales[0] < 0.1  # the stem learns slowest
    with pytest.raises(cli.UserError, match="refused its arguments"):
        optimizer_for(_args("--opt", "adam", "--opt_kwargs", "nonsense=1"), model)
    muon = optimizer_for(_args("--opt", "muon"), model)  # timm's Muon: conv weights fall back, no crash
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    muon.step()


def test_freeze_epochs_trains_the_head_alone_first():
    torch.manual_seed(0)
    model = create_model("BaseModel", 3)
    optimizer = build_optimizer("adam", model, lr=1e-2)
    freezer = Freezer(model, optimizer, epochs=1)
    scheduler = build_scheduler(optimizer, "cosine", 3, 1)
    step = engine.Step(torch.nn.CrossEntropyLoss(), optimizer, torch.amp.GradScaler("cpu", enabled=False), FP32,
                       scheduler=scheduler, freezer=freezer)
    x = torch.randn(16, 3, 32, 24)
    y = torch.randint(0, 3, (16,))
    loader = _loader(x, y, 8)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    freezer.set_epoch(1)
    engine.train_one_epoch(model, loader, step, "cpu", "frozen")
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if not k.startswith("fc."))  # BN stats too
    assert not torch.equal(before["fc.weight"], after["fc.weight"])
    scheduler.step(1)
    freezer.set_epoch(2)
    assert all(g["lr"] > 0 for g in optimizer.param_groups)
    engine.train_one_epoch(model, loader, step, "cpu", "thawed")
    assert not torch.equal(before["features.0.weight"], model.state_dict()["features.0.weight"])


def test_drop_rates_grad_checkpointing_and_sync_bn_reach_the_model(tmp_path, work, monkeypatch):
    config = {"model": "resnet10t", "num_classes": 3, "drop": 0.3, "drop_path": 0.2}
    model = build_from_config(config)
    assert model.drop_rate == 0.3 and any(type(m).__name__ == "DropPath" for m in model.modules())
    assert build_from_config({"model": "BaseModel", "num_classes": 3, "drop": 0.1}).dropout.p == 0.1
    with pytest.raises(cli.UserError, match="does not take --drop_path"):
        build_from_config({"model": "BaseModel", "num_classes": 3, "drop_path": 0.1})
    args = _args("--model", "resnet10t", "--grad_checkpointing", "True")
    net, *_ = build_networks(args, {**config, "drop": None, "drop_path": None}, CPU_FP32)
    assert net.grad_checkpointing
    with pytest.raises(cli.UserError, match="grad_checkpointing"):
        build_networks(_args("--grad_checkpointing", "True"), {"model": "BaseModel", "num_classes": 3}, CPU_FP32)
    monkeypatch.setattr(distributed, "setup", lambda choice: (distributed.Context(0, 2), None))
    monkeypatch.setattr(distributed, "teardown", lambda context: None)
    monkeypatch.setattr(distributed, "broadcast", lambda context, value: value)
    with pytest.raises(cli.UserError, match="--sync_bn needs CUDA"):
        train.main(_args("--sync_bn", "True", "--data_dir", work / "data" / "train", "--model_dir", tmp_path))


def test_augmentation_flags_shape_the_pipeline():
    def names(**values):
        return [type(t).__name__ for t in train_transform(values.pop("name", "TimmAugmentation"), (32, 32),
                                                          MASK_MEAN, MASK_STD, values).transforms]
    assert names() == ["RandomResizedCrop", "HorizontalFlip", "ColorJitter", "Normalize", "ToTensorV2"]
    assert "HorizontalFlip" not in names(hflip=0.0) and "VerticalFlip" in names(vflip=0.5)
    assert "HorizontalFlip" not in names(name="AlbuAugmentation", hflip=0.0)  # for digits and text
    rrc = train_transform("TimmAugmentation", (32, 32), MASK_MEAN, MASK_STD, {"scale": [0.5, 1], "ratio": [1, 1]})
    assert tuple(rrc.transforms[0].scale) == (0.5, 1) and tuple(rrc.transforms[0].ratio) == (1, 1)
    with_aa = names(aa="rand-m9-mstd0.5", reprob=0.25)
    assert with_aa[-4:] == ["TimmAutoAugment", "Erasing", "Normalize", "ToTensorV2"]
    assert "ColorJitter" not in with_aa  # timm turns colour jitter off under auto-augment
    erasing = train_transform("AlbuAugmentation", (32, 24), MASK_MEAN, MASK_STD, {"reprob": 0.25}).transforms
    assert any(isinstance(t, A.Erasing) and t.p == 0.25 for t in erasing)


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_mixing_alphas_switch_and_the_off_epoch(work, tmp_path, run_here):
    x, y = torch.randn(8, 3, 16, 16), torch.arange(8)
    cut = BatchMixer(cutmix_alpha=1.0, prob=1.0, seed=0)
    assert cut.cutmix and not cut.mixup
    lams = [cut(x, y)[3] for _ in range(20)]
    assert all(0 <= lam <= 1 for lam in lams) and len(set(lams)) > 1
    both = BatchMixer(cutmix_alpha=1.0, mixup_alpha=0.4, switch_prob=1.0, prob=1.0, seed=0)
    for _ in range(5):  # switch 1: always CutMix, whose pixels are copies, never blends
        mixed, _, partners, _ = both(x, y)
        assert all(bool(((mixed[i] == x[i]) | (mixed[i] == x[partners[i]])).all()) for i in range(8))
    assert not BatchMixer(cutmix=True, cutmix_alpha=0.0).enabled  # an alpha of 0 turns the switch off
    run_here("train.py", *FAST, "--epochs", "2", "--mixup_alpha", "0.4", "--cutmix_prob", "1", "--mix_off_epoch", "2",
             "--name", "offmix", "--model_dir", tmp_path, cwd=work)
    metrics = pd.read_csv(tmp_path / "offmix" / "metrics.csv")
    assert math.isnan(metrics["train_acc"][0]) and not math.isnan(metrics["train_acc"][1])  # mixed, then not


@pytest.mark.parametrize("name", CRITERIONS.names())
def test_smoothing_applies_to_every_criterion(name):
    torch.manual_seed(0)
    logits, target = torch.randn(6, 18, requires_grad=True), torch.randint(0, 18, (6,))
    counts = [5] * 18
    plain = build_criterion(name, 18, class_counts=counts)(logits, target)
    smoothed = build_criterion(name, 18, class_counts=counts, smoothing=0.2)(logits, target)
    assert torch.isfinite(smoothed) and not torch.isclose(plain, smoothed)
    smoothed.backward()
    assert torch.isfinite(logits.grad).all()


def test_smoothing_of_cross_entropy_is_torchs():
    logits, target = torch.randn(5, 18), torch.randint(0, 18, (5,))
    expected = F.cross_entropy(logits, target, label_smoothing=0.1)
    for name in ("cross_entropy", "label_smoothing", "focal"):  # focal at gamma 0 is cross-entropy
        got = build_criterion(name, 18, smoothing=0.1, focal_gamma=0.0)(logits, target)
        assert torch.isclose(got, expected, atol=1e-6), name


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_every_control_at_once_with_top_k_and_averaging(work, tmp_path, run_here):
    """A small timm model with every control on at once, under mixing, EMA and AMP (bf16 where
    the CPU has it): it trains, config.json records each option, the top 2 epochs are kept and
    averaged, and inference runs the averaged weights."""
    flags = ["--model", "resnet10t", "--grad_accum_steps", "2", "--clip_grad", "1.0", "--warmup_epochs", "1",
             "--sched", "cosine", "--sched_on_updates", "True", "--min_lr", "1e-5", "--opt", "adamw",
             "--weight_decay", "0.05", "--layer_decay", "0.8", "--freeze_epochs", "1", "--drop", "0.1",
             "--drop_path", "0.05", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--hflip", "0.3",
             "--color_jitter", "0.3", "--mixup_alpha", "0.4", "--cutmix_alpha", "1.0", "--mix_off_epoch", "3",
             "--smoothing", "0.1", "--criterion", "new_focal", "--ema", "0.9", "--checkpoint_hist", "2",
             "--average_top", "2", "--epochs", "3", "-b", "16"]
    result = run_here("train.py", *FAST[2:], *flags, "--name", "sink", "--model_dir", tmp_path, cwd=work)
    run_dir = tmp_path / "sink"
    config = json.loads((run_dir / "config.json").read_text())
    expected = {"grad_accum_steps": 2, "clip_grad": 1.0, "warmup_epochs": 1, "scheduler": "cosine",
                "sched_on_updates": True, "optimizer": "adamw", "layer_decay": 0.8, "freeze_epochs": 1, "drop": 0.1,
                "drop_path": 0.05, "aa": "rand-m9-mstd0.5", "reprob": 0.25, "hflip": 0.3, "mixup_alpha": 0.4,
                "cutmix_alpha": 1.0, "mix_off_epoch": 3, "smoothing": 0.1, "checkpoint_hist": 2, "average_top": 2}
    assert {k: config[k] for k in expected} == expected
    tops = sorted(p.name for p in run_dir.glob("top-*.pth"))
    assert len(tops) == 2 and "averaged.pth: the mean of epochs" in result.stdout
    states = [torch.load(run_dir / name, weights_only=True)["model"] for name in tops]
    averaged = torch.load(run_dir / "averaged.pth", weights_only=True)["model"]
    key = "fc.weight"
    assert torch.allclose(averaged[key], (states[0][key] + states[1][key]) / 2, atol=1e-6)
    run_here("inference.py", "--model_dir", run_dir, "--checkpoint", "averaged.pth", "--output", tmp_path / "a.csv",
             cwd=work)
    assert len(pd.read_csv(tmp_path / "a.csv")) == len(pd.read_csv(work / "data" / "eval" / "info.csv"))


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_no_validation_and_validating_every_n_epochs(work, tmp_path, run_here):
    result = run_here("train.py", *FAST, "--epochs", "2", "--val_ratio", "0", "--name", "all", "--model_dir", tmp_path,
                      cwd=work)
    assert "no validation (--val_ratio 0)" in result.stdout
    run_dir = tmp_path / "all"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["val_f1"].isna().all() and len(metrics) == 2
    assert torch.load(run_dir / "best.pth", weights_only=True)["epoch"] == 2  # the last epoch is the result
    assert pd.read_csv(run_dir / "split.csv")["side"].eq("train").all()
    run_here("train.py", *FAST, "--epochs", "3", "--val_every", "2", "--name", "every", "--model_dir", tmp_path,
             cwd=work)
    metrics = pd.read_csv(tmp_path / "every" / "metrics.csv")
    assert metrics["val_f1"].isna().tolist() == [True, False, False]  # epochs 2 and the last, 3
    predictions = pd.read_csv(tmp_path / "every" / "val_predictions.csv")
    assert list(predictions.columns[:4]) == ["path", "person", "label", "pred"] and len(predictions.columns) == 22


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_chosen_folds_then_resuming_the_kfold_run(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "1", "--kfold", "3", "--folds", "1,3", "--name", "kf",
             "--model_dir", tmp_path, cwd=work)
    run_dir = tmp_path / "kf"
    assert sorted(p.name for p in run_dir.glob("fold*")) == ["fold1", "fold3"]
    assert json.loads((run_dir / "kfold.json").read_text())["fold_dirs"] == ["fold1", "fold3"]
    before = (run_dir / "fold1" / "metrics.csv").read_text()
    result = run_here("train.py", "--resume", run_dir, "--folds", "1,2,3", cwd=work)
    assert "fold1 of 3: finished earlier" in result.stdout and "fold3 of 3: finished earlier" in result.stdout
    assert (run_dir / "fold1" / "metrics.csv").read_text() == before
    oof = pd.read_csv(run_dir / "oof.csv")
    assert sorted(oof["fold"].unique()) == [1, 2, 3]
    assert len(oof) == 7 * len(pd.read_csv(work / "data" / "train" / "train.csv"))  # every image once
    run_here("inference.py", "--model_dir", run_dir, "--output", tmp_path / "kf.csv", cwd=work)


def test_default_batch_size_gives_a_short_run_400_updates_down_to_batches_of_16(capsys):
    assert train.default_batch_size(3072, 10) == 64 and capsys.readouterr().out == ""  # no note at the default
    assert train.default_batch_size(718, 30) == 53  # digits' training side, 30 epochs: 13 updates an epoch
    assert "batch size 53: 718 training images, 13 updates an epoch, 390 in 30 epochs" in capsys.readouterr().out
    assert train.default_batch_size(672, 10) == 16 and "42 updates an epoch" in capsys.readouterr().out  # floor
    assert train.default_batch_size(672, 40) == 64  # the same images for longer: the default
    assert train.default_batch_size(1436, 30, world_size=2) == 53  # per process under torchrun
    assert train.default_batch_size(10, 1) == 10 and "1 update an epoch, 1 in 1 epoch " in capsys.readouterr().out
    assert _args().batch_size == 32 and train.get_args_parser().parse_args([]).batch_size is None  # given: kept


@pytest.mark.slow  # trains (seconds)
def test_select_keeps_the_last_epoch_by_default_and_the_best_when_asked(work, tmp_path, run_here):
    """--select auto keeps the last epoch (on small validation sets the val-chosen epoch scored lower
    on test: README, Training quality), best with --patience; --select best keeps the highest val
    macro F1, a tie to the later epoch. best.pth, last.pth's progress and config.json agree."""
    for name, extra in (("last", []), ("best", ["--select", "best"]), ("stop", ["--patience", "3"])):
        out = run_here("train.py", *FAST, "--epochs", "4", "--name", name, "--model_dir", tmp_path, *extra,
                       cwd=work).stdout
        run_dir = tmp_path / name
        f1 = pd.read_csv(run_dir / "metrics.csv")["val_f1"].tolist()
        # the log marks the epochs where val F1 peaks (a tie to the later one), whatever best.pth keeps
        marked = [line.endswith("*best*") for line in out.splitlines() if line.startswith("epoch ")]
        assert marked == [f1[i] >= max(f1[:i], default=-1) for i in range(len(f1))], (name, f1, marked)
        kept = torch.load(run_dir / "best.pth", weights_only=True)
        progress = torch.load(run_dir / "last.pth", weights_only=True)
        highest = max(range(len(f1)), key=lambda i: (f1[i], i)) + 1  # the later of tied epochs
        select = json.loads((run_dir / "config.json").read_text())["select"]
        assert select == ("last" if name == "last" else "best")
        assert kept["epoch"] == (4 if select == "last" else highest)
        assert kept["val_f1"] == pytest.approx(f1[kept["epoch"] - 1], abs=1e-6)
        assert progress["best"]["epoch"] == kept["epoch"] and progress["peak"]["epoch"] == highest


def test_a_sub_task_predicted_as_one_value_is_named_in_one_line():
    from maskcls.fit import collapsed
    from maskcls.labels import MASK_CLASSES, encode_label
    labels = [encode_label(m, g, a) for m in range(3) for g in range(2) for a in range(3)]
    preds = [encode_label(0, g, a) for m in range(3) for g in range(2) for a in range(3)]  # mask: always "wear"
    lines = collapsed(labels, preds, MASK_CLASSES, per_task=True)
    assert len(lines) == 1 and "'wear' for mask" in lines[0] and "\n" not in lines[0]
    assert "macro F1 0.167" in lines[0] and "--batch_size" in lines[0]
    assert collapsed(labels, labels, MASK_CLASSES, per_task=True) == []  # every sub-task learned
    one_person = [encode_label(m, 1, 2) for m in range(3)]  # gender and age have one label: nothing to learn
    assert collapsed(one_person, one_person, MASK_CLASSES, per_task=True) == []
    folder = collapsed([0, 1, 2, 1], [1, 1, 1, 1], ["a", "b", "c"], per_task=False)
    assert len(folder) == 1 and "'b' for the class" in folder[0]
