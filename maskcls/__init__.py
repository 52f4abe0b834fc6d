"""The machinery the commands share: nothing here is a command, and nothing here needs editing to
add a model, loss, augmentation or dataset (those are the registries at the top: model.py,
loss.py, augmentation.py, dataset.py, cutmix.py).

- the command line: `cli` (flags, one-line errors, progress), `registry` (plug-ins with their
  options), `options` (checks across flags, timm's spellings)
- files: `atomic` (every write), `readers` (every read-back, checked), `runfolder` (a run
  folder: name, lock, config.json, checkpoints, metrics.csv, figures), `heldout` (val_predictions.csv,
  oof.csv and the macro-F1 tools' shared helpers)
- data: `labels` (the 18-class scheme), `images` (decoding, the cache, loaders), `data` (what a run
  trains on, built once)
- training: `runtime` (device, precision, processes), `fold` (the flags become one model's parts),
  `fit` (the epoch loop), `engine` (the step, the training and validation passes), `optim`
  (optimizers and schedules), `distill` (teacher, out-of-fold targets), `shortcuts` (--smoke,
  --dry_run, --lr_find, --batch_size auto), `distributed` (torchrun)
- results: `metrics` (macro F1 and its bootstrap), `summary` (a run in one row, seed groups),
  `predict` (a run's models for prediction), `plots` (figures)

Layers: the modules here import each other and the plug-in files at the top (model.py, loss.py,
augmentation.py, cutmix.py, dataset.py, facecrop.py), never train.py, inference.py or a tool;
the commands import both.
"""
import os

# OpenMP threads that wait for work sleep instead of spinning. On a machine shared with other
# CPU-bound work (another run, a test suite) spinning threads keep the cores from the threads
# that have work: an epoch of resnet18 at 32x32 on 900 images took 5.3-6.1 s beside one busy
# process instead of 1.5-1.7 s (8-11 s beside two), and 2.5-2.7 s (4-5 s) with passive waiting,
# at no measurable cost to that epoch on a quiet machine. Its price is on tiny ops that torch
# spreads over every thread: each wakes the sleeping ones (resnet18's bare step at 32x32 140-173
# ms against 107-128 spinning; facecrop runs its thousands of box resizes on one thread for it).
# Set before torch loads OpenMP; a value the user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def keep_freed_memory():
    """glibc: freed memory stays in the process for the next allocation instead of going back to
    the kernel. By default every allocation above a threshold (128 KiB, rising to at most 32 MiB)
    is a fresh mmap, and the heap's top is trimmed when freed, so each training step's activations
    and each loader worker's per-image arrays are faulted in (zero-filled) again, step after step,
    image after image. resnet18 at 224x224, batch 32, bf16: 28,000-78,000 page faults and 0.06-0.17 s
    of system time per 1.0-1.16 s step; with both thresholds at 1 GiB 800-3,100 faults, 0.001-0.03 s,
    and the step 2-11% faster over five interleaved pairs (6-13% at 64x64). A loader worker's
    AlbuAugmentation image at 224x224: 281 faults -> 147 (the rest is the batch's shared memory),
    the loader 18% faster. The cost: a step's peak resident memory at 224x224 rose 80-230 MB (1.45
    -> 1.54-1.67 GB), what the allocator keeps for reuse. jemalloc or tcmalloc (LD_PRELOAD), which
    Intel's PyTorch CPU guide recommends for the same reason, do the same. Forked workers inherit
    it. A threshold set in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) wins;
    elsewhere than glibc nothing changes."""
    if any(name in os.environ for name in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return
    try:
        import ctypes
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl may lack it)
        return
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # malloc.h
    mallopt(M_MMAP_THRESHOLD, 1 << 30)
    mallopt(M_TRIM_THRESHOLD, 1 << 30)


keep_freed_memory()
