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
# which costs nothing measurable on a quiet machine. Set before torch loads OpenMP; a value the
# user set wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
