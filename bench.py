"""Benchmark the project's fast paths side by side with naive references: one table, one JSON file.

    python bench.py                 # full run: more images and repeats
    python bench.py --quick         # under 3 minutes on a 2-core CPU
    python bench.py --quick --data /tmp/benchdata --json bench.json --device cuda

The data comes from make_sample_data.py (384x512 photos in the competition layout), written to
a temporary folder, or to --data DIR and reused from there. Each figure is the ratio of two
throughputs (images/s) measured in the same process: one untimed warm-up pass per variant,
then rounds that run every variant once, in an order rotated each round (ABC, BCA, CAB) so that
a neighbour's load spike hits all sides alike. Reported: the median over rounds of each rate and
of the per-round ratio. Batch 32 and 224x224 (the size of the training figure) by default.

- loader_vs_naive: the training loader (dataset.ImageDataset: load_image with a draft decode to
  the training size, AlbuAugmentation, make_loader) against a naive loader written below the way
  the public baseline does it (PIL open + convert, torchvision Resize/ToTensor/Normalize, one
  image per __getitem__, a plain DataLoader): same images, size, batch and worker count. Every
  epoch decodes every image, as the first epoch of a run does.
- loader_cached_vs_naive: the training loader over ImageCache(kind="ram"), filled by the warm-up.
- train_vs_ceiling, train_vs_fp32: train.train_one_epoch over the training loader (precision
  "auto" with its channels_last default, Adam, cross_entropy, no mixing) against the same step
  on one batch already in memory (the ceiling), and against a plain fp32 NCHW step in memory.
- infer_vs_ceiling, infer_vs_fp32: inference.predict over the eval loader against the forward
  pass on in-memory batches (inference_mode), at the same precision and in plain fp32.
- detect_batched_vs_single: facecrop.detect_boxes on batches of 16 same-size images against one
  image per call (384x512 canvases holding matplotlib's grace_hopper.jpg). MTCNN runs on the CPU.
- *_peak_rss_mb: peak resident memory of the benchmark process plus the loader workers started
  for that variant, sampled every 50 ms during its warm-up pass. Shared pages are split between
  processes (PSS), so workers forked from the main process are not counted twice. On CUDA also
  *_peak_gpu_mb (torch.cuda.max_memory_allocated).

Each section runs in its own process (`--section`), so memory left over by one cannot inflate
the next. Timings never fail anything: the table says met or not met.
"""
import argparse
import json
import math
import os
import platform
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

import cli
from augmentation import AUGMENTATIONS, eval_transform
from dataset import MASK_MEAN, MASK_STD, NUM_CLASSES, ImageCache, ImageDataset, make_loader, read_mask_train
from model import cpu_has_native_bf16, create_model, resolve_device, resolve_precision

# images per timed pass of each section, and timed rounds
PLANS = {"quick": dict(loader=128, train=64, infer=128, detect=32, rounds=3),
         "full": dict(loader=512, train=256, infer=512, detect=96, rounds=5)}
DETECT_BATCH = 16  # facecrop's own batch size
SAMPLE_EVERY = 0.05  # s between memory samples
# (key, measurement, ours, reference, target ratio, fp32_only: the target assumes a faster precision)
ROWS = [("loader_vs_naive", "loader, every image decoded", "loader", "naive", 3.0, False),
        ("loader_cached_vs_naive", "loader, ImageCache(ram)", "loader_cached", "naive", 5.0, False),
        ("train_vs_ceiling", "train step vs model-only", "train", "train_ceiling", 0.9, False),
        ("train_vs_fp32", "train step vs plain fp32", "train", "train_fp32", 2.0, True),
        ("infer_vs_ceiling", "predict vs model-only", "infer", "infer_ceiling", 0.9, False),
        ("infer_vs_fp32", "predict vs plain fp32", "infer", "infer_fp32", 2.0, True),
        ("detect_batched_vs_single", f"face detection, batch {DETECT_BATCH} vs 1", "detect_batched",
         "detect_single", 2.0, False)]


def get_args_parser():
    parser = cli.ArgumentParser(description="Measure the loader, training, inference and face detection "
                                            "against naive references; print one table, write JSON.")
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (under 3 minutes on 2 cores)")
    parser.add_argument("--data", default=None, metavar="DIR",
                        help="where make_sample_data.py writes (reused if DIR/train exists); default: a temp dir")
    parser.add_argument("--json", default="bench.json", metavar="PATH", help="the figures, as JSON")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    parser.add_argument("--num_workers", type=int, default=min(4, os.cpu_count() or 1),
                        help="DataLoader workers, ours and naive alike (train.py's default)")
    parser.add_argument("--model", default="resnet18", help="the model of the train and infer sections")
    parser.add_argument("--resize", type=cli.parse_size, default=(224, 224), metavar="H,W", help="model input size")
    parser.add_argument("--batch_size", type=cli.positive_int, default=32)
    parser.add_argument("--sections", default="loader,train,infer,detect", help="which sections to run")
    # internal: run one section in this (child) process and write its raw rates to --result
    parser.add_argument("--section", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--result", default=None, help=argparse.SUPPRESS)
    return parser


# ---------------------------------------------------------------- measuring
def _child_pids():
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


def _pss_mb(pid):
    """A process's proportional resident set (MB); the peak RSS so far where /proc lacks it."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("Pss:")) / 1024
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


class PeakMemory:
    """`with PeakMemory(device) as peak:` -> peak.mb, peak.gpu_mb: this process plus the child
    processes started inside the block, sampled every SAMPLE_EVERY seconds by a thread."""

    def __init__(self, device):
        self.device, self.mb, self.gpu_mb = device, 0.0, None

    def _poll(self):
        while True:
            pids = [os.getpid()] + [p for p in _child_pids() if p not in self.before]
            self.mb = max(self.mb, sum(_pss_mb(p) for p in pids))
            if self.done.wait(SAMPLE_EVERY):
                return

    def __enter__(self):
        self.before, self.done = set(_child_pids()), threading.Event()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        self.thread = threading.Thread(target=self._poll, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.done.set()
        self.thread.join()
        if self.device.type == "cuda":
            self.gpu_mb = torch.cuda.max_memory_allocated() / 2**20


def compare(variants, rounds, device):
    """variants: {name: fn() -> images processed}. A warm-up pass each (its peak memory kept),
    then `rounds` timed rounds in rotated order. {name: {"rates": [...], "peak_rss_mb": ...}}."""
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
            images = variants[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            out[name]["rates"].append(images / (time.perf_counter() - start))
    return out


def count(loader):
    return sum(len(labels) for _, labels in loader)


# ---------------------------------------------------------------- the naive reference loader
class NaiveDataset(torch.utils.data.Dataset):
    """The public baseline's way: PIL decode at full size, torchvision transforms, one image at a time."""

    def __init__(self, paths, labels, resize, mean, std):
        self.paths, self.labels = paths, labels
        self.transform = transforms.Compose([transforms.Resize(resize, Image.BILINEAR), transforms.ToTensor(),
                                             transforms.Normalize(mean=mean, std=std)])

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, index):
        return self.transform(Image.open(self.paths[index]).convert("RGB")), self.labels[index]


# ---------------------------------------------------------------- sections
def training_images(data, n, batch_size):
    """n photos (a whole number of batches; the list repeats where the data is smaller) and labels."""
    root, samples = read_mask_train(os.path.join(data, "train"))
    n = max(batch_size, n // batch_size * batch_size)
    picks = [samples[i % len(samples)] for i in range(n)]
    return [os.path.join(root, s.path) for s in picks], [s.label for s in picks]


def section_loader(args, plan, device):
    paths, labels = training_images(args.data, plan["loader"], args.batch_size)
    train_tf = AUGMENTATIONS.build("AlbuAugmentation", resize=args.resize, mean=MASK_MEAN, std=MASK_STD)
    naive = torch.utils.data.DataLoader(NaiveDataset(paths, labels, args.resize, MASK_MEAN, MASK_STD),
                                        batch_size=args.batch_size, shuffle=True, num_workers=args.num_workers,
                                        pin_memory=device.type == "cuda")
    ours = make_loader(ImageDataset(paths, labels, train_tf, min_size=args.resize), args.batch_size,
                       args.num_workers, device, shuffle=True, seed=0)
    cache = ImageCache(len(paths), args.resize, "ram")
    cached = make_loader(ImageDataset(paths, labels, train_tf, min_size=args.resize, cache=cache),
                         args.batch_size, args.num_workers, device, shuffle=True, seed=0)
    return compare({"naive": lambda: count(naive), "loader": lambda: count(ours),
                    "loader_cached": lambda: count(cached)}, plan["rounds"], device)


def section_train(args, plan, device):
    from cutmix import BatchMixer
    from loss import build_criterion
    from train import train_one_epoch
    precision = resolve_precision("auto", device)
    paths, labels = training_images(args.data, plan["train"], args.batch_size)
    train_tf = AUGMENTATIONS.build("AlbuAugmentation", resize=args.resize, mean=MASK_MEAN, std=MASK_STD)
    dataset = ImageDataset(paths, labels, train_tf, min_size=args.resize)
    loader = make_loader(dataset, args.batch_size, args.num_workers, device, shuffle=True, drop_last=True, seed=0)
    images = torch.stack([dataset[i][0] for i in range(args.batch_size)]).to(device)  # one real batch, in memory
    target = torch.tensor(labels[:args.batch_size], device=device)
    steps = len(loader)

    torch.manual_seed(0)
    model = precision.model(create_model(args.model, NUM_CLASSES).to(device))
    criterion = build_criterion("cross_entropy", NUM_CLASSES).to(device)
    optimizer, scaler = torch.optim.Adam(model.parameters(), lr=1e-3), precision.scaler()
    plain = create_model(args.model, NUM_CLASSES).to(device).train()
    plain_optimizer = torch.optim.Adam(plain.parameters(), lr=1e-3)
    fast_images = precision.batch(images)

    def real():
        train_one_epoch(model, loader, criterion, optimizer, BatchMixer(), device, precision, scaler, "bench")
        return steps * args.batch_size

    def ceiling():  # train_one_epoch's step, minus the loader
        model.train()
        for _ in range(steps):
            with precision.autocast():
                loss = criterion(model(fast_images), target)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        return steps * args.batch_size

    def fp32():
        for _ in range(steps):
            loss = torch.nn.functional.cross_entropy(plain(images), target)
            plain_optimizer.zero_grad(set_to_none=True)
            loss.backward()
            plain_optimizer.step()
        return steps * args.batch_size

    return compare({"train": real, "train_ceiling": ceiling, "train_fp32": fp32}, plan["rounds"], device)


def section_infer(args, plan, device):
    from inference import predict
    precision = resolve_precision("auto", device)
    paths, labels = training_images(args.data, plan["infer"], args.batch_size)
    dataset = ImageDataset(paths, labels, eval_transform(args.resize, MASK_MEAN, MASK_STD), min_size=args.resize)
    loader = make_loader(dataset, args.batch_size, args.num_workers, device)
    images = torch.stack([dataset[i][0] for i in range(args.batch_size)]).to(device)
    batches = len(loader)
    torch.manual_seed(0)
    model = precision.model(create_model(args.model, NUM_CLASSES).to(device).eval())
    plain = create_model(args.model, NUM_CLASSES).to(device).eval()
    fast_images = precision.batch(images)

    def real():
        return len(predict(model, loader, device, precision, desc="bench"))

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

    return compare({"infer": real, "infer_ceiling": ceiling, "infer_fp32": fp32}, plan["rounds"], device)


def face_canvases(n, seed=0):
    """n 384x512 photos: grace_hopper.jpg scaled, shifted and brightened a little on a plain background."""
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
    results = compare({"detect_batched": lambda: len(detect_boxes(images, DETECT_BATCH)),
                       "detect_single": lambda: sum(len(detect_boxes([image])) for image in images)},
                      plan["rounds"], device)
    results["faces_found"] = f"{found}/{len(images)}"
    return results


SECTIONS = {"loader": section_loader, "train": section_train, "infer": section_infer, "detect": section_detect}


# ---------------------------------------------------------------- the report
def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def summarize(raw, precision):
    """The flat figures (JSON) and the table rows from every section's raw rates."""
    figures, lines = {}, []
    for name, stats in raw.items():
        if isinstance(stats, dict):
            figures[f"{name}_imgs_per_s"] = round(statistics.median(stats["rates"]), 2)
            figures[f"{name}_peak_rss_mb"] = stats["peak_rss_mb"]
            if stats["peak_gpu_mb"] is not None:
                figures[f"{name}_peak_gpu_mb"] = round(stats["peak_gpu_mb"])
        else:
            figures[name] = stats
    for key, what, ours, ref, target, fp32_only in ROWS:
        if ours not in raw or ref not in raw:
            continue
        ratios = [a / b for a, b in zip(raw[ours]["rates"], raw[ref]["rates"])]
        ratio = figures[key] = round(statistics.median(ratios), 3)
        spread = (max(ratios) - min(ratios)) / ratio * 100
        verdict = "n/a: auto=fp32" if fp32_only and precision == "fp32" else "met" if ratio >= target else "NOT met"
        lines.append(f"{what:<30} {figures[f'{ours}_imgs_per_s']:>10.1f} {figures[f'{ref}_imgs_per_s']:>10.1f} "
                     f"{ratio:>6.2f}x {spread:>5.0f}% {'>= ' + format(target, 'g') + 'x':>7} {verdict:<14} "
                     f"{figures[f'{ours}_peak_rss_mb']:>5} / {figures[f'{ref}_peak_rss_mb']}")
    header = (f"{'measurement':<30} {'ours':>10} {'reference':>10} {'ratio':>7} {'spread':>6} {'target':>7} "
              f"{'':<14} peak RSS MB\n{'':<30} {'img/s':>10} {'img/s':>10} {'':>7} {'':>6} {'':>7} {'':<14} "
              f"ours / ref")
    return figures, "\n".join([header, "-" * len(header.splitlines()[0]), *lines])


def run_section(name, args, data):
    """One section in a child process; its raw rates come back through a JSON file."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        result = f.name
    try:
        done = subprocess.run([sys.executable, os.path.abspath(__file__), *sys.argv[1:], "--data", data,
                               "--section", name, "--result", result], capture_output=True, text=True)
        if done.returncode != 0:
            raise cli.UserError(f"section {name} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
        with open(result) as f:
            return json.load(f)
    finally:
        os.remove(result)


def main(args):
    device = resolve_device(args.device)
    plan = PLANS["quick" if args.quick else "full"]
    if args.section:  # a child process: measure one section, hand back its raw rates
        raw = SECTIONS[args.section](args, plan, device)
        with open(args.result, "w") as f:
            json.dump(raw, f)
        return raw
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise cli.UserError(f"unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    precision = resolve_precision("auto", device)
    bf16 = "yes" if cpu_has_native_bf16() else "no: auto means fp32 and the fp32 targets do not apply"
    load_before = os.getloadavg()[0]
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="bench-") as scratch:
        data = args.data or scratch
        if not os.path.isdir(os.path.join(data, "train")):
            from make_sample_data import generate
            most = max(plan[s] for s in ("loader", "train", "infer"))
            generate(data, persons=math.ceil(most / 7), eval_persons=1, seed=0)
        raw = {}
        for name in sections:
            raw.update(run_section(name, args, data))
    figures, table = summarize(raw, precision.name)
    load_after = os.getloadavg()[0]
    info = {"cpu": cpu_name(), "cores": os.cpu_count(), "torch": torch.__version__, "device": str(device),
            "precision_auto": precision.name, "channels_last": precision.channels_last,
            "cpu_native_bf16": cpu_has_native_bf16(), "num_workers": args.num_workers, "model": args.model,
            "resize": list(args.resize), "batch_size": args.batch_size, "mode": "quick" if args.quick else "full",
            "plan": plan, "load_average": [load_before, load_after], "seconds": round(time.time() - started)}
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}, device {device}"
          f"{' (' + torch.cuda.get_device_name() + ')' if device.type == 'cuda' else ''}")
    print(f"precision auto -> {precision.name}{' channels_last' if precision.channels_last else ''}; "
          f"CPU native bf16: {bf16}")
    print(f"{info['mode']}: {args.num_workers} loader workers, batch {args.batch_size}, {args.resize[0]}x"
          f"{args.resize[1]}, {args.model}; images per pass {plan['loader']} loader / {plan['train']} train / "
          f"{plan['infer']} infer / {plan['detect']} detect, {plan['rounds']} rounds; load average "
          f"{load_before:.1f} before, {load_after:.1f} after ({info['seconds']} s)")
    if max(load_before, load_after) > 0.5 * info["cores"]:
        print("note: the machine was busy with other work; expect noisy figures (see the spread column)")
    print(table)
    if "faces_found" in figures:
        print(f"faces found in the detection canvases: {figures['faces_found']}")
    with open(args.json, "w") as f:
        json.dump({**figures, "info": info, "rounds": raw}, f, indent=2)
    print(f"wrote {args.json}")
    return figures


if __name__ == "__main__":
    cli.run(main, get_args_parser)
