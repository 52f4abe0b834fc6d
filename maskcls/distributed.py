"""Multi-process training with PyTorch's own engine (torchrun): set-up and the few collectives
train.py needs. Without torchrun every function here is a cheap no-op, so the training code
reads the same for one process and for many.

    torchrun --nproc_per_node=4 train.py --model efficientNet_b3 ...          # one machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 \\
        --rdzv_backend=c10d --rdzv_endpoint=HOST:29500 train.py ...           # each of two machines

NCCL on CUDA, gloo on the CPU. Only rank 0 writes the run folder, logs and progress bars.
"""
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Context:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self):
        return self.world_size > 1

    @property
    def is_main(self):
        return self.rank == 0


def setup(device_choice):
    """Join the process group torchrun describes (if any); returns (Context, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    use_cuda = device_choice != "cpu" and torch.cuda.is_available()
    if world_size == 1:
        return Context(), None
    context = Context(int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0")))
    if use_cuda:
        torch.cuda.set_device(context.local_rank)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if not context.is_main:  # one voice: the other ranks keep stderr for errors only
        sys.stdout = open(os.devnull, "w")
    device = torch.device("cuda", context.local_rank) if use_cuda else torch.device("cpu")
    return context, device


def teardown(context):
    if context.enabled and dist.is_initialized():
        dist.destroy_process_group()


def barrier(context):
    if context.enabled:
        dist.barrier()


def broadcast(context, value):
    """Rank 0's value, on every rank."""
    if not context.enabled:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(context, value):
    """A list of every rank's value (in rank order), on every rank."""
    if not context.enabled:
        return [value]
    out = [None] * context.world_size
    dist.all_gather_object(out, value)
    return out


def sum_all(context, *numbers):
    """Element-wise sums over ranks of a few Python numbers."""
    if not context.enabled:
        return numbers
    return tuple(sum(values) for values in zip(*gather(context, numbers)))
