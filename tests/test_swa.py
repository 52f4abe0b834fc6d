"""SWA (--swa_start, --swa_lr, --swa_anneal_epochs) and the BatchNorm refresh of every averaged model."""
import copy
import os
import warnings

import pandas as pd
import pytest
import torch

from conftest import FAST
from maskcls.swa import SWA, refresh_bn


def _loader(x, batch):
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, torch.zeros(len(x), dtype=torch.long)),
                                       batch_size=batch)


def test_refreshed_batch_norm_equals_the_statistics_computed_by_hand():
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    model = torch.nn.Sequential(conv, torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.Flatten())
    bn = model[1]
    bn.running_mean.fill_(5.0)
    bn.running_var.fill_(7.0)  # stale statistics, as an average of weights carries
    x = torch.randn(24, 3, 8, 8) * 3 + 1
    assert refresh_bn(model, _loader(x, 8), "cpu")
    with torch.no_grad():
        outputs = [conv(batch) for batch in x.split(8)]
    means = torch.stack([o.mean((0, 2, 3)) for o in outputs])
    variances = torch.stack([o.var((0, 2, 3), unbiased=True) for o in outputs])
    assert torch.allclose(bn.running_mean, means.mean(0), atol=1e-5)  # equal batches: the mean of all pixels
    assert torch.allclose(bn.running_mean, torch.cat(outputs).mean((0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, variances.mean(0), rtol=1e-4)  # the mean of the batches' variances
    assert bn.momentum == 0.1 and model.training  # left as found
    assert not refresh_bn(torch.nn.Linear(3, 2), _loader(torch.randn(4, 3), 2), "cpu")  # nothing to refresh


def test_swa_averages_from_its_epoch_at_its_rate_and_resumes_mid_anneal():
    warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step")
    net = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    swa = SWA(net, optimizer, start=3, swa_lr=0.01, anneal_epochs=2)
    lrs, weights = [], []
    for epoch in range(1, 7):
        swa.begin_epoch(epoch)
        lrs.append(optimizer.param_groups[0]["lr"])
        with torch.no_grad():
            net.weight.fill_(float(epoch))
        swa.end_epoch(epoch, net)
        weights.append(float(epoch))
        if epoch == 4:
            saved, saved_lr = copy.deepcopy(swa.state_dict()), optimizer.param_groups[0]["lr"]  # as last.pth
    assert lrs[:3] == pytest.approx([0.1, 0.1, 0.1]) and lrs[4:] == pytest.approx([0.01, 0.01])
    assert 0.01 < lrs[3] < 0.1  # the cosine anneal's midpoint
    assert swa.averaged == 4 and torch.allclose(swa.model.module.weight, torch.full((2, 2), 4.5))  # epochs 3..6
    # resumed after epoch 4: the optimizer's rate as last.pth holds it, the anneal goes on from there
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    optimizer.param_groups[0]["lr"] = saved_lr
    resumed = SWA(net, optimizer, start=3, swa_lr=0.01, anneal_epochs=2)
    resumed.load_state_dict(saved)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(saved_lr) and resumed.averaged == 2
    resumed.begin_epoch(5)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(lrs[4])


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_swa_run_writes_a_refreshed_scored_average_that_inference_uses(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "3", "--swa_start", "2", "--swa_lr", "5e-4", "--name", "swa",
             "--model_dir", tmp_path, cwd=work)
    run_dir = tmp_path / "swa"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert metrics["lr"].tolist()[1:] == pytest.approx([5e-4, 5e-4])  # SWALR holds the rate from epoch 2
    swa = torch.load(run_dir / "swa.pth", weights_only=True)
    last = torch.load(run_dir / "last.pth", weights_only=True)
    assert swa["epochs"] == [2, 3] and swa["bn_refreshed"] and 0 <= swa["val_f1"] <= 1
    averaged = last["swa"]["model"]  # the running average as training left it: BN statistics not refreshed
    stats = [k for k in swa["model"] if k.endswith("running_mean")]
    assert stats and any(not torch.allclose(swa["model"][k], averaged["module." + k]) for k in stats)
    weights = [k for k in swa["model"] if k.endswith("weight") and "module." + k in averaged]
    assert all(torch.equal(swa["model"][k], averaged["module." + k]) for k in weights)  # the average itself
    run_here("inference.py", "--model_dir", run_dir, "--checkpoint", "swa.pth", "--output", tmp_path / "swa.csv",
             cwd=work)
    assert pd.read_csv(tmp_path / "swa.csv")["ans"].between(0, 17).all()
    assert os.path.isfile(run_dir / "best.pth")


def test_ema_bn_refresh_scores_a_refreshed_copy_and_leaves_the_average_alone():
    from types import SimpleNamespace

    from maskcls.fit import ema_weights
    torch.manual_seed(0)
    ema = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    ema[1].running_mean.fill_(5.0)  # timm's moving average of the live model's statistics
    x = torch.randn(16, 3, 8, 8) * 2 + 1
    fold = SimpleNamespace(config={"ema_bn_refresh": True}, train=SimpleNamespace(loader=_loader(x, 8)), device="cpu")
    fresh = ema_weights(fold, ema)
    assert fresh is not ema and torch.equal(ema[1].running_mean, torch.full((4,), 5.0))
    with torch.no_grad():
        assert torch.allclose(fresh[1].running_mean, ema[0](x).mean((0, 2, 3)), atol=1e-5)
    assert torch.equal(fresh[0].weight, ema[0].weight)  # the weights are the average's
    fold.config["ema_bn_refresh"] = False
    assert ema_weights(fold, ema) is ema
    fold.config["ema_bn_refresh"] = True
    linear = torch.nn.Linear(2, 2)
    assert ema_weights(fold, linear) is linear  # no BatchNorm: nothing to refresh


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_ema_bn_refresh_run_saves_the_refreshed_average(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "2", "--ema", "0.9", "--ema_bn_refresh", "True", "--val_ratio", "0",
             "--name", "ema", "--model_dir", tmp_path, cwd=work)
    best = torch.load(tmp_path / "ema" / "best.pth", weights_only=True)
    best = best.get("model", best)
    average = torch.load(tmp_path / "ema" / "last.pth", weights_only=True)["ema"]
    stats = [k for k in best if k.endswith("running_mean")]
    assert stats and all(not torch.allclose(best[k], average[k]) for k in stats)
    assert all(torch.equal(best[k], average[k]) for k in best if k.endswith("weight"))


def test_ema_bn_refresh_without_ema_is_one_line(work, tmp_path, run_here):
    done = run_here("train.py", *FAST, "--ema_bn_refresh", "True", "--model_dir", tmp_path, cwd=work, check=False)
    assert done.returncode != 0 and "give --ema" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())
