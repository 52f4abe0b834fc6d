"""Where and how a run computes, decided once: the device, the precision (autocast dtype and
memory format), the processes under torchrun, and the global seeds. `Runtime` bundles them, so
the parts of a run take one object instead of loose device / precision / context parameters.

Example: python train.py --precision bf16 --channels_last True --device cpu
"""
import contextlib
import dataclasses
import json
import logging
import os
import platform
import random
import shutil
import time

import numpy as np
import torch
from torch import nn

from maskcls import distributed
from maskcls.atomic import write_json
from maskcls.cli import UserError


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}



def cpu_has_native_bf16():
    """AVX512-BF16 or AMX: bf16 matrix maths in hardware (elsewhere bf16 is emulated and slow)."""
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)



@dataclasses.dataclass(frozen=True)
class Precision:
    """How the model runs: autocast dtype and memory format, decided once per run."""
    name: str            # fp32 | bf16 | fp16
    device_type: str     # cpu | cuda
    channels_last: bool  # NHWC tensors: what bf16/fp16 convolution kernels are fastest on

    def autocast(self):
        return torch.autocast(self.device_type, dtype=DTYPES[self.name], enabled=self.name != "fp32")

    def model(self, model):
        return model.to(memory_format=torch.channels_last) if self.channels_last else model

    def batch(self, images):
        # NCHW where channels-last is not wanted: the prefetcher hands over channels-last batches
        return images.contiguous(memory_format=torch.channels_last if self.channels_last else torch.contiguous_format)

    def scaler(self):
        """fp16 needs loss scaling against gradient underflow; bf16 and fp32 do not."""
        return torch.amp.GradScaler(self.device_type, enabled=self.name == "fp16")



# On a CPU, bf16 autocast casts every weight at every step: below this many input pixels that
# costs more than the faster kernels save. Training steps (batch 64, fused AdamW) on a 2-core
# Xeon with native bf16, fp32 / bf16+channels_last time: resnet18 0.80x at 32x32, 1.00x at 48,
# 1.37x at 64, 1.92x at 128, 2.63x at 224; efficientnet_b0 1.11x at 32, 0.74x at 64, 0.95x at
# 128, 1.82x at 224; resnet50 0.86x at 32.
CPU_BF16_MIN_PIXELS = 64 * 64



def resolve_precision(choice, device, channels_last=None, input_size=None):
    """`auto`: bf16 on a CUDA GPU, or on a CPU with native bf16 for inputs of at least
    CPU_BF16_MIN_PIXELS (`input_size` (H, W); None: any), fp16 on older GPUs, fp32 elsewhere.
    channels_last defaults to on with bf16/fp16 (measured 2.2x with bf16 on a 2-core CPU)."""
    device = torch.device(device)
    if choice == "auto":
        if device.type == "cuda":
            choice = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            small = input_size is not None and input_size[0] * input_size[1] < CPU_BF16_MIN_PIXELS
            choice = "bf16" if cpu_has_native_bf16() and not small else "fp32"
    if choice == "fp16" and device.type != "cuda":
        raise UserError("--precision fp16 needs CUDA; on a CPU use bf16 or fp32")
    if channels_last is None:
        channels_last = choice != "fp32"
    return Precision(choice, device.type, bool(channels_last))



PROBE_STEPS = 3     # timed training steps per precision, after one warm-up step
PROBE_BATCH = 64    # at most this many images a step: the ratio, not the time, is wanted


def probe_cache():
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"),
                        "maskcls", "precision.json")


def probe_precision(model_name, input_size, batch, channels_last=None):
    """('fp32' or 'bf16', {'fp32': seconds a step, 'bf16': ..., 'cached': bool}): a few training
    steps of the model at the input size in each (bf16 with channels-last unless told otherwise),
    the faster kept. bf16 casts every weight at every step on a CPU: small inputs lose (resnet18
    at 32x32 0.80x) and large ones gain (2.6x at 224), and where the turn comes depends on the
    model. The result is kept per machine, torch version, model, size and batch (probe_cache()), so
    a setup always runs at the same precision here and the same seed gives the same metrics."""
    key = "|".join(map(str, (cpu_name(), torch.__version__, model_name, input_size, min(batch, PROBE_BATCH),
                             channels_last)))
    saved = _read_probes().get(key)
    if isinstance(saved, dict) and saved.get("choice") in ("fp32", "bf16"):  # anything else: probed again
        return saved["choice"], {**saved, "cached": True}
    timings = {name: _step_seconds(model_name, input_size, min(batch, PROBE_BATCH), name, channels_last)
               for name in ("fp32", "bf16")}
    choice = min(timings, key=timings.get)
    result = {"choice": choice, **{k: round(v, 5) for k, v in timings.items()}}
    _write_probe(key, result)
    return choice, {**result, "cached": False}


# The main process trains on one compute thread where a few bare training steps on it are at most
# this much slower than on all of them (probe_threads). Beside other CPU-bound work a team of
# threads stalls at every op's barrier whenever one of its threads is descheduled; one thread
# does not. Measured on 2 cores, train.py on digits (resnet18, batch 16, seconds an epoch, quiet
# / beside a busy loop): 32x32 two threads 4.0-5.1 / 13.4-21.8, one 4.2-5.3 / 3.6-4.9; 64x64
# 6.7-8.1 / 20.6-28.6, one 6.5-7.2 / 6.6-7.4; 96x96 quiet 9.3-12.8, one 10.9-12.5; 128x128
# 11.0-14.3 / 38.7-39.1, one 16.9-17.8 / 16.6-17.6. The bare steps (bf16) put one thread at
# 1.0-1.2x the time of two at 32x32, 1.13-1.33x at 64x64, 1.18-1.41x at 96x96 and 1.40-1.45x at
# 128x128: in an epoch the loader workers take part of the other core, so the bare steps
# overstate the second thread. Where two are kept (128x128: 1.3x faster on a quiet machine, the
# usual case), OMP_NUM_THREADS=1 asks for one on a machine known to be shared.
ONE_THREAD_MARGIN = 1.3
THREADS_PROBE_BATCH = 16  # the ratio at batch 16 was the one at 32 and 64 (within the noise), at a quarter of the time
THREADS_PROBE_ROUNDS = 3  # one step timing on each side a round, rounds interleaved, stopped when clear


def probe_threads(model_name, input_size, batch, precision):
    """(compute threads for the main process, {'threads': n, 'all': seconds a step on every
    thread, 'one': on one thread, 'cached': bool}): one thread where a few training steps of the
    model at its size and precision run at most ONE_THREAD_MARGIN slower on it (small inputs),
    every thread otherwise. Kept like the precision probe (probe_cache()), per machine, torch
    version, model, size, batch, precision and thread count, so a setup always trains on the same
    number of threads (float sums depend on it)."""
    threads = torch.get_num_threads()
    batch = min(batch, THREADS_PROBE_BATCH)
    key = "|".join(map(str, ("threads", cpu_name(), torch.__version__, model_name, input_size, batch,
                             precision.name, precision.channels_last, threads)))
    saved = _read_probes().get(key)
    if isinstance(saved, dict) and saved.get("threads") in (1, threads):  # anything else: probed again
        return saved["threads"], {**saved, "cached": True}
    timings = {threads: [], 1: []}
    for _ in range(THREADS_PROBE_ROUNDS):  # interleaved; the fastest of each kept
        for count in (threads, 1):
            with num_threads(count):
                timings[count].append(_step_seconds(model_name, input_size, batch, precision.name,
                                                    precision.channels_last))
        ratio = min(timings[1]) / min(timings[threads])
        if not 1.0 < ratio < 2 * ONE_THREAD_MARGIN - 1:  # clear after one round: far from the margin
            break
    result = {"threads": 1 if ratio <= ONE_THREAD_MARGIN else threads,
              "all": round(min(timings[threads]), 5), "one": round(min(timings[1]), 5)}
    _write_probe(key, result)
    return result["threads"], {**result, "cached": False}


@contextlib.contextmanager
def num_threads(count):
    """This process's torch compute threads set to `count` inside, put back after (also on an error)."""
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _step_seconds(model_name, input_size, batch, name, channels_last):
    from maskcls.optim import build_optimizer
    from model import create_model
    precision = resolve_precision(name, "cpu", channels_last)
    with torch.random.fork_rng(devices=[]):  # the run's own random streams are left alone
        torch.manual_seed(0)
        net = precision.model(create_model(model_name, 2)).train()
        optimizer = build_optimizer("adamw", net, 1e-3, 0.05)
        images = precision.batch(torch.randn(batch, 3, *input_size))
        labels = torch.randint(0, 2, (batch,))
        for step in range(PROBE_STEPS + 1):
            if step == 1:
                start = time.perf_counter()
            with precision.autocast():
                loss = torch.nn.functional.cross_entropy(net(images).float(), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return (time.perf_counter() - start) / PROBE_STEPS


def cpu_name():
    with contextlib.suppress(OSError, StopIteration), open("/proc/cpuinfo") as f:
        return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    return platform.processor() or platform.machine()


def _read_probes():
    with contextlib.suppress(OSError, ValueError), open(probe_cache()) as f:
        saved = json.load(f)
        return saved if isinstance(saved, dict) else {}
    return {}


def _write_probe(key, result):
    """Best effort: a cache that cannot be written only means probing again next time."""
    with contextlib.suppress(OSError, UserError):
        os.makedirs(os.path.dirname(probe_cache()), exist_ok=True)
        write_json(probe_cache(), {**_read_probes(), key: result})


def compile_model(model, device):
    """torch.compile for the training step (TorchInductor). On the CPU it writes C++ and needs a
    compiler: say so in one line rather than fail at the first step with a long traceback."""
    if torch.device(device).type == "cpu" and not any(shutil.which(c) for c in
                                                      (os.environ.get("CXX", "g++"), "g++", "clang++", "c++")):
        raise UserError("--compile on the CPU needs a C++ compiler (g++ or clang++) on PATH")
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)  # "No CUDA runtime is found" on a CPU
    return torch.compile(model)



def unwrap(model):
    """The module itself, inside torch.compile and DistributedDataParallel wrappers."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner



def resolve_device(choice):
    """`auto` means CUDA where there is one."""
    if choice == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available")
    if choice == "auto":
        choice = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(choice)


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclasses.dataclass(frozen=True)
class Runtime:
    """Where a run computes: `device`, `precision`, the torchrun `context` (rank, world size) and
    the model's `input_size` (H, W); `probe`: the timings that chose the precision (or None)."""
    device: torch.device
    precision: Precision
    context: distributed.Context
    input_size: tuple
    probe: dict = None
    threads_probe: dict = None  # probe_threads' answer, where it was asked
    threads_before: int = None  # the thread count close() puts back

    @classmethod
    def start(cls, device_choice, precision_choice, channels_last, input_size, model=None, batch=64):
        """Join torchrun's process group (if any) and resolve the device and the precision: with
        `auto` on a CPU with native bf16 and a `model` name, the faster of fp32 and bf16 for that
        model, input size and `batch` (probe_precision). On a CPU, with a `model` name, outside
        torchrun and unless OMP_NUM_THREADS says how many: the main process's compute threads
        (probe_threads), put back by close()."""
        context, device = distributed.setup(device_choice)
        device = device or resolve_device(device_choice)
        probe = threads_probe = None
        before = torch.get_num_threads()
        try:
            precision = resolve_precision(precision_choice, device, channels_last, input_size)
            if precision_choice == "auto" and device.type == "cpu" and model is not None and cpu_has_native_bf16():
                name, probe = probe_precision(model, tuple(input_size), batch, channels_last)
                precision = resolve_precision(name, device, channels_last, input_size)
            if device.type == "cpu" and model is not None and not context.enabled and before > 1 \
                    and not os.environ.get("OMP_NUM_THREADS"):
                threads, threads_probe = probe_threads(model, tuple(input_size), batch, precision)
                torch.set_num_threads(threads)
        except BaseException:
            distributed.teardown(context)
            raise
        return cls(device, precision, context, tuple(input_size), probe, threads_probe, before)

    @property
    def is_main(self):
        return self.context.is_main

    @property
    def threads(self):
        """The compute threads of this process (on a CPU: probe_threads' choice, or OMP_NUM_THREADS)."""
        return torch.get_num_threads()

    def close(self):
        if self.threads_before is not None:
            torch.set_num_threads(self.threads_before)
        distributed.teardown(self.context)
