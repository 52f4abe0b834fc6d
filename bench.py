"""Benchmark the project's fast paths side by side with naive references: one table, one JSON file.

    python bench.py                 # full run: more images and rounds
    python bench.py --quick         # under 3 minutes on a quiet 2-core CPU
    python bench.py --quick --data /tmp/benchdata --json bench.json --device cuda

make_sample_data.py writes the photos (384x512, competition layout) to a temporary folder, or to
--data DIR, reused from there. Each figure is the ratio of two throughputs (images/s) measured in
one process: an untimed warm-up pass per variant, then rounds that run every variant once, in an
order rotated each round (ABC, BCA, CAB), so that a load spike from elsewhere hits all sides. The
table gives the median over rounds of each rate and of the per-round ratio; `spread` is the
range of those ratios, `others CPU` the share of the machine other processes used meanwhile
(both large: the figures are noisy, rerun). Defaults: batch 32 at 224x224, the training size.

- loader_vs_naive: the training loader (images.ImageDataset: load_image with a draft decode
  where the size allows, prepare_image (area resize to augmentation.prepared_size, as the
  cache keeps images: the input size for AlbuAugmentation), --augmentation (AlbuAugmentation),
  make_loader, and train.py's default --prefetcher: uint8 batches from the workers, normalized
  by the consumer, inside the timed loop) against a naive loader written below as the public baseline does it (PIL open +
  convert, torchvision Resize/ToTensor/Normalize, one image per __getitem__, a plain
  DataLoader); same images, size, batch and worker count. Every epoch decodes every image, as
  the first epoch of a run does. Timed from the moment every worker has delivered its first
  batch (see `steady`): the steady rate of a long epoch.
- loader_cached_vs_naive: the training loader over images.RamCache, filled by the warm-up.
- train_vs_ceiling, train_vs_fp32: engine.train_one_epoch over the training loader as train.py's
  defaults build it (precision "auto" with its channels_last default, --cache auto, which holds
  these images in RAM: the warm-up pass is the first epoch, the timed ones are later epochs;
  its optimizer, fused AdamW; cross_entropy, no mixing) against the same step on a batch already
  in memory (the ceiling) and against a plain fp32 NCHW step in memory with torch's Adam. The real step is timed over whole
  epochs, the wait for the first batch included.
- loader_second_run_vs_naive: the training loader reading images.PreparedStore, the prepared
  images a first run left beside the data (filled by the warm-up pass): a later run's first
  epoch, before its in-run cache holds anything.
- infer_vs_ceiling, infer_vs_fp32: maskcls.predict.predict over the eval loader against the forward
  pass on in-memory batches (inference_mode), at the same precision and in plain fp32; cold (every
  image decoded). infer_warm_vs_ceiling: the same with the store an earlier inference filled.
- contended_slowdown: a training epoch as train.py runs it, beside one other CPU-bound process
  (a busy loop), against the same epoch alone: how much slower, lower is better.
  contended_small_slowdown: the same at 32x32 (640 images, batches of 16), where the main
  process's thread probe (maskcls.runtime.probe_threads) picks its compute threads as train.py's.
  train_small_vs_ceiling: that quiet epoch against its in-memory steps (as train_vs_ceiling), so
  the step is held to its ceiling at the small size too, where per-batch costs weigh most.
- train_vs_baseline, train_vs_timm, infer_vs_baseline, infer_vs_timm (section peers): the same
  model on the same images for the same steps, trained and predicting the project's way
  (train.py's defaults: precision auto, the in-run cache; inference.py's) against the boostcamp
  baseline's loop (PIL + torchvision, SGD, fp32) and timm's loop rebuilt from timm's library
  (create_loader and its transforms, fp32 as train.py without --amp); with the minutes to a
  submission at the real competition's sizes.
- detect_batched_vs_single: facecrop.detect_boxes on batches of 16 same-size images against one
  image per call, on 384x512 canvases holding matplotlib's grace_hopper.jpg (MTCNN runs on CPU).
- compile_train_vs_eager (full runs, or --sections compile): the in-memory training step of
  torch.compile'd model against the same model eager; the first (compiling) step is timed apart
  and reported as compile_seconds.
- *_peak_rss_mb: peak resident memory of the benchmark process plus the loader workers started
  for that variant, sampled every 50 ms during its warm-up pass, as PSS (pages shared between
  processes split between them, so forked workers are not counted twice). On CUDA also
  *_peak_gpu_mb (torch.cuda.max_memory_allocated).

Each section runs in a process of its own (`--section`), so no section inherits another's memory.
Nothing here fails on a timing: the table says met or NOT met.
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import argparse
import ctypes
import gc
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torchvision import transforms

from augmentation import AUGMENTATIONS, eval_transform, prepared_size
from dataset import MASK_MEAN, MASK_STD, read_mask_train
from maskcls import cli
from maskcls.images import EpochSampler, ImageDataset, PreparedStore, device_loader, make_loader, open_cache
from maskcls.labels import NUM_CLASSES
from maskcls.runtime import cpu_has_native_bf16, resolve_device, resolve_precision
from model import create_model

# images per timed pass of each section, and the number of timed rounds
PLANS = {"quick": dict(loader=256, train=96, infer=128, detect=32, rounds=3),
         "full": dict(loader=1024, train=256, infer=512, detect=96, rounds=5)}
DETECT_BATCH = 16    # facecrop's own batch size
SAMPLE_EVERY = 0.05  # s between memory samples
# (JSON key, measurement, ours, reference, target ratio, compares precisions: n/a where auto is fp32,
# section). The ratio is ours / reference (higher is better, the target a floor), except for a
# key ending in _slowdown: reference / ours, the target a ceiling.
ROWS = [("loader_vs_naive", "loader, every image decoded", "loader", "naive", 3.0, False, "loader"),
        ("loader_cached_vs_naive", "loader, ImageCache(ram)", "loader_cached", "naive", 5.0, False, "loader"),
        ("loader_second_run_vs_naive", "loader, a later run's 1st epoch", "loader_stored", "naive", 5.0, False,
         "loader"),
        ("train_vs_ceiling", "train step vs model-only", "train", "train_ceiling", 0.9, False, "train"),
        ("train_vs_fp32", "train step vs plain fp32", "train", "train_fp32", 2.0, True, "train"),
        ("infer_vs_ceiling", "predict (cold) vs model-only", "infer", "infer_ceiling", 0.9, False, "infer"),
        ("infer_warm_vs_ceiling", "predict (warm) vs model-only", "infer_warm", "infer_ceiling", 0.9, False, "infer"),
        ("infer_vs_fp32", "predict vs plain fp32", "infer", "infer_fp32", 2.0, True, "infer"),
        ("detect_batched_vs_single", f"face detection, {DETECT_BATCH} vs 1", "detect_batched", "detect_single",
         2.0, False, "detect"),
        ("compile_train_vs_eager", "model step, compiled vs not", "train_compiled", "train_eager", 1.0, False,
         "compile"),
        ("contended_slowdown", "train epoch beside a CPU hog", "train_hog", "train_quiet", 2.5, False, "contended"),
        ("contended_small_slowdown", "the same at 32x32", "train_hog_small", "train_quiet_small", 2.5, False,
         "contended_small"),
        ("train_small_vs_ceiling", "train step vs model-only, 32x32", "train_quiet_small", "train_ceiling_small",
         0.9, False, "contended_small"),
        ("train_vs_baseline", "training vs the baseline's", "peer_ours", "peer_baseline", 2.0, False, "peers"),
        ("train_vs_timm", "training vs timm's loop", "peer_ours", "peer_timm", 2.0, False, "peers"),
        ("infer_vs_baseline", "inference vs the baseline's", "peer_ours_infer", "peer_baseline_infer", 2.0, False,
         "peers"),
        ("infer_vs_timm", "inference vs timm's", "peer_ours_infer", "peer_timm_infer", 2.0, False, "peers")]


def get_args_parser():
    parser = cli.ArgumentParser(description="Measure loading, training, inference and face detection against "
                                            "naive references; print one table, write JSON.")
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="where make_sample_data.py writes (reused if DIR/train exists); default: a temp dir")
    parser.add_argument("--json", default="bench.json", metavar="PATH", help="the figures, as JSON")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers, ours and naive alike (train.py's default)")
    parser.add_argument("--model", default="resnet18", help="the model of the train and infer sections")
    parser.add_argument("--resize", type=cli.parse_size, default=(224, 224), metavar="H,W", help="model input size")
    parser.add_argument("--batch_size", type=cli.positive_int, default=32)
    parser.add_argument("--augmentation", default="AlbuAugmentation",
                        help="the training pipeline of the loader and train sections; BaseAugmentation (resize + "
                             "normalize) does the naive loader's work")
    parser.add_argument("--seeds", type=cli.parse_ints, default=None, metavar="S,S",
                        help="quality: the seeds (default 0,1,2; with --quick 0)")
    parser.add_argument("--epochs", type=cli.positive_int, default=None,
                        help="quality: epochs of both recipes (default 30; with --quick 10)")
    parser.add_argument("--quality_data", type=lambda text: [n.strip() for n in text.split(",") if n.strip()],
                        default=None, metavar="NAME,NAME",
                        help="quality: which of its datasets (default: digits, and lfw_subset with scikit-image)")
    parser.add_argument("--sections", default=None,
                        help="which sections to run (default: loader,train,infer,detect,contended,"
                             "contended_small,peers, and compile without --quick)")
    # internal: run one section in this (child) process and write its raw rates to --result
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    for hidden, kind in (("--q_train", str), ("--q_test", str), ("--q_seed", int), ("--q_epochs", int),
                         ("--q_recipe", str), ("--q_hflip", float)):  # the quality section's timm child
        parser.add_argument(hidden, default=None, type=kind, help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------- measuring
def child_pids():
    """Processes whose parent is this one (DataLoader workers), from /proc; [] elsewhere."""
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        try:
            with open(f"/proc/{entry}/stat") as f:
                if entry.isdigit() and int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    pids.append(int(entry))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def pss_mb(pid):
    """A process's proportional resident set in MB (0 once it has exited); without /proc, the
    peak RSS so far of this process."""
    if not os.path.exists("/proc/self/smaps_rollup"):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("Pss:")), 0) / 1024
    except OSError:
        return 0.0


class PeakMemory:
    """`with PeakMemory(device) as peak:` -> peak.mb (this process and the processes it starts
    inside the block, sampled by a thread) and peak.gpu_mb (CUDA only)."""

    def __init__(self, device):
        self.device, self.mb, self.gpu_mb = device, 0.0, None

    def _poll(self):
        while True:
            pids = [os.getpid()] + [p for p in child_pids() if p not in self.before]
            self.mb = max(self.mb, sum(pss_mb(p) for p in pids))
            if self.done.wait(SAMPLE_EVERY):
                return

    def __enter__(self):
        gc.collect()  # hand back what earlier variants freed, so it is not counted again
        trim = getattr(ctypes.CDLL(None), "malloc_trim", None) if sys.platform.startswith("linux") else None
        if trim:  # glibc
            trim(0)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.before, self.done = set(child_pids()), threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        if self.device.type == "cuda":
            self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def compare(variants, rounds, device):
    """variants: {name: fn() -> images, or (images, seconds) timed by fn}. A warm-up pass each
    (its peak memory kept), then `rounds` timed rounds in rotated order. Returns {name: {"rates": [...], "peak_rss_mb": ...}}."""
    names, out = list(variants), {}
    for name in names:
        with PeakMemory(device) as peak:
            variants[name]()
        out[name] = {"rates": [], "peak_rss_mb": round(peak.mb), "peak_gpu_mb": peak.gpu_mb}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            result = variants[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            images, seconds = result if isinstance(result, tuple) else (result, time.perf_counter() - start)
            out[name]["rates"].append(images / seconds)
    return out


# ---------------------------------------------------------------- the sections
class NaiveDataset(torch.utils.data.Dataset):
    """The public baseline's way: full-size PIL decode, torchvision transforms, one image at a time."""

    def __init__(self, paths, labels, resize, mean, std):
        self.paths, self.labels = paths, labels
        self.transform = transforms.Compose([transforms.Resize(resize, Image.BILINEAR), transforms.ToTensor(),
                                             transforms.Normalize(mean=mean, std=std)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(Image.open(self.paths[index]).convert("RGB")), self.labels[index]


def training_images(data, n, batch_size):
    """n photos (whole batches; the list repeats where the data is smaller) and their labels."""
    root, samples = read_mask_train(os.path.join(data, "train"))
    picks = [samples[i % len(samples)] for i in range(max(batch_size, n // batch_size * batch_size))]
    return [os.path.join(root, s.path) for s in picks], [s.label for s in picks]


def training_loader(dataset, args, device):
    """The training side's loader as train.py builds it: a seeded shuffle, whole batches, and
    its default --prefetcher (uint8 batches from the workers, flipped and normalized by the
    loader's consumer; the dataset's transform becomes the workers' part)."""
    return device_loader(make_loader(dataset, args.batch_size, args.num_workers, device, drop_last=True,
                                     sampler=EpochSampler(len(dataset), seed=0)), dataset.transform, device)


def eval_loader(dataset, batch_size, args, device):
    """An inference loader as inference.py builds it (its default --prefetcher)."""
    return device_loader(make_loader(dataset, batch_size, args.num_workers, device), dataset.transform, device)


def steady(loader, workers):
    """(images, seconds) of an epoch once every worker has delivered its first batch. The start
    (worker start-up, each worker's first batch) is paid once per epoch: about 1% of a
    competition epoch (15,000 images) but a large share of a benchmark's short one."""
    images, start = 0, None
    for i, (_, labels) in enumerate(loader):
        if start is not None:
            images += len(labels)
        elif i + 1 >= workers:
            start = time.perf_counter()
    return images, time.perf_counter() - start


def in_memory_steps(model, optimizer, precision, images, target, steps, criterion=torch.nn.functional.cross_entropy):
    """fn(count=steps) -> images trained: train.py's own step (engine.train_step) on one batch already
    in memory (no loader), at `precision`."""
    from maskcls.engine import Step, train_step
    images, step = precision.batch(images), Step(criterion, optimizer, precision.scaler(), precision)

    def run(count=steps):
        model.train()
        for _ in range(count):
            train_step(model, images, target, step)
        return count * len(target)
    return run


def section_loader(args, plan, device):
    # enough batches to time after each worker's first one
    paths, labels = training_images(args.data, max(plan["loader"], (args.num_workers + 4) * args.batch_size),
                                    args.batch_size)
    augment = AUGMENTATIONS.build(args.augmentation, resize=args.resize, mean=MASK_MEAN, std=MASK_STD)
    naive = torch.utils.data.DataLoader(NaiveDataset(paths, labels, args.resize, MASK_MEAN, MASK_STD),
                                        batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                        pin_memory=device.type == "cuda")
    prepared = prepared_size(augment, args.resize)  # None: the pipeline gets full photos, as train.py does
    ours = training_loader(ImageDataset(paths, labels, augment, prepare_to=prepared), args, device)
    cache = open_cache(len(paths), prepared or args.resize, "ram")
    cached = training_loader(ImageDataset(paths, labels, augment, prepare_to=prepared or args.resize, cache=cache),
                             args, device)
    # the prepared-image store a first run filled (its warm-up pass here), read by a later run's
    # first epoch: no in-run cache yet, every image from the store
    store = PreparedStore(tempfile.mkdtemp(prefix="bench-store-"))
    stored = training_loader(ImageDataset(paths, labels, augment, prepare_to=prepared or args.resize, store=store),
                             args, device)
    workers = args.num_workers
    try:
        return compare({"naive": lambda: steady(naive, workers), "loader": lambda: steady(ours, workers),
                        "loader_cached": lambda: steady(cached, workers),
                        "loader_stored": lambda: steady(stored, workers)}, plan["rounds"], device)
    finally:
        shutil.rmtree(store.folder, ignore_errors=True)


def project_training(args, plan, device):
    """(fn() -> images of one training epoch as train.py runs it, the model, its optimizer, the
    precision, one real batch and its target in memory, the steps an epoch, the criterion)."""
    from maskcls.engine import Step, train_one_epoch
    from loss import build_criterion
    from maskcls.optim import build_optimizer
    from train import DEFAULT_LR, DEFAULT_OPTIMIZER, DEFAULT_WEIGHT_DECAY
    precision = auto_precision(args, device)
    paths, labels = training_images(args.data, plan["train"], args.batch_size)
    augment = AUGMENTATIONS.build(args.augmentation, resize=args.resize, mean=MASK_MEAN, std=MASK_STD)
    # train.py's default --cache auto keeps decoded images in RAM where they fit, as they do here:
    # the warm-up pass is the first epoch, the timed ones are later epochs
    prepared = prepared_size(augment, args.resize) or args.resize
    dataset = ImageDataset(paths, labels, augment, prepare_to=prepared, cache=open_cache(len(paths), prepared, "ram"))
    images = torch.stack([dataset[i][0] for i in range(args.batch_size)]).to(device)  # one real batch, in memory
    loader, steps = training_loader(dataset, args, device), len(paths) // args.batch_size
    target = torch.tensor(labels[:args.batch_size], device=device)
    torch.manual_seed(0)
    model = precision.model(create_model(args.model, NUM_CLASSES).to(device))
    criterion = build_criterion("cross_entropy", NUM_CLASSES).to(device)
    optimizer = build_optimizer(DEFAULT_OPTIMIZER, model, DEFAULT_LR, DEFAULT_WEIGHT_DECAY)  # train.py's default
    step = Step(criterion, optimizer, precision.scaler(), precision)

    def real():
        train_one_epoch(model, loader, step, device, "bench")
        return steps * args.batch_size
    return real, model, optimizer, precision, images, target, steps, criterion


def auto_precision(args, device):
    """What --precision auto gives train.py for this model, size and batch (probed on a CPU)."""
    from maskcls.runtime import Runtime
    return Runtime.start(str(device), "auto", None, args.resize, args.model, args.batch_size).precision


def section_train(args, plan, device):
    real, model, optimizer, precision, images, target, steps, criterion = project_training(args, plan, device)
    plain = create_model(args.model, NUM_CLASSES).to(device)
    ceiling = in_memory_steps(model, optimizer, precision, images, target, steps, criterion)
    fp32 = in_memory_steps(plain, torch.optim.Adam(plain.parameters(), lr=1e-3), resolve_precision("fp32", device),
                           images, target, steps)
    return compare({"train": real, "train_ceiling": ceiling, "train_fp32": fp32}, plan["rounds"], device)


def section_contended(args, plan, device):
    """A training epoch as train.py runs it (loader workers and all), alone and beside one other
    CPU-bound process (a busy loop started for the epoch and stopped after it)."""
    return alone_and_beside_a_hog(project_training(args, plan, device)[0], plan, device)


SMALL_SIZE, SMALL_BATCH = (32, 32), 16  # contended_small: where a team of compute threads stalled most
SMALL_IMAGES = 640                      # ... and enough images for an epoch of a few seconds


def section_contended_small(args, plan, device):
    """The same at 32x32 in batches of 16 (train.py's batch for ~900 images), where train.py's
    thread probe (maskcls.runtime.probe_threads) gives the main process one compute thread: two
    stalled at every small op's barrier beside the hog (train.py on digits, resnet18 at 32x32:
    epochs of 14-16 s beside it against 4-5 s alone, 3.3 s beside it in batches of 32)."""
    small = argparse.Namespace(**{**vars(args), "resize": SMALL_SIZE, "batch_size": SMALL_BATCH})
    real, model, optimizer, precision, images, target, steps, criterion = project_training(
        small, dict(plan, train=max(plan["train"], SMALL_IMAGES)), device)
    ceiling = in_memory_steps(model, optimizer, precision, images, target, steps, criterion)
    return alone_and_beside_a_hog(real, plan, device, "_small", {"train_ceiling_small": ceiling})


def alone_and_beside_a_hog(real, plan, device, suffix="", others=None):
    """compare() of the epoch `real` alone and beside a busy loop (train_quiet, train_hog + suffix),
    and of any `others` ({name: fn}) in the same rounds."""
    def beside_a_hog():
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        try:
            time.sleep(0.2)  # the hog running before the epoch starts
            start = time.perf_counter()
            images = real()
            return images, time.perf_counter() - start
        finally:
            hog.kill()
            hog.wait()
    return compare({f"train_quiet{suffix}": real, f"train_hog{suffix}": beside_a_hog, **(others or {})},
                   plan["rounds"], device)


# ---------------------------------------------------------------- peers: the same work done their way
def baseline_training(paths, labels, args, device):
    """The boostcamp baseline's loop: its dataset (PIL, torchvision Resize/ToTensor/Normalize, one
    image per __getitem__), a plain DataLoader with cpu_count // 2 workers, SGD (lr 1e-3, weight
    decay 5e-4, its defaults), cross-entropy, fp32."""
    loader = torch.utils.data.DataLoader(NaiveDataset(paths, labels, args.resize, MASK_MEAN, MASK_STD),
                                         batch_size=args.batch_size, shuffle=True, drop_last=True,
                                         num_workers=max(1, (os.cpu_count() or 2) // 2),
                                         pin_memory=device.type == "cuda")
    torch.manual_seed(0)
    model = create_model(args.model, NUM_CLASSES).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, weight_decay=5e-4)

    def epoch():
        model.train()
        seen = 0
        for images, target in loader:
            images, target = images.to(device), target.to(device)
            loss = torch.nn.functional.cross_entropy(model(images), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(target)
        return seen

    @torch.no_grad()
    def infer():
        model.eval()
        return sum(len(model(images.to(device)).argmax(1)) for images, _ in loader)
    return epoch, infer


class PilImages(torch.utils.data.Dataset):
    """(PIL image, label) pairs whose `transform` timm's create_loader sets."""

    def __init__(self, paths, labels):
        self.paths, self.labels, self.transform = paths, labels, None

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        image = Image.open(self.paths[index]).convert("RGB")
        return (self.transform(image) if self.transform else image), self.labels[index]


def timm_training(paths, labels, args, device):
    """timm's train.py loop rebuilt from timm's library: timm.data.create_loader with its training
    transforms (random resized crop, flip, colour jitter 0.4) and its eval ones (resize, centre
    crop), its optimizer factory (SGD, train.py's defaults), fp32: train.py's default without --amp."""
    import timm.data
    from timm.optim import create_optimizer_v2
    torch.manual_seed(0)
    model = create_model(args.model, NUM_CLASSES).to(device)
    size = (3, *args.resize)
    train_loader = timm.data.create_loader(PilImages(paths, labels), input_size=size, batch_size=args.batch_size,
                                           is_training=True, use_prefetcher=False, num_workers=args.num_workers,
                                           color_jitter=0.4, hflip=0.5, pin_memory=device.type == "cuda")
    eval_loader = timm.data.create_loader(PilImages(paths, labels), input_size=size, batch_size=args.batch_size,
                                          is_training=False, use_prefetcher=False, num_workers=args.num_workers)
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.1 * args.batch_size / 256, weight_decay=2e-5,
                                    momentum=0.9)

    def epoch():
        model.train()
        seen = 0
        for images, target in train_loader:
            loss = torch.nn.functional.cross_entropy(model(images.to(device)), target.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            seen += len(target)
        return seen

    @torch.no_grad()
    def infer():
        model.eval()
        return sum(len(model(images.to(device))) for images, _ in eval_loader)
    return epoch, infer


def section_peers(args, plan, device):
    """The same model trained and predicting on the same images for the same steps: the project
    (train.py's defaults: precision auto, the in-run cache, its loader) against the baseline's loop
    and timm's, each at the precision it would use by default."""
    from maskcls.predict import predict
    ours_train = project_training(args, plan, device)[0]
    paths, labels = training_images(args.data, plan["train"], args.batch_size)
    precision = auto_precision(args, device)
    store = PreparedStore(tempfile.mkdtemp(prefix="bench-store-"))
    eval_set = ImageDataset(paths, labels, eval_transform(args.resize, MASK_MEAN, MASK_STD), prepare_to=args.resize,
                            store=store)
    infer_loader = eval_loader(eval_set, 128, args, device)  # inference.py's default batch
    torch.manual_seed(0)
    model = precision.model(create_model(args.model, NUM_CLASSES).to(device).eval())
    base_train, base_infer = baseline_training(paths, labels, args, device)
    timm_train, timm_infer = timm_training(paths, labels, args, device)
    try:
        return compare({"peer_ours": ours_train, "peer_baseline": base_train, "peer_timm": timm_train,
                        "peer_ours_infer": lambda: len(predict(model, infer_loader, device, precision, desc="bench")),
                        "peer_baseline_infer": base_infer, "peer_timm_infer": timm_infer}, plan["rounds"], device)
    finally:
        shutil.rmtree(store.folder, ignore_errors=True)


def section_infer(args, plan, device):
    from maskcls.predict import predict
    precision = resolve_precision("auto", device)
    paths, labels = training_images(args.data, plan["infer"], args.batch_size)
    # prepared to the input size, as for a run trained with a pipeline that starts with A.Resize
    dataset = ImageDataset(paths, labels, eval_transform(args.resize, MASK_MEAN, MASK_STD), prepare_to=args.resize)
    images = torch.stack([dataset[i][0] for i in range(args.batch_size)]).to(device)
    loader, batches = eval_loader(dataset, args.batch_size, args, device), len(paths) // args.batch_size
    # warm: inference.py's store of prepared eval images, filled by an earlier inference (the warm-up)
    store = PreparedStore(tempfile.mkdtemp(prefix="bench-store-"))
    warm_loader = eval_loader(ImageDataset(paths, labels, eval_transform(args.resize, MASK_MEAN, MASK_STD),
                                           prepare_to=args.resize, store=store), args.batch_size, args, device)
    torch.manual_seed(0)
    model = precision.model(create_model(args.model, NUM_CLASSES).to(device).eval())
    plain = create_model(args.model, NUM_CLASSES).to(device).eval()
    fast_images = precision.batch(images)

    def real():
        return len(predict(model, loader, device, precision, desc="bench"))

    def warm():
        return len(predict(model, warm_loader, device, precision, desc="bench"))

    @torch.inference_mode()
    def ceiling():
        with precision.autocast():
            for _ in range(batches):
                model(fast_images)
        return batches * args.batch_size

    @torch.inference_mode()
    def fp32():
        for _ in range(batches):
            plain(images)
        return batches * args.batch_size

    try:
        return compare({"infer": real, "infer_warm": warm, "infer_ceiling": ceiling, "infer_fp32": fp32},
                       plan["rounds"], device)
    finally:
        shutil.rmtree(store.folder, ignore_errors=True)


def face_canvases(n, seed=0):
    """n 384x512 photos: grace_hopper.jpg scaled, moved and brightened a little on a plain background."""
    from matplotlib.cbook import get_sample_data
    rng = np.random.default_rng(seed)
    face = Image.open(get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    canvases = []
    for _ in range(n):
        canvas = Image.new("RGB", (384, 512), tuple(int(v) for v in rng.integers(90, 230, 3)))
        width = int(rng.integers(260, 360))
        height = round(width * face.height / face.width)
        pasted = ImageEnhance.Brightness(face.resize((width, height), Image.BILINEAR)).enhance(rng.uniform(0.8, 1.2))
        canvas.paste(pasted, (int(rng.integers(0, 384 - width + 1)), int(rng.integers(0, 512 - height + 1))))
        canvases.append(canvas)
    return canvases


def section_detect(args, plan, device):
    from facecrop import detect_boxes
    images = face_canvases(plan["detect"])
    found = sum(box is not None for box in detect_boxes(images, DETECT_BATCH))
    return {**compare({"detect_batched": lambda: len(detect_boxes(images, DETECT_BATCH)),
                       "detect_single": lambda: sum(len(detect_boxes([image])) for image in images)},
                      plan["rounds"], device), "faces_found": f"{found}/{len(images)}"}


def section_compile(args, plan, device):
    """What --compile buys: the training step on in-memory batches, torch.compile'd against eager, at
    the auto precision. The compile time (the first step) is reported as compile_seconds."""
    from maskcls.runtime import compile_model
    precision = resolve_precision("auto", device)
    images = torch.randn(args.batch_size, 3, *args.resize, device=device)
    target = torch.randint(0, NUM_CLASSES, (args.batch_size,), device=device)
    steps = max(1, plan["train"] // args.batch_size)

    def stepper(model):
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        return in_memory_steps(model, optimizer, precision, images, target, steps)

    torch.manual_seed(0)
    eager = precision.model(create_model(args.model, NUM_CLASSES).to(device).train())
    compiled = compile_model(precision.model(create_model(args.model, NUM_CLASSES).to(device).train()), device)
    start, compiled_step = time.perf_counter(), stepper(compiled)
    compiled_step(1)  # the first step compiles
    compile_seconds = time.perf_counter() - start
    result = compare({"train_compiled": compiled_step, "train_eager": stepper(eager)}, plan["rounds"], device)
    result["compile_seconds"] = round(compile_seconds, 1)
    return result


# ---------------------------------------------------------------- quality against timm's recipe
QUALITY_PLANS = {"quick": dict(seeds=(0,), epochs=10), "full": dict(seeds=(0, 1, 2), epochs=30)}
QUALITY_SIZE = (32, 32)  # the input size of both recipes (the images are 8x8 and 25x25)
QUALITY_DATASETS = ("digits", "lfw_subset")  # quality_datasets' names (lfw_subset with scikit-image)


def quality_datasets(root):
    """{name: (train folder, test folder, the flip probability a competent user would pass)}: real
    images bundled with installed packages, split the way the packages' own examples split them,
    written as one folder per class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()  # scikit-learn's "Recognizing hand-written digits" example: the first half trains
    x_train, x_test, y_train, y_test = train_test_split(digits.images, digits.target, test_size=0.5, shuffle=False)
    found = {"digits": (*_write_class_folders(os.path.join(root, "digits"), x_train * 255 / 16, y_train,
                                              x_test * 255 / 16, y_test, [str(d) for d in range(10)]),
                        0.0)}  # a mirrored digit is another digit or none: no flips
    try:
        from skimage.data import lfw_subset
    except ImportError:
        print("note: `pip install scikit-image` adds its bundled lfw_subset (faces and non-faces) to this section")
        return found
    faces = lfw_subset()  # scikit-image's Haar-feature face example: 150 of the 200 train, stratified
    labels = np.array([0] * 100 + [1] * 100)
    x_train, x_test, y_train, y_test = train_test_split(faces, labels, train_size=150, random_state=0, stratify=labels)
    found["lfw_subset"] = (*_write_class_folders(os.path.join(root, "lfw_subset"), x_train * 255, y_train,
                                                 x_test * 255, y_test, ["face", "not_face"]), 0.5)
    return found


def _write_class_folders(root, x_train, y_train, x_test, y_test, names):
    for side, images, labels in (("train", x_train, y_train), ("test", x_test, y_test)):
        for i, (image, label) in enumerate(zip(images, labels)):
            folder = os.path.join(root, side, names[label])
            os.makedirs(folder, exist_ok=True)
            Image.fromarray(np.clip(np.round(image), 0, 255).astype(np.uint8)).save(os.path.join(folder, f"{i:04d}.png"))
    return os.path.join(root, "train"), os.path.join(root, "test")


def folder_labels(test_dir):
    """{relative path: class index} of a folder-per-class test set (classes: sorted folder names)."""
    classes = sorted(name for name in os.listdir(test_dir)  # not the prepared-image cache inference keeps there
                     if not name.startswith(".") and os.path.isdir(os.path.join(test_dir, name)))
    return {os.path.join(name, f): i for i, name in enumerate(classes) for f in os.listdir(os.path.join(test_dir, name))}


def test_scores(truth, predicted):
    from maskcls.metrics import macro_f1
    keys = sorted(truth)
    y, p = [truth[k] for k in keys], [predicted[k] for k in keys]
    return float(np.mean(np.array(y) == np.array(p))), macro_f1(y, p, max(y + p) + 1)


def _run_script(script, *flags):
    """Run one of the project's commands; (stdout lines, each with the seconds since its start when
    it was printed). A failure is one line naming the command."""
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as err:
        proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script),
                                 *map(str, flags)], stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "PYTHONUNBUFFERED": "1"})  # each line when printed
        lines = [(time.perf_counter() - start, line) for line in proc.stdout]
        if proc.wait() != 0:
            err.seek(0)
            raise cli.UserError(f"{script} failed in the quality section:\n{err.read()[-2000:]}")
    return lines, time.perf_counter() - start


def quality_ours(train_dir, test_dir, model, epochs, seed, work, extra=(), refit=True, name="ours"):
    """The project with its defaults: train.py given only data, model, input size and epochs (and
    `extra` flags), then inference.py on the test folder; with `refit`, the same run's `--refit`
    too (trained after the validated run, in the same command). {"ours": (accuracy, macro F1,
    seconds), "refit": (...)}; ours's seconds stop where the refit starts (plus its inference),
    refit's count the validated run too (the refit needs its best epoch)."""
    size = f"{QUALITY_SIZE[0]},{QUALITY_SIZE[1]}"
    lines, train_seconds = _run_script("train.py", "--dataset", "ImageFolder", "--data_dir", train_dir,
                                       "--model", model, "--resize", size, "--epochs", epochs, "--seed", seed,
                                       "--model_dir", work, "--name", name, "--refit", str(refit), *extra)
    validated_seconds = next((at for at, line in lines if line.startswith("=== refit")), train_seconds)
    truth = folder_labels(test_dir)
    import pandas as pd
    found = {}
    for key, checkpoint, seconds in (("ours", "best.pth", validated_seconds), ("refit", "refit", train_seconds)):
        if key == "refit" and not refit:
            continue
        output = os.path.join(work, f"{name}-{key}.csv")
        _, infer_seconds = _run_script("inference.py", "--model_dir", os.path.join(work, name), "--data_dir",
                                       test_dir, "--checkpoint", checkpoint, "--output", output)
        out = pd.read_csv(output)
        found[key] = (*test_scores(truth, dict(zip(out["ImageID"], out["ans"]))), seconds + infer_seconds)
    return found


class PilFolder(torch.utils.data.Dataset):
    """(path, label) pairs read as timm's ImageDataset reads them: PIL, converted to RGB."""

    def __init__(self, items, transform):
        self.items, self.transform = items, transform

    def __len__(self):
        return len(self.items)

    def __getitem__(self, index):
        path, label = self.items[index]
        with Image.open(path) as image:
            return self.transform(image.convert("RGB")), label


TIMM_RECIPES = {
    # timm train.py's defaults: SGD with Nesterov momentum 0.9, lr 0.1 x batch / 256, weight decay
    # 2e-5, batch 128 (at most a quarter of the images), cosine with 5 warmup epochs from 1e-5
    "defaults": dict(opt="sgd", lr=None, weight_decay=2e-5, momentum=0.9, batch=128, warmup_epochs=5),
    # what a competent user passes for a short run from scratch: --opt adamw --lr 1e-3
    # --weight-decay 0.05 --sched cosine --warmup-epochs 0, batch 64 (or a quarter of the images when
    # that is fewer: the project's default batch until it became "64 or fewer for 400 updates a run")
    "competent": dict(opt="adamw", lr=1e-3, weight_decay=0.05, momentum=None, batch=64, warmup_epochs=0),
    # the same at the project's default batch for the images (train.default_batch_size): whether a
    # lead over the row above is the batch alone
    "competent_batch": dict(opt="adamw", lr=1e-3, weight_decay=0.05, momentum=None, batch="project",
                            warmup_epochs=0),
}


def section_quality_timm(args, plan, device):
    """timm's train.py recipe (`--q_recipe` defaults, competent or competent_batch: TIMM_RECIPES),
    rebuilt from timm's library functions: its data config and transforms (random resized crop,
    flip --q_hflip, colour jitter 0.4; eval resize + centre crop), its optimizer factory (no weight
    decay on norm and bias), a cosine schedule, label smoothing 0.1, fp32, its checkpoints written
    every epoch as train.py writes them; trained on the same 80% of the training folder as the
    project (its split), the best epoch by validation top-1 kept, as train.py's checkpoint saver
    keeps it."""
    import timm
    from timm.data import create_transform, resolve_data_config
    from timm.loss import LabelSmoothingCrossEntropy
    from timm.optim import create_optimizer_v2
    from timm.scheduler import create_scheduler_v2

    from dataset import ImageFolder
    torch.manual_seed(args.q_seed)
    np.random.seed(args.q_seed)
    source = ImageFolder(args.q_train, val_ratio=0.2, seed=args.q_seed)  # the project's own split of the data
    train_idx, val_idx = source.split()
    items = list(zip(source.all_paths(), (s.label for s in source.samples)))
    model = timm.create_model(args.model, num_classes=source.num_classes)
    config = resolve_data_config({"input_size": (3, *QUALITY_SIZE)}, model=model)
    recipe = TIMM_RECIPES[args.q_recipe]
    hflip = args.q_hflip if args.q_recipe.startswith("competent") else 0.5  # train.py's default flips everything
    train_tf = create_transform(**{**config, "interpolation": "random"}, is_training=True, hflip=hflip,
                                color_jitter=0.4)
    eval_tf = create_transform(**config, is_training=False)
    # never more than a quarter of the training images: with drop_last, 120 images (lfw_subset's
    # 80%) in batches of 128 would train nothing at all
    if recipe["batch"] == "project":
        from train import default_batch_size
        batch = default_batch_size(len(train_idx), args.q_epochs)
    else:
        batch = min(recipe["batch"], len(train_idx) // 4)
    loader = torch.utils.data.DataLoader(PilFolder([items[i] for i in train_idx], train_tf), batch_size=batch,
                                         shuffle=True, drop_last=True, num_workers=args.num_workers)
    val_loader = torch.utils.data.DataLoader(PilFolder([items[i] for i in val_idx], eval_tf), batch_size=256,
                                             num_workers=args.num_workers)
    optimizer = create_optimizer_v2(model, opt=recipe["opt"], lr=recipe["lr"] or 0.1 * batch / 256,
                                    weight_decay=recipe["weight_decay"],
                                    **({"momentum": recipe["momentum"]} if recipe["momentum"] else {}))
    scheduler, epochs = create_scheduler_v2(optimizer, sched="cosine", num_epochs=args.q_epochs,
                                            warmup_epochs=recipe["warmup_epochs"], warmup_lr=1e-5, min_lr=0.0)
    criterion = LabelSmoothingCrossEntropy(smoothing=0.1)
    _timm_fit(model, loader, val_loader, optimizer, scheduler, criterion, epochs)
    test_root = args.q_test
    truth = folder_labels(test_root)
    keys = sorted(truth)
    test_loader = torch.utils.data.DataLoader(PilFolder([(os.path.join(test_root, k), truth[k]) for k in keys], eval_tf),
                                              batch_size=256, num_workers=args.num_workers)
    preds = _predictions(model, test_loader)
    return {"scores": list(test_scores(truth, dict(zip(keys, preds))))}


def _timm_fit(model, loader, val_loader, optimizer, scheduler, criterion, epochs):
    """timm train.py's epoch loop: train, validate top-1, its checkpoints (last.pth.tar every epoch
    and the 10 best, timm's CheckpointSaver); leaves the model at its best epoch."""
    from timm.utils import CheckpointSaver
    saver = CheckpointSaver(model, optimizer, checkpoint_dir=tempfile.mkdtemp(prefix="bench-timm-"), max_history=10)
    best, best_state = -1.0, None
    for epoch in range(epochs):
        model.train()
        for images, labels in loader:
            loss = criterion(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        top1 = _accuracy(model, val_loader)
        if top1 > best:
            best, best_state = top1, {k: v.detach().clone() for k, v in model.state_dict().items()}
        saver.save_checkpoint(epoch, metric=top1)
        scheduler.step(epoch + 1, top1)
    shutil.rmtree(saver.checkpoint_dir, ignore_errors=True)
    model.load_state_dict(best_state)


@torch.no_grad()
def _predictions(model, loader):
    model.eval()
    return [int(p) for images, _ in loader for p in model(images).argmax(1)]


def _accuracy(model, loader):
    labels = [int(y) for _, batch in loader for y in batch]
    return float(np.mean(np.array(_predictions(model, loader)) == np.array(labels)))


QUALITY_RECIPES = (("ours_defaults", "project defaults"), ("ours", "project competent"),
                   ("refit", "project refit"), ("competent", "timm competent"),
                   ("competent_batch", "timm comp., our batch"), ("defaults", "timm defaults"))


def run_quality(args, quick):
    """The project against timm's recipe on every dataset, the order of the recipes rotating with
    the seed: each at its defaults, and each as a competent user runs it, who knows whether
    mirroring changes the class (no flips on digits: `--hflip 0` for the project, hflip 0 for
    timm, with timm's competent optimizer flags); and the competent project run's --refit. Where
    flips are kept (lfw_subset) the project's competent run is its default one. Prints the table
    and returns its figures."""
    plan = dict(QUALITY_PLANS["quick" if quick else "full"])
    plan.update({k: v for k, v in (("seeds", args.seeds), ("epochs", args.epochs)) if v})
    rows = {}
    with tempfile.TemporaryDirectory(prefix="bench-quality-") as root:
        found = quality_datasets(root)
        unknown = sorted(set(args.quality_data or ()) - set(found))
        if unknown:
            raise cli.UserError(f"--quality_data {unknown[0]}: not among this machine's quality datasets "
                                f"({', '.join(found)}; lfw_subset needs `pip install scikit-image`)")
        for name, (train_dir, test_dir, hflip) in found.items():
            if args.quality_data and name not in args.quality_data:
                continue
            for seed in plan["seeds"]:
                work = os.path.join(root, f"{name}-{seed}")
                os.makedirs(work)
                order = ["ours", "competent", "competent_batch", "defaults"]
                order = order[seed % 4:] + order[:seed % 4]
                for recipe in order:
                    if recipe == "ours":
                        told = ["--hflip", "0"] if hflip == 0 else []  # what timm's competent user is told
                        found = quality_ours(train_dir, test_dir, args.model, plan["epochs"], seed, work, told)
                        found["ours_defaults"] = found["ours"] if not told else quality_ours(
                            train_dir, test_dir, args.model, plan["epochs"], seed, work, refit=False,
                            name="defaults")["ours"]
                    else:  # timed from outside, as ours: the process start and imports count for both
                        start = time.perf_counter()
                        raw, _ = run_section("quality_timm", args, root, [
                            "--q_train", train_dir, "--q_test", test_dir, "--q_seed", str(seed),
                            "--q_epochs", str(plan["epochs"]), "--q_recipe", recipe, "--q_hflip", str(hflip)])
                        found = {recipe: (*raw["scores"][:2], time.perf_counter() - start)}
                    for key, scores in found.items():
                        rows.setdefault((name, key), []).append(scores)
                        print(f"quality {name} seed {seed} {key}: accuracy {scores[0]:.4f}, macro F1 {scores[1]:.4f}, "
                              f"{scores[2]:.0f} s", flush=True)
    return quality_table(rows, plan, args.model)


def quality_table(rows, plan, model):
    lines = [f"quality: {model} from scratch at {QUALITY_SIZE[0]}x{QUALITY_SIZE[1]}, {plan['epochs']} epochs, "
             f"seeds {','.join(map(str, plan['seeds']))}; test-set mean (min-max over seeds)",
             f"{'dataset':<12} {'recipe':<26} {'accuracy':>22} {'macro F1':>22} {'seconds':>9}"]
    figures = {}
    for name in sorted({n for n, _ in rows}):
        means = {}
        for recipe, label in QUALITY_RECIPES:
            runs = np.array(rows[(name, recipe)])
            means[recipe] = runs.mean(0)
            cells = [f"{runs[:, i].mean():.4f} ({runs[:, i].min():.4f}-{runs[:, i].max():.4f})" for i in (0, 1)]
            lines.append(f"{name:<12} {label:<26} {cells[0]:>22} {cells[1]:>22} {runs[:, 2].mean():>9.0f}")
            figures[f"quality_{name}_{recipe}"] = {"accuracy": runs[:, 0].tolist(), "macro_f1": runs[:, 1].tolist(),
                                                   "seconds": runs[:, 2].tolist()}
        for ours, peer, label, target in (("ours_defaults", "competent", "project dflt / timm comp.", True),
                                          ("ours", "competent", "competent: project / timm", True),
                                          ("ours_defaults", "competent_batch", "dflt / timm at our batch", False),
                                          ("ours_defaults", "defaults", "defaults: project / timm", False),
                                          ("refit", "competent", "refit / timm competent", False),
                                          ("refit", "ours", "refit / validated", False)):
            ratio = means[ours] / means[peer]
            verdict = ("  met" if ratio[0] >= 1 and ratio[1] >= 1 and ratio[2] <= 1 else "  NOT met") if target else ""
            lines.append(f"{name:<12} {label:<26} {ratio[0]:>21.3f}x {ratio[1]:>21.3f}x {ratio[2]:>8.2f}x{verdict}")
            figures[f"quality_{name}_{ours}_vs_{peer}"] = ratio.round(4).tolist()
    print("\n".join(lines))
    return figures


SECTIONS = {"loader": section_loader, "train": section_train, "infer": section_infer, "detect": section_detect,
            "compile": section_compile, "contended": section_contended,
            "contended_small": section_contended_small, "peers": section_peers,
            "quality_timm": section_quality_timm}


# ---------------------------------------------------------------- the report
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_seconds():
    """(CPU seconds all processes have used, None without /proc/stat; those of our finished children)."""
    ours = resource.getrusage(resource.RUSAGE_CHILDREN)
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:9]]  # user nice system idle iowait irq softirq steal
        busy = (sum(ticks[:3]) + sum(ticks[5:8])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        busy = None
    return busy, ours.ru_utime + ours.ru_stime


def run_section(name, args, data, extra=()):
    """One section in a child process: its raw rates, and the share of the machine's CPU that
    other processes used meanwhile (None where unknown)."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    try:
        (busy0, ours0), start = cpu_seconds(), time.perf_counter()
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--data", data,
                               "--section", name, "--result", result, *extra], capture_output=True, text=True)
        (busy1, ours1), wall = cpu_seconds(), time.perf_counter() - start
        if done.returncode != 0:
            raise cli.UserError(f"section {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        with open(result) as f:
            raw = json.load(f)
    finally:
        os.remove(result)
    others = None if busy0 is None else max(0.0, (busy1 - busy0) - (ours1 - ours0)) / (wall * os.cpu_count())
    return raw, others


def summarize(raw, others, precision):
    """The flat figures (for JSON) and the table."""
    figures, lines = {}, []
    for name, stats in raw.items():
        figures[f"{name}_imgs_per_s"] = round(statistics.median(stats["rates"]), 2)
        figures[f"{name}_peak_rss_mb"] = stats["peak_rss_mb"]
        if stats["peak_gpu_mb"] is not None:
            figures[f"{name}_peak_gpu_mb"] = round(stats["peak_gpu_mb"])
    width = max(len(row[1]) for row in ROWS)  # the measurement column
    header = (f"{'measurement':<{width}} {'ours':>7} {'ref':>7} {'ratio':>6} {'spread':>6}  {'target':<7} {'':<14} "
              f"{'peak RSS MB':>13} {'others':>6}\n{'':<{width}} {'img/s':>7} {'img/s':>7} {'':>6} {'':>6}  {'':<7} "
              f"{'':<14} {'ours / ref':>13} {'CPU':>6}")
    for key, what, ours, ref, target, precisions, section in ROWS:
        if ours not in raw:
            continue
        slowdown = key.endswith("_slowdown")  # reference / ours: lower is better
        ratios = [(b / a) if slowdown else (a / b) for a, b in zip(raw[ours]["rates"], raw[ref]["rates"])]
        ratio = figures[key] = round(statistics.median(ratios), 3)
        good = ratio <= target if slowdown else ratio >= target
        verdict = "n/a: auto=fp32" if precisions and precision == "fp32" else "met" if good else "NOT met"
        busy = others.get(section)
        lines.append(f"{what:<{width}} {figures[ours + '_imgs_per_s']:>7.1f} {figures[ref + '_imgs_per_s']:>7.1f} "
                     f"{ratio:>5.2f}x {(max(ratios) - min(ratios)) / ratio:>6.0%}  {'<=' if slowdown else '>='} "
                     f"{target:<4g} {verdict:<14} {figures[ours + '_peak_rss_mb']:>6} / {figures[ref + '_peak_rss_mb']:<4} "
                     f"{'?' if busy is None else format(busy, '.0%'):>6}")
    return figures, "\n".join([header, "-" * len(header.splitlines()[0]), *lines])


def main(args):
    device = resolve_device(args.device)
    plan = PLANS["quick" if args.quick else "full"]
    if args.section:  # a child process: measure one section, hand back its raw rates
        with open(args.result, "w") as f:
            json.dump(SECTIONS[args.section](args, plan, device), f)
        return None
    AUGMENTATIONS.get(args.augmentation)  # an unknown name: one line, before any work
    default = "loader,train,infer,detect,contended,contended_small,peers" + ("" if args.quick else ",compile")
    sections = [s.strip() for s in (args.sections or default).split(",") if s.strip()]
    choices = [*(name for name in SECTIONS if name != "quality_timm"), "quality"]
    unknown = [s for s in sections if s not in choices]
    if unknown:
        raise cli.UserError(f"unknown section {unknown[0]!r}; choose from {', '.join(choices)}")
    unknown = sorted(set(args.quality_data or ()) - set(QUALITY_DATASETS))
    if unknown:  # before any work
        raise cli.UserError(f"--quality_data {unknown[0]}: choose from {', '.join(QUALITY_DATASETS)}")
    figures = throughput(args, [s for s in sections if s != "quality"], plan, device)
    if "quality" in sections:
        figures.update(run_quality(args, args.quick))
    with open(args.json, "w") as f:
        json.dump(figures, f, indent=2)
    print(f"wrote {args.json}")
    return figures


SUBMISSION_EPOCHS, SUBMISSION_TRAIN, SUBMISSION_EVAL = 20, 15_120, 12_600  # 80% of 18,900 photos; 12,600 eval


def time_to_submission(figures):
    """Minutes to train SUBMISSION_EPOCHS epochs and predict the eval set, from the peers' rates;
    our first epoch at the rate of a first epoch (every image decoded: the loader row), where known."""
    rates = {k: figures.get(f"peer_{k}_imgs_per_s") for k in ("ours", "baseline", "timm", "ours_infer",
                                                              "baseline_infer", "timm_infer")}
    if None in rates.values():
        return {}
    first = min(rates["ours"], figures.get("loader_imgs_per_s", rates["ours"]))
    ours = (SUBMISSION_EPOCHS - 1) * SUBMISSION_TRAIN / rates["ours"] + SUBMISSION_TRAIN / first
    out = {"submission_minutes_ours": (ours + SUBMISSION_EVAL / rates["ours_infer"]) / 60}
    for peer in ("baseline", "timm"):
        out[f"submission_minutes_{peer}"] = (SUBMISSION_EPOCHS * SUBMISSION_TRAIN / rates[peer] +
                                             SUBMISSION_EVAL / rates[f"{peer}_infer"]) / 60
    return {k: round(v, 1) for k, v in out.items()}


def throughput(args, sections, plan, device):
    """The speed sections, each in a child process, and their table; {} when none is asked for."""
    if not sections:
        return {}
    precision, started, raw, others = resolve_precision("auto", device), time.time(), {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        data = args.data or scratch
        if not os.path.isdir(os.path.join(data, "train")):
            from make_sample_data import generate
            generate(data, persons=math.ceil(max(plan["loader"], plan["train"], plan["infer"]) / 7), eval_persons=1)
        for name in sections:
            section_raw, others[name] = run_section(name, args, data)
            raw.update(section_raw)
    faces = raw.pop("faces_found", None)
    compile_seconds = raw.pop("compile_seconds", None)
    figures, table = summarize(raw, others, precision.name)
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "device": str(device),
            "gpu": torch.cuda.get_device_name() if device.type == "cuda" else None,
            "precision_auto": precision.name, "channels_last": precision.channels_last,
            "cpu_native_bf16": cpu_has_native_bf16(), "num_workers": args.num_workers, "model": args.model,
            "augmentation": args.augmentation,
            "resize": list(args.resize), "batch_size": args.batch_size, "mode": "quick" if args.quick else "full",
            "plan": plan, "others_cpu_share": others, "faces_found": faces, "compile_seconds": compile_seconds,
            "seconds": round(time.time() - started)}
    bf16 = "yes" if info["cpu_native_bf16"] else "no (auto means fp32 here: the fp32 rows do not apply)"
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, device {device}"
          f"{' (' + info['gpu'] + ')' if info['gpu'] else ''}; precision auto -> {precision.name}"
          f"{' channels_last' if precision.channels_last else ''}; CPU native bf16: {bf16}")
    print(f"{info['mode']}: {args.num_workers} loader workers, batch {args.batch_size}, {args.resize[0]}x"
          f"{args.resize[1]}, {args.model}, {args.augmentation}; images per pass: {plan['loader']} loader, "
          f"{plan['train']} train, {plan['infer']} infer, {plan['detect']} detect ({faces or '-'} with a face found); "
          f"{plan['rounds']} rounds; {info['seconds']} s")
    print(table)
    submission = time_to_submission(figures)
    if submission:
        figures.update(submission)
        print(f"time to a submission ({SUBMISSION_EPOCHS} epochs of {SUBMISSION_TRAIN:,} images, then "
              f"{SUBMISSION_EVAL:,} eval images: the real competition's sizes): ours "
              f"{submission['submission_minutes_ours']:.0f} min, the baseline's {submission['submission_minutes_baseline']:.0f}"
              f" min, timm's {submission['submission_minutes_timm']:.0f} min")
    if compile_seconds is not None:
        print(f"compiling the training step took {compile_seconds:.0f} s (paid once per run)")
    if any(share is not None and share > 0.1 for share in others.values()):
        print("note: other processes used the CPU meanwhile (last column): these figures are noisy; rerun")
    return {**figures, "info": info, "rounds": raw}


if __name__ == "__main__":
    cli.run(main, get_args_parser)
