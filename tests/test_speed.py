"""The fast paths: precision, the decoded-image cache, and torchrun (DDP on gloo)."""
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from augmentation import eval_transform
from conftest import FAST, ROOT
from dataset import DATASETS
from maskcls.cli import UserError
from maskcls.images import ImageDataset, load_image, make_loader, open_cache
from maskcls.runtime import resolve_precision
from model import create_model


def test_precision_auto_follows_the_hardware(monkeypatch):
    from maskcls import runtime
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    auto = resolve_precision("auto", "cpu")
    assert auto.name == "bf16" and auto.channels_last and not auto.scaler().is_enabled()
    # small inputs: casting the weights costs more than bf16 kernels save on a CPU
    assert resolve_precision("auto", "cpu", input_size=(32, 32)).name == "fp32"
    assert resolve_precision("auto", "cpu", input_size=(64, 64)).name == "bf16"
    assert resolve_precision("bf16", "cpu", input_size=(32, 32)).name == "bf16"  # asked for: kept
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    assert resolve_precision("auto", "cpu").name == "fp32"
    assert not resolve_precision("fp32", "cpu").channels_last
    assert resolve_precision("bf16", "cpu", channels_last=False).channels_last is False
    with pytest.raises(UserError, match="fp16 needs CUDA"):
        resolve_precision("fp16", "cpu")


def test_precision_auto_probes_the_faster_one_once_per_setup(monkeypatch, tmp_path):
    from maskcls import runtime
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("OMP_NUM_THREADS", str(torch.get_num_threads()))  # the thread probe: the next test
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    timed, real_step = [], runtime._step_seconds

    def step_seconds(model, size, batch, name, channels_last):
        timed.append(name)
        return {"fp32": 0.010, "bf16": 0.030}[name] if size == (32, 32) else {"fp32": 0.05, "bf16": 0.02}[name]
    monkeypatch.setattr(runtime, "_step_seconds", step_seconds)
    small = runtime.Runtime.start("cpu", "auto", None, (32, 32), "resnet18", 64)
    assert small.precision.name == "fp32" and small.probe["fp32"] == 0.01 and not small.probe["cached"]
    large = runtime.Runtime.start("cpu", "auto", None, (128, 128), "resnet18", 64)
    assert large.precision.name == "bf16" and large.precision.channels_last
    assert timed == ["fp32", "bf16", "fp32", "bf16"]
    again = runtime.Runtime.start("cpu", "auto", None, (32, 32), "resnet18", 64)
    assert again.precision.name == "fp32" and again.probe["cached"] and len(timed) == 4  # not probed again
    assert runtime.Runtime.start("cpu", "bf16", None, (32, 32), "resnet18", 64).probe is None  # asked for: kept
    monkeypatch.setattr(runtime, "_step_seconds", real_step)
    real = runtime.probe_precision("BaseModel", (32, 24), 8)  # real steps, both precisions
    assert real[0] in ("fp32", "bf16") and real[1]["fp32"] > 0 and real[1]["bf16"] > 0


@pytest.fixture
def two_threads():
    """At least two compute threads for the test (the thread probe needs a choice), put back after."""
    before = torch.get_num_threads()
    torch.set_num_threads(max(2, before))
    yield torch.get_num_threads()
    torch.set_num_threads(before)


def test_main_process_threads_probed_once_per_setup(monkeypatch, tmp_path, two_threads):
    """On a CPU the main process trains on one thread where a few steps on it are at most
    ONE_THREAD_MARGIN slower than on all (small inputs), on all otherwise; once per setup, at the
    precision chosen, put back by close(), and never where OMP_NUM_THREADS decides."""
    from maskcls import runtime
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)  # fp32: no precision probe
    timed, real_step_seconds = [], runtime._step_seconds

    def step_seconds(model, size, batch, name, channels_last):
        one = torch.get_num_threads() == 1
        timed.append((size, name, torch.get_num_threads()))
        if one:
            return {(32, 32): 0.09, (64, 64): 0.12, (128, 128): 0.30}[size]
        return 0.05 if name == "bf16" else 0.10
    monkeypatch.setattr(runtime, "_step_seconds", step_seconds)

    small = runtime.Runtime.start("cpu", "auto", None, (32, 32), "resnet18", 64)
    assert small.threads == torch.get_num_threads() == 1
    assert small.threads_probe == {"threads": 1, "all": 0.1, "one": 0.09, "cached": False}
    small.close()
    assert torch.get_num_threads() == two_threads
    large = runtime.Runtime.start("cpu", "auto", None, (128, 128), "resnet18", 64)
    assert large.threads == two_threads and large.threads_probe["threads"] == two_threads
    large.close()
    assert timed == [((32, 32), "fp32", two_threads), ((32, 32), "fp32", 1),
                     ((128, 128), "fp32", two_threads), ((128, 128), "fp32", 1)]
    again = runtime.Runtime.start("cpu", "auto", None, (32, 32), "resnet18", 64)
    assert again.threads == 1 and again.threads_probe["cached"] and len(timed) == 4  # not probed again
    again.close()

    # a damaged entry is probed again, never trusted
    saved = json.loads(open(runtime.probe_cache()).read())
    key = next(k for k in saved if k.startswith("threads|") and "(32, 32)" in k)
    saved[key]["threads"] = 7
    open(runtime.probe_cache(), "w").write(json.dumps(saved))
    runtime.Runtime.start("cpu", "auto", None, (32, 32), "resnet18", 64).close()
    assert len(timed) == 6 and json.loads(open(runtime.probe_cache()).read())[key]["threads"] == 1

    # after the bf16 probe, at the precision it chose
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)
    bf16 = runtime.Runtime.start("cpu", "auto", None, (32, 32), "resnet18", 64)
    assert bf16.precision.name == "bf16" and bf16.threads_probe == {"threads": two_threads, "all": 0.05,
                                                                    "one": 0.09, "cached": False}
    assert [t[1:] for t in timed[6:]] == [("fp32", two_threads), ("bf16", two_threads), ("bf16", two_threads),
                                          ("bf16", 1)]
    bf16.close()

    # near the margin (1.2x): three interleaved rounds, the fastest of each side compared
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: False)
    near = runtime.Runtime.start("cpu", "auto", None, (64, 64), "resnet18", 64)
    assert near.threads == 1 and [t[2] for t in timed[10:]] == [two_threads, 1] * runtime.THREADS_PROBE_ROUNDS
    near.close()
    del timed[10:]
    monkeypatch.setattr(runtime, "cpu_has_native_bf16", lambda: True)

    # asked for by the environment, or no model named: no probe, the thread count untouched
    monkeypatch.setenv("OMP_NUM_THREADS", str(two_threads))
    pinned = runtime.Runtime.start("cpu", "auto", None, (64, 64), "resnet18", 64)
    assert pinned.threads_probe is None and pinned.threads == two_threads
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert runtime.Runtime.start("cpu", "fp32", None, (64, 64)).threads_probe is None
    assert [t[1:] for t in timed[10:]] == [("fp32", two_threads), ("bf16", two_threads)]  # precision only

    monkeypatch.setattr(runtime, "_step_seconds", real_step_seconds)
    threads, probe = runtime.probe_threads("BaseModel", (32, 24), 8, runtime.resolve_precision("fp32", "cpu"))
    assert threads in (1, two_threads) and probe["one"] > 0 and probe["all"] > 0
    assert torch.get_num_threads() == two_threads


def test_bf16_channels_last_step_matches_fp32_closely():
    torch.manual_seed(0)
    net = create_model("BaseModel", 18).eval()
    x = torch.randn(4, 3, 64, 48)
    reference = net(x)
    precision = resolve_precision("bf16", "cpu")
    fast = precision.model(net)
    with precision.autocast():
        out = fast(precision.batch(x))
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), reference, atol=0.1)


@pytest.mark.parametrize("kind", ["ram", "disk"])
def test_image_cache_serves_later_epochs_from_memory(sample_data, tmp_path, kind, monkeypatch):
    source = DATASETS.build("datasetSplitByClasses", str(sample_data / "train"))
    paths, labels = source.paths(range(40)), source.labels(range(40))
    cache = open_cache(len(paths), (72, 54), kind, path=str(tmp_path / "cache.npy"))  # a pipeline's headroom
    dataset = ImageDataset(paths, labels, eval_transform((64, 48), source.mean, source.std), (72, 54), cache=cache)
    first = torch.cat([x for x, _ in make_loader(dataset, 8, 2, "cpu")])  # workers fill the shared cache
    assert cache.get(39) is not None and cache.get(0).shape == (72, 54, 3)
    from maskcls import images as images_module
    monkeypatch.setattr(images_module, "load_image", lambda *a, **k: pytest.fail("decoded again"))
    second = torch.cat([x for x, _ in make_loader(dataset, 8, 0, "cpu")])
    assert torch.equal(first, second)
    monkeypatch.undo()
    # without a cache the images are prepared the same way: --cache never changes what the model
    # sees, and inference (no cache) sees what validation saw
    plain = ImageDataset(paths, labels, eval_transform((64, 48), source.mean, source.std), (72, 54))
    assert torch.equal(torch.cat([x for x, _ in make_loader(plain, 8, 0, "cpu")]), first)
    cache.close()
    assert not (tmp_path / "cache.npy").exists()


WORKERS_AFTER_PARENT_OPENCV = """
import sys, cv2, numpy as np, torch
from augmentation import AUGMENTATIONS
from maskcls.images import ImageDataset, make_loader
paths = sys.argv[1:]
cv2.GaussianBlur(cv2.resize(np.zeros((1500, 1500, 3), np.uint8), (700, 700)), (5, 5), 0)  # the parent's pool
augment = AUGMENTATIONS.build("AlbuAugmentation", resize=(64, 48), mean=(0.5,) * 3, std=(0.25,) * 3)
loader = make_loader(ImageDataset(paths, [0] * len(paths), augment, (64, 48)), 4, 2, "cpu", shuffle=True)
print(sum(len(x) for x, _ in loader))
"""


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_loader_workers_use_opencv_after_the_parent_did(sample_data):
    # changing OpenCV's thread count inside a forked worker after the parent used its pool hangs
    paths = [str(p) for p in sorted((sample_data / "train" / "images").glob("*/*"))[:12]]
    result = subprocess.run([sys.executable, "-c", WORKERS_AFTER_PARENT_OPENCV, *paths], cwd=ROOT,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["12"]


def test_cache_region_and_draft_decode_agree(sample_data):
    """A face region cut from a reduced JPEG decode is the same crop as from a full decode."""
    path = next((sample_data / "train" / "images").glob("*/mask1.jpg"))
    region = (76, 74, 308, 356)
    full = load_image(path, region=region)
    small = load_image(path, min_size=(64, 48), region=region)
    assert full.shape == (282, 232, 3)
    assert small.shape[0] >= 64 and small.shape[1] >= 48 and small.shape[0] < full.shape[0]
    shrunk = torch.nn.functional.interpolate(torch.tensor(full).permute(2, 0, 1)[None].float(),
                                             size=small.shape[:2], mode="area")[0].permute(1, 2, 0).numpy()
    assert np.abs(shrunk - small).mean() < 8  # same content, up to decoder rounding


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_torchrun_two_cpu_processes(work, tmp_path):
    """torchrun with gloo: one run folder, written by rank 0, with complete metrics rows."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517",
         os.path.join(ROOT, "train.py"), *FAST, "--epochs", "1", "--device", "cpu",
         "--model_dir", str(tmp_path / "runs"), "--name", "ddp",
         # the recipe's controls under DDP: accumulation skips the all-reduce between updates
         "--grad_accum_steps", "2", "--clip_grad", "1", "--smoothing", "0.1", "--ema", "0.9",
         "--cutmix_alpha", "1", "--mixup_alpha", "0.2", "--warmup_epochs", "1", "--sched_on_updates", "True"],
        cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert os.listdir(tmp_path / "runs") == ["ddp"]
    run_dir = tmp_path / "runs" / "ddp"
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert len(metrics) == 1 and not metrics.isna().any().any()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["world_size"] == 2
    assert (config["grad_accum_steps"], config["clip_grad"], config["smoothing"]) == (2, 1.0, 0.1)
    assert result.stdout.count("epoch 1/1") == 1  # rank 0 alone prints


def _evaluate_on_two_ranks(rank, world_size, port, out_dir):
    """One rank of a gloo group: evaluate a fixed model on 5 images (the sampler pads to 6)."""
    import torch.distributed as dist

    from maskcls import distributed
    from maskcls.engine import evaluate
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    images, labels = torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 3, 1])
    data = torch.utils.data.TensorDataset(images, labels)
    sampler = torch.utils.data.DistributedSampler(data, num_replicas=world_size, rank=rank, shuffle=False)
    loader = torch.utils.data.DataLoader(data, batch_size=2, sampler=sampler)
    context = distributed.Context(rank, world_size, rank)
    result = evaluate(model, loader, torch.nn.CrossEntropyLoss(), torch.device("cpu"),
                      resolve_precision("fp32", "cpu"), 4, context=context)
    torch.save({k: result[k] for k in ("labels", "preds", "val_loss", "val_f1")}, os.path.join(out_dir, f"{rank}.pt"))
    dist.destroy_process_group()


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_distributed_evaluate_gathers_the_whole_set_once(tmp_path):
    torch.multiprocessing.spawn(_evaluate_on_two_ranks, args=(2, 29533, str(tmp_path)), nprocs=2)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    images, labels = torch.randn(5, 3, 2, 2), torch.tensor([0, 1, 2, 3, 1])
    expected_loss = torch.nn.functional.cross_entropy(model(images), labels).item()
    for rank in (0, 1):  # both ranks hold the same, complete, unpadded result
        result = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert result["labels"].tolist() == labels.tolist()  # 5, not 6, in dataset order
        assert result["preds"].tolist() == model(images).argmax(1).tolist()
        assert result["val_loss"] == pytest.approx(expected_loss, rel=1e-5)


def test_cache_auto_takes_ram_only_where_it_fits(sample_data, tmp_path, monkeypatch, capsys):
    from maskcls import data as data_module
    source = DATASETS.build("datasetSplitByClasses", str(sample_data / "train"))
    data = data_module.TrainingData(source, [], {}, "AlbuAugmentation", (64, 48), (64, 48))
    with data_module.open_image_cache(data, "auto", str(tmp_path)) as cache:
        assert cache.images.kind == "ram" and cache.images.shape == (len(source.samples), 64, 48, 3)
        assert len(cache.slots) == len(source.samples)
    monkeypatch.setattr(data_module, "shared_memory_free", lambda: (2**20, "/dev/shm"))  # a docker default
    with data_module.open_image_cache(data, "auto", str(tmp_path)) as small:
        assert small.images is None and "cache: off" in capsys.readouterr().out
    from maskcls import images as images_module
    monkeypatch.setattr(images_module, "shared_memory_free", lambda: (2**20, "/dev/shm"))
    with pytest.raises(UserError, match="/dev/shm has 0.00 GiB free"):
        open_cache(len(source.samples), (64, 48), "ram")


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_compile_trains_and_saves_plain_weights(work, tmp_path):
    """--compile (TorchInductor, C++ on the CPU): the run completes and best.pth/last.pth hold the
    module's own keys, loadable without torch.compile."""
    import train
    args = train.get_args_parser().parse_args([*FAST, "--epochs", "2", "--compile", "True", "--ema", "0.9",
                                               "--data_dir", str(work / "data" / "train"),
                                               "--model_dir", str(tmp_path), "--name", "compiled"])
    run_dir = train.main(args)
    metrics = pd.read_csv(os.path.join(run_dir, "metrics.csv"))
    assert len(metrics) == 2 and metrics[["train_loss", "val_f1", "ema_val_f1"]].notna().all().all()
    for name in ("best.pth", "last.pth"):
        weights = torch.load(os.path.join(run_dir, name), weights_only=True)["model"]
        assert not any(k.startswith("_orig_mod.") for k in weights)
        create_model("BaseModel", 18).load_state_dict(weights)


def test_unwrap_and_compile_without_a_compiler(monkeypatch):
    from maskcls import runtime
    net = create_model("BaseModel", 18)
    assert runtime.unwrap(torch.compile(net)) is net
    monkeypatch.setattr(runtime.shutil, "which", lambda name: None)
    with pytest.raises(UserError, match="needs a C.. compiler"):
        runtime.compile_model(net, "cpu")


ALLOCATE_AND_FREE = """
import resource, sys
if sys.argv[1] == "project":
    import maskcls  # noqa: F401
import torch
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(20):  # 64 MiB in two tensors, freed each time: a step's activations
    a, b = torch.ones(16 * 2**20, dtype=torch.uint8), torch.ones(48 * 2**20, dtype=torch.uint8)
    del a, b
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_not_faulted_in_again():
    """maskcls keeps freed memory in the process (keep_freed_memory): 20 rounds of 64 MiB in torch
    tensors fault their pages in a few times (here 2.5-4), where glibc's defaults fault them in
    every round (16-18 of 20); a threshold the user set in the environment wins."""
    def faults(who, env=None):
        out = subprocess.run([sys.executable, "-c", ALLOCATE_AND_FREE, who], capture_output=True, text=True,
                             check=True, cwd=ROOT, env={**os.environ, **(env or {})})
        return int(out.stdout)
    pages = 64 * 2**20 // 4096
    plain, project = faults("plain"), faults("project")
    assert plain > 10 * pages, plain  # glibc: every large allocation a fresh mmap
    assert project < 6 * pages, project
    assert faults("project", {"MALLOC_MMAP_THRESHOLD_": "131072"}) > 10 * pages
