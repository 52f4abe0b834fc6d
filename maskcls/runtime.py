"""Where and how a run computes, decided once: the device, the precision (autocast dtype and
memory format), the processes under torchrun, and the global seeds. `Runtime` bundles them, so
the parts of a run take one object instead of loose device / precision / context parameters.

Example: python train.py --precision bf16 --channels_last True --device cpu
"""
import dataclasses
import logging
import os
import random
import shutil

import numpy as np
import torch
from torch import nn

from maskcls import distributed
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
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

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
    the model's `input_size` (H, W)."""
    device: torch.device
    precision: Precision
    context: distributed.Context
    input_size: tuple

    @classmethod
    def start(cls, device_choice, precision_choice, channels_last, input_size):
        """Join torchrun's process group (if any) and resolve the device and the precision."""
        context, device = distributed.setup(device_choice)
        device = device or resolve_device(device_choice)
        try:
            precision = resolve_precision(precision_choice, device, channels_last, input_size)
        except BaseException:
            distributed.teardown(context)
            raise
        return cls(device, precision, context, tuple(input_size))

    @property
    def is_main(self):
        return self.context.is_main

    def close(self):
        distributed.teardown(self.context)
