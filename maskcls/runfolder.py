"""The run folder's bookkeeping: its name, metrics.csv, TensorBoard (and W&B), figures, and the
state a resumed run needs.

A run folder (runs/<name>) holds config.json, split.csv, best.pth, last.pth, metrics.csv,
TensorBoard events and the figures of plots.py; README "Reading a run" says what each means.
`RunLog` is the one place an epoch is recorded: a row in metrics.csv, scalars in TensorBoard
(and W&B with `--wandb`), one printed line.
"""
import contextlib
import csv
import glob
import os
import random
import shutil
import sys

import numpy as np
import pandas as pd
import torch
from PIL import Image

from maskcls import distributed, plots
from maskcls.atomic import remove_stale_temps, replacing, write_json
from maskcls.cli import UserError, duration
from maskcls.readers import read_config
from model import load_state, read_checkpoint, save_checkpoint

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None

LOCK_NAME = ".lock"
METRIC_COLUMNS = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc", "val_f1", "lr", "seconds")
GRADCAM_IMAGES = 8
PREVIEW_IMAGES = 8
OPTIONAL_COLUMNS = ("val_f1_mask", "val_f1_gender", "val_f1_age", "ema_val_loss", "ema_val_f1")


class RunLock:
    """An exclusive lock on a run folder (`.lock`): a second training or --resume of the same
    folder is refused, naming the process that holds it.

    A POSIX record lock (fcntl), not flock: a record lock belongs to the process that took it
    and is not inherited by forked children, so DataLoader workers that outlive a killed run
    for a moment do not keep its folder locked (with flock they did, for seconds: an immediate
    --resume was refused, naming the dead parent). The operating system releases it when the
    process ends, however it ends (SIGKILL included). A record lock is also released when its
    process closes any descriptor of the file, so the file is opened once per process and a
    second lock of the same folder in the same process is refused too."""
    _held = {}  # real path of the lock file -> the RunLock of this process holding it

    def __init__(self, run_dir):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.file = None

    def acquire(self):
        if fcntl is None:  # not on Linux or macOS: no lock
            return self
        key = os.path.realpath(self.path)
        if key in RunLock._held:
            raise UserError(f"{os.path.dirname(self.path)} is in use by process {os.getpid()} (this one)")
        handle = open(self.path, "a+")
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"{os.path.dirname(self.path)} is in use by {holder}; wait for it to finish "
                            f"or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"process {os.getpid()} ({' '.join(sys.argv) or 'python'})")
        handle.flush()
        self.file, RunLock._held[key] = handle, self
        return self

    def release(self):
        if self.file is not None:
            RunLock._held.pop(os.path.realpath(self.path), None)
            self.file.close()  # closing releases the lock
            self.file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def clear_leftovers(run_dir):
    """What a killed run left in its folder (the lock held): half-written `*.tmp<pid>` files and
    its image cache file (as large as the data). Returns the paths removed."""
    removed = []
    for folder, _, _ in os.walk(run_dir):
        removed += remove_stale_temps(folder, owned=True)
        for path in glob.glob(os.path.join(glob.escape(folder), ".image_cache*.npy")):
            with contextlib.suppress(OSError):
                os.remove(path)
                removed.append(path)
    return removed


def discard_unstarted(run_dir):
    """A new run folder in which no epoch finished (a user error in the set-up, or in the first
    epoch): removed, so that nothing half-made is left and the next run takes its name. True if
    removed."""
    if glob.glob(os.path.join(glob.escape(run_dir), "**", "metrics.csv"), recursive=True):
        return False
    shutil.rmtree(run_dir, ignore_errors=True)
    return True


CONFIG_NAME = "config.json"


def write_config(run_dir, config):
    """A run's config.json (every resolved option and what inference needs: fold.fold_config; a
    k-fold parent's lists its fold folders). `read_config` reads it back, checked."""
    write_json(os.path.join(run_dir, CONFIG_NAME), config)


def record_new_length(run_dir, epochs):
    """--resume with another --epochs (a schedule that allows it): every config.json of the run
    (a k-fold run's folds too) says so."""
    for folder, _, files in os.walk(run_dir):
        if CONFIG_NAME not in files:
            continue
        config = read_config(folder)
        if config.get("epochs") != epochs:
            print(f"note: {folder} now runs to epoch {epochs} (was {config.get('epochs')}); config.json updated")
            write_config(folder, {**config, "epochs": epochs})


def fold_status(run_dir):
    """('new', 'unfinished' or 'done', epochs done): where a run folder, or a fold of a k-fold
    run, stands (--resume)."""
    last = os.path.join(run_dir, "last.pth")
    if not os.path.isfile(last):
        return "new", 0
    saved = read_checkpoint(last)
    return ("done" if saved.get("finished") else "unfinished"), int(saved.get("epoch") or 0)


def run_status(run_dir):
    """'new', 'unfinished' or 'done' for a run folder of any kind: a single run (its last.pth), or
    a k-fold parent (done once kfold.json is written after its last fold)."""
    if not os.path.isfile(os.path.join(run_dir, CONFIG_NAME)):
        return "new"
    config = read_config(run_dir)
    if config.get("fold_dirs"):
        return "done" if os.path.isfile(os.path.join(run_dir, "kfold.json")) else "unfinished"
    status, epochs = fold_status(run_dir)
    return "new" if status == "unfinished" and not os.path.isfile(os.path.join(run_dir, "metrics.csv")) else status


@contextlib.contextmanager
def open_run(model_dir, name, resume, epochs, context):
    """The run folder, locked for this process (rank 0) while the block runs: --resume's
    (`resume`), cleared of what a killed run left behind (temporary files, its image cache), or a
    new one under `model_dir`. A new folder in which no epoch finished when the block fails (a
    user error, a full disk; not Ctrl-C, which can be resumed) is removed: nothing half-made is
    left, and the next run takes its name."""
    if not context.is_main:
        yield distributed.broadcast(context, None)
        return
    run_dir = resume or make_run_dir(model_dir, name)
    try:
        lock = RunLock(run_dir).acquire()
    except UserError:
        if not resume:
            discard_unstarted(run_dir)
        raise
    try:
        if resume:
            removed = clear_leftovers(run_dir)
            if removed:
                print(f"removed {len(removed)} file(s) a killed run left in {run_dir}, first: {removed[0]}")
            record_new_length(run_dir, epochs)
        yield distributed.broadcast(context, run_dir)
    except Exception:
        if not resume and discard_unstarted(run_dir):
            print(f"removed {run_dir}: no epoch had finished")
        raise
    finally:
        lock.release()


def make_run_dir(model_dir, name):
    """runs/<name>, or <name>2, <name>3, ...: mkdir is atomic, so two runs never share one."""
    os.makedirs(model_dir, exist_ok=True)
    for n in range(1, 10_000):
        path = os.path.join(model_dir, name if n == 1 else f"{name}{n}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue
    raise UserError(f"no free run folder name for {name!r} in {model_dir}")


# ---------------------------------------------------------------- RNG state for --resume
def rng_states():
    """Every global RNG a run draws from, as plain data (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(), "numpy": (kind, keys.tolist(), pos, has_gauss, gauss),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def restore_rng_states(states):
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


# ---------------------------------------------------------------- checkpoints
class Checkpoint:
    """last.pth and best.pth of one run folder.

    last.pth holds what `--resume` needs: the state of every part of the training (`parts`:
    {key: object with state_dict() / load_state_dict(), or None}, the model's under "model"),
    the run's progress (epoch, best score, early-stopping counter) and every RNG state. best.pth
    holds the best weights and their scores. Both are written atomically (model.save_checkpoint).
    """
    PROGRESS = ("epoch", "best", "peak", "bad_epochs", "finished")

    def __init__(self, run_dir, parts, model_name="model"):
        self.last, self.best = os.path.join(run_dir, "last.pth"), os.path.join(run_dir, "best.pth")
        self.parts, self.model_name = parts, model_name
        self.saved_epoch = None  # the epoch last.pth holds (None: not written or read yet)

    def save_last(self, progress):
        state = {key: None if part is None else part.state_dict() for key, part in self.parts.items()}
        save_checkpoint({**state, **{k: progress.get(k) for k in self.PROGRESS}, "rng": rng_states()}, self.last)
        self.saved_epoch = progress["epoch"]

    def resume(self):
        """Load last.pth into every part and the global RNGs; returns the progress it holds."""
        saved = read_checkpoint(self.last)
        for key, part in self.parts.items():
            if part is None or saved.get(key) is None:
                continue
            if key == "model":  # a mismatch is one line naming both sides
                load_state(part, saved[key], self.last, self.model_name)
            else:
                part.load_state_dict(saved[key])
        restore_rng_states(saved["rng"])
        self.saved_epoch = saved["epoch"]
        return {k: saved[k] for k in self.PROGRESS if k in saved}  # runs from before "finished" lack it

    def save_best(self, weights, scores):
        save_checkpoint({"model": weights.state_dict(), **scores}, self.best)


class TopCheckpoints:
    """--checkpoint_hist K: the weights of the K best validated epochs, as top-<epoch>.pth (with
    their val F1), and --average_top: their mean. The files on disk are the record, so a resumed
    run continues the same list. A tie in F1 goes to the later epoch, as for best.pth."""
    PATTERN = "top-*.pth"

    def __init__(self, run_dir, k):
        self.run_dir, self.k = run_dir, k

    def entries(self):
        """[(val_f1, epoch, path)], best first."""
        found = []
        for path in glob.glob(os.path.join(glob.escape(self.run_dir), self.PATTERN)):
            saved = read_checkpoint(path)
            found.append((float(saved["val_f1"]), int(saved["epoch"]), path))
        return sorted(found, reverse=True)

    def consider(self, epoch, val_f1, weights):
        if not self.k:
            return
        kept = self.entries()
        if len(kept) >= self.k and (val_f1, epoch) <= kept[self.k - 1][:2]:
            return
        save_checkpoint({"model": weights.state_dict(), "val_f1": val_f1, "epoch": epoch},
                        os.path.join(self.run_dir, f"top-{epoch:04d}.pth"))
        for _, _, path in self.entries()[self.k:]:
            os.remove(path)

    def average(self, k):
        """(state dict: the mean of the k best weights, [their epochs]) or None. Integer tensors
        (batch norm's step counter) are taken from the best."""
        kept = self.entries()[:k]
        if not kept:
            return None
        states = [read_checkpoint(path)["model"] for _, _, path in kept]
        mean = {}
        for key, first in states[0].items():
            if first.is_floating_point():
                mean[key] = sum(s[key].double() for s in states).div(len(states)).to(first.dtype)
            else:
                mean[key] = first
        return mean, [epoch for _, epoch, _ in kept]


# ---------------------------------------------------------------- the epoch log
class RunLog:
    """metrics.csv + TensorBoard (+ W&B) + the printed line, for one run folder (rank 0 only).

    `resume_epoch=E` continues a run (E may be 0: a kill before the first last.pth of an epoch):
    rows after epoch E (written before a crash, redone now) are dropped from metrics.csv, and
    TensorBoard purges its events after E. None: a new run.
    """

    def __init__(self, run_dir, epochs, resume_epoch=None, wandb_project=None, config=None):
        self.run_dir, self.epochs = run_dir, epochs
        config = config or {}
        # the columns are fixed for the whole run (an epoch without validation leaves its cells empty)
        self.columns = METRIC_COLUMNS + (OPTIONAL_COLUMNS[:3] if config.get("tasks") else ()) + \
            (OPTIONAL_COLUMNS[3:] if config.get("ema") else ())
        self.path = os.path.join(run_dir, "metrics.csv")
        if resume_epoch is not None and os.path.exists(self.path):
            with open(self.path, newline="") as f:
                header, *rows = f.read().splitlines(keepends=True) or [""]
            kept = [row for n, row in enumerate(rows, 1)
                    if row.strip() and row_epoch(self.path, n, row) <= resume_epoch]
            with replacing(self.path) as tmp, open(tmp, "w", newline="") as f:
                f.write("".join([header, *kept]))  # the rows kept byte for byte
        from torch.utils.tensorboard import SummaryWriter  # slow import: only once a run starts
        self.writer = SummaryWriter(run_dir, purge_step=None if resume_epoch is None else resume_epoch + 1)
        self.wandb = None
        if wandb_project:
            wandb = require_wandb()
            self.wandb = wandb.init(project=wandb_project, name=os.path.basename(os.path.normpath(run_dir)),
                                    dir=run_dir, config=config, resume="allow")

    def epoch(self, row, is_best, eta=None):
        """Record one epoch's `row`; `eta`: the seconds the whole run has left (printed)."""
        before = ""
        if os.path.exists(self.path):
            with open(self.path, newline="") as f:
                before = f.read()
        columns = next(csv.reader([before.splitlines()[0]])) if before else list(self.columns)

        def cell(key):
            value = row.get(key)
            return "" if value is None or value != value else value if isinstance(value, int) else f"{value:.6g}"
        # the whole file rewritten and renamed: a full disk or a kill never leaves half a row
        with replacing(self.path) as tmp, open(tmp, "w", newline="") as f:
            f.write(before)
            out = csv.writer(f)
            if not before:
                out.writerow(columns)
            out.writerow([cell(k) for k in columns])
        scalars = {k: row[k] for k in columns if k not in ("epoch", "seconds") and cell(k) != ""}
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, row["epoch"])
        self.writer.flush()
        if self.wandb is not None:
            self.wandb.log(scalars, step=row["epoch"])
        tasks = "".join(f"  {c[len('val_f1_'):]} {row[c]:.3f}" for c in OPTIONAL_COLUMNS[:3] if c in row)
        ema = f"  ema_f1 {row['ema_val_f1']:.4f}" if "ema_val_f1" in row else ""
        left = f"  run eta {duration(eta)}" if eta else ""
        if cell("val_f1") == "":
            print(f"epoch {row['epoch']}/{self.epochs}  train_loss {row['train_loss']:.4f}  "
                  f"train_acc {row['train_acc']:.3f}  (not validated)  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
                  f"{left}{'  *last*' if is_best else ''}", flush=True)
            return
        print(f"epoch {row['epoch']}/{self.epochs}  train_loss {row['train_loss']:.4f}  "
              f"train_acc {row['train_acc']:.3f}  val_loss {row['val_loss']:.4f}  val_acc {row['val_acc']:.3f}  "
              f"val_f1 {row['val_f1']:.4f}{tasks}{ema}  lr {row['lr']:.2e}  {row['seconds']:.1f}s"
              f"{left}{'  *best*' if is_best else ''}", flush=True)

    def figure(self, name, figure, step):
        """A figure already written as <name>.png: also to TensorBoard and W&B, from that PNG
        (drawing it again for TensorBoard doubled the figures' cost, ~1.3 s per refresh)."""
        if figure is None:
            return
        with Image.open(os.path.join(self.run_dir, f"{name}.png")) as png:
            self.writer.add_image(name, np.asarray(png.convert("RGB")), step, dataformats="HWC")
        if self.wandb is not None:
            import wandb
            self.wandb.log({name: wandb.Image(os.path.join(self.run_dir, f"{name}.png"))}, step=step)

    def close(self):
        self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()


def row_epoch(path, n, row):
    """The epoch of metrics.csv's row `n` (its first cell), or one line if the file was damaged."""
    cell = row.split(",", 1)[0].strip()
    if not cell.isdigit():
        raise UserError(f"{path}: row {n} starts with {cell!r}, not an epoch number; the file was edited or "
                        f"damaged (remove that row to resume)")
    return int(cell)


def require_wandb():
    """The wandb module, or one line saying how to get it (checked before the run folder exists)."""
    try:
        import wandb
    except ImportError:
        raise UserError("--wandb needs the wandb package: pip install wandb "
                        "(WANDB_MODE=offline works without network)") from None
    return wandb


# ---------------------------------------------------------------- figures
def best_epoch_figures(log, output, paths, classes, epoch, regions=None, per_task=False):
    """confusion_matrix.png, confusion_tasks.png, mistakes.png of the best epoch so far."""
    run_dir, labels, preds = log.run_dir, output["labels"].numpy(), output["preds"].numpy()
    log.figure("confusion_matrix", plots.confusion_matrix_png(run_dir, labels, preds, classes,
                                                              title=f"best epoch {epoch}"), epoch)
    if per_task:
        log.figure("confusion_tasks", plots.task_confusion_png(run_dir, labels, preds), epoch)
    log.figure("mistakes", plots.mistakes_png(run_dir, paths, labels, preds, output["probs"], classes,
                                              regions=regions), epoch)


def final_figures(log, model, paths, labels, transform, classes, device, regions=None, prepare_to=None):
    """curves.png and gradcam.png (of the best weights, loaded into `model`)."""
    step = max(int(pd.read_csv(log.path)["epoch"].max()), 1) if os.path.exists(log.path) else 0
    log.figure("curves", plots.curves_png(log.run_dir, log.path), step)
    if not paths:  # no validation side: nothing to look at
        return
    pick = spread(len(paths), GRADCAM_IMAGES)  # across the validation set, not 8 photos of one person
    log.figure("gradcam", plots.gradcam_png(log.run_dir, model, [paths[i] for i in pick], transform, classes,
                                            labels=[labels[i] for i in pick], n=len(pick), device=device,
                                            regions=[regions[i] for i in pick] if regions else None,
                                            prepare_to=prepare_to), step)


def spread(count, n):
    """n indices spread evenly over range(count)."""
    return sorted({int(i) for i in np.linspace(0, count - 1, num=min(n, count))}) if count else []
