"""Figures for a run folder: each function writes one PNG and returns its matplotlib Figure, so
the caller can also log it with `writer.add_figure(tag, fig)`.

    confusion_matrix_png  -> confusion_matrix.png  counts and row-normalized, side by side
    task_confusion_png    -> confusion_tasks.png   mask / gender / age matrices with macro F1
    curves_png            -> curves.png            loss, F1, accuracy, learning rate per epoch
    aug_preview_png       -> aug_preview.png       originals, augmented draws, a mixed batch
    mistakes_png          -> mistakes.png          the most confident wrong predictions
    captioned_grid_png    -> suspects.png          audit.py's label suspects
    gap_png               -> gap.png               runs.py gap: validation against the leaderboard
    lr_find_png           -> lr_find.png           train.py --lr_find: loss against learning rate
    gradcam_png           -> gradcam.png           Grad-CAM of the predicted class (or None)

`path` is the PNG to write, or a folder (the run folder) to write the default name into.
Figures are built on `matplotlib.figure.Figure`, not pyplot: nothing global to close, and no
display is ever needed. Add a figure: a function `name_png(path, ...)` that builds a Figure
and ends with `return _save(fig, path, "name.png")`; sizes and fonts come from the constants.

Example: fig = confusion_matrix_png(run_dir, labels, preds, classes); writer.add_figure("cm", fig)
"""
import contextlib
import copy
import itertools
import math
import os

import matplotlib
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from PIL import Image
from sklearn.metrics import confusion_matrix

from augmentation import seed_transform
from maskcls.atomic import replacing
from maskcls.cli import UserError
from maskcls.images import load_image, prepare_image
from maskcls.labels import AGE_NAMES, GENDER_NAMES, MASK_NAMES, TASKS, decode_label
from maskcls.metrics import task_f1
from maskcls.summary import best_epoch

DPI = 100                 # pixels per inch of every PNG
FONT, SMALL_FONT, TITLE_FONT = 9, 7, 11  # points: axis labels, cell numbers / thumbnails, titles
CELL_INCH = 0.4           # confusion matrix cell size (18 classes: ~1,900 px wide in all)
PANEL_INCH = (4.0, 12.0)  # smallest and largest side of one confusion matrix panel
ANNOTATE_MAX_CLASSES = 30  # above this, cells are too small for numbers
THUMB_INCH = 1.7          # width of one image in the image grids
THUMB_PX = 384            # mistakes.png: photos shrunk to this longest side (memory, file size)
AUG_DRAWS = 3             # augmented draws per image in aug_preview.png
CAM_ALPHA = 0.45          # heat map opacity over the image
MAX_HEAD_SHARE = 0.5      # a feature map followed by more of the weights than this (a ViT's patch
#                           embedding, then transformer blocks) says little about the decision
TASK_NAMES = {"mask": MASK_NAMES, "gender": GENDER_NAMES, "age": AGE_NAMES}
assert tuple(TASK_NAMES) == tuple(TASKS), "one name list per task of the label scheme"


def _save(fig, path, default_name):
    if os.path.isdir(path):
        path = os.path.join(path, default_name)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=DPI, format="png")
    return fig


def _message_figure(path, default_name, text):
    fig = Figure(figsize=(6, 1.5), layout="constrained")
    fig.text(0.5, 0.5, text, ha="center", va="center", fontsize=TITLE_FONT)
    return _save(fig, path, default_name)


def _draw_matrix(ax, matrix, names, title, annotate, fmt, vmax=None):
    """One confusion matrix panel: true classes down, predictions across, numbers in cells."""
    n = len(names)
    cmap = matplotlib.colormaps["Blues"].with_extremes(bad="0.85")  # a class without images: grey
    image = ax.imshow(np.ma.masked_invalid(matrix), cmap=cmap, vmin=0, vmax=vmax)
    cell_pt = 72 * ax.figure.get_size_inches()[1] / max(n, 1)  # rough cell height in points
    tick_font = max(5, min(FONT, cell_pt * 0.6))
    ax.set_xticks(range(n), names, rotation=45, ha="right", rotation_mode="anchor", fontsize=tick_font)
    ax.set_yticks(range(n), names, fontsize=tick_font)
    ax.set_xlabel("predicted", fontsize=FONT)
    ax.set_ylabel("true", fontsize=FONT)
    ax.set_title(title, fontsize=TITLE_FONT)
    if annotate:
        dark = np.nanmax(matrix) * 0.6 if np.isfinite(matrix).any() else 0
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value) and value > 0:
                ax.text(j, i, fmt(value), ha="center", va="center", fontsize=FONT if n <= 10 else SMALL_FONT,
                        color="white" if value > dark else "black")
    return image


# ---------------------------------------------------------------- confusion matrices
def confusion_matrices(labels, preds, num_classes):
    """(counts, rates): counts[i, j] = images of true class i predicted j; rates = counts / row
    total (the recall of each class on the diagonal; NaN rows: no image of that class)."""
    counts = confusion_matrix(labels, preds, labels=list(range(num_classes)))
    totals = counts.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        rates = np.where(totals > 0, counts / totals, np.nan)
    return counts, rates


def confusion_matrix_png(path, labels, preds, class_names, title=None):
    """confusion_matrix.png: raw counts (left) and row-normalized rates (right)."""
    n = len(class_names)
    counts, rates = confusion_matrices(labels, preds, n)
    side = float(np.clip(n * CELL_INCH, *PANEL_INCH))
    label_inch = 0.08 * max(len(str(c)) for c in class_names) + 0.6  # room for the tick labels
    fig = Figure(figsize=(2 * (side + label_inch + 0.6), side + label_inch + 0.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    annotate = n <= ANNOTATE_MAX_CLASSES
    images = [_draw_matrix(left, counts, class_names, f"counts ({counts.sum()} images)", annotate, lambda v: f"{v:d}"),
              _draw_matrix(right, rates, class_names, "row-normalized (recall on the diagonal)", annotate,
                           lambda v: f"{v:.2f}"[1:] if v < 1 else "1", vmax=1)]
    for ax, image in zip((left, right), images):
        fig.colorbar(image, ax=ax, shrink=0.6, pad=0.01)
    if title:
        fig.suptitle(title, fontsize=TITLE_FONT)
    return _save(fig, path, "confusion_matrix.png")


def task_confusions(labels, preds):
    """{task: (counts matrix, macro F1)} for mask, gender and age, decomposed from 18-class labels."""
    true = np.array([decode_label(x) for x in labels]).reshape(-1, len(TASKS))
    pred = np.array([decode_label(x) for x in preds]).reshape(-1, len(TASKS))
    f1 = task_f1(labels, preds)
    return {task: (confusion_matrix(true[:, i], pred[:, i], labels=list(range(size))), f1[task])
            for i, (task, size) in enumerate(TASKS.items())}


def task_confusion_png(path, labels, preds):
    """confusion_tasks.png: one matrix per task, each cell 'count' over 'row share'."""
    fig = Figure(figsize=(4.4 * len(TASKS), 4.4), layout="constrained")
    for ax, (task, (counts, f1)) in zip(fig.subplots(1, len(TASKS)), task_confusions(labels, preds).items()):
        totals = counts.sum(1, keepdims=True)
        rates = np.divide(counts, totals, out=np.zeros(counts.shape), where=totals > 0)
        _draw_matrix(ax, rates, TASK_NAMES[task], f"{task}: macro F1 {f1:.3f}", False, None, vmax=1)
        for (i, j), count in np.ndenumerate(counts):
            ax.text(j, i, f"{count}\n{rates[i, j]:.0%}", ha="center", va="center", fontsize=FONT,
                    color="white" if rates[i, j] > 0.6 else "black")
        ax.tick_params(labelsize=FONT)
    return _save(fig, path, "confusion_tasks.png")


# ---------------------------------------------------------------- training curves


def curves_png(path, metrics):
    """curves.png from metrics.csv (a path) or its DataFrame: loss, F1, accuracy, learning rate."""
    if not isinstance(metrics, pd.DataFrame):
        if not os.path.isfile(metrics):
            raise UserError(f"metrics file {metrics} not found")
        metrics = pd.read_csv(metrics)
    missing = [c for c in ("epoch", "val_loss", "val_f1") if c not in metrics.columns]
    if missing:
        raise UserError(f"metrics: missing column(s) {', '.join(missing)}; found {', '.join(metrics.columns)}")
    if metrics.empty:
        return _message_figure(path, "curves.png", "no epoch finished yet")
    best = best_epoch(metrics)
    epochs = metrics["epoch"]
    style = {"marker": "o", "markersize": 3} if len(metrics) <= 30 else {}
    fig = Figure(figsize=(12, 7.5), layout="constrained")
    panels = fig.subplots(2, 2, sharex=True).ravel()
    task_columns = [f"val_f1_{t}" for t in TASKS if f"val_f1_{t}" in metrics.columns]
    for ax, name, columns in zip(panels, ("loss", "macro F1", "accuracy", "learning rate"),
                                 (("train_loss", "val_loss"), ("val_f1", *task_columns),
                                  ("train_acc", "val_acc"), ("lr",))):
        for column in columns:
            if column in metrics.columns:
                task = column.startswith("val_f1_")  # per-task F1: thinner, dashed
                ax.plot(epochs, metrics[column], label=column, linewidth=1 if task else 2,
                        linestyle="--" if task else "-", **style)
        ax.axvline(best["epoch"], color="0.4", linestyle=":", linewidth=1)
        ax.set_title(name, fontsize=TITLE_FONT)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=FONT)
        if ax.lines:
            ax.legend(fontsize=FONT)
    f1_ax, lr_ax = panels[1], panels[3]
    f1_ax.plot(best["epoch"], best["val_f1"], "*", color="crimson", markersize=14, zorder=5)
    f1_ax.annotate(f"best epoch {int(best['epoch'])}: {best['val_f1']:.4f}", (best["epoch"], best["val_f1"]),
                   textcoords="offset points", xytext=(0, -16), ha="center", fontsize=FONT, color="crimson")
    if "lr" in metrics.columns and (metrics["lr"] > 0).all():
        lr_ax.set_yscale("log")
    for ax in panels[2:]:
        ax.set_xlabel("epoch", fontsize=FONT)
    return _save(fig, path, "curves.png")


# ---------------------------------------------------------------- image grids
def _denormalize(tensor, mean, std):
    """A normalized CHW tensor -> an HWC float image in [0, 1] for imshow."""
    image = tensor.detach().float().cpu() * torch.tensor(std).view(-1, 1, 1) + torch.tensor(mean).view(-1, 1, 1)
    return image.clamp(0, 1).permute(1, 2, 0).numpy()


def _grid(rows, cols, aspect, extra_inch=0.0):
    """A Figure of rows x cols bare image axes; aspect = image height / width."""
    fig = Figure(figsize=(cols * THUMB_INCH, rows * (THUMB_INCH * aspect + extra_inch)), layout="constrained")
    axes = np.atleast_2d(fig.subplots(rows, cols, squeeze=False))
    for ax in axes.ravel():
        ax.set(xticks=[], yticks=[])  # not set_axis_off(): the row names are y labels
        ax.spines[:].set_visible(False)
    return fig, axes


def _short(path, length=22):
    name = "/".join(os.path.normpath(path).split(os.sep)[-2:])
    return name if len(name) <= length else "..." + name[-length + 3:]


def _prepared(image_paths, regions=None, prepare_to=None):
    """The images as the loaders hand them to the transform (images.ImageDataset.read)."""
    images = [load_image(p, region=None if regions is None else regions[i]) for i, p in enumerate(image_paths)]
    return images if prepare_to is None else [prepare_image(image, prepare_to) for image in images]


def aug_preview_png(path, image_paths, transform, mean, std, mixer=None, n=8, seed=0, draws=AUG_DRAWS,
                    regions=None, prepare_to=None):
    """aug_preview.png: per column one image, resized; below it `draws` passes through the training
    `transform`; with a `mixer`, one more row: the first draws mixed as a batch (lam in the label).
    `prepare_to` (H, W): images are prepared as the training loader does (images.prepare_image).

    Works on copies of `transform` and `mixer`: the training run's random streams are untouched.
    """
    transform = copy.deepcopy(transform)
    seed_transform(transform, seed)
    n = min(n, len(image_paths))
    originals = _prepared(image_paths[:n], regions, prepare_to)
    batches = [torch.stack([transform(image=image)["image"] for image in originals]) for _ in range(draws)]
    height, width = batches[0].shape[-2:]
    rows = [("original", [np.asarray(Image.fromarray(o).resize((width, height))) for o in originals])]
    rows += [(f"draw {d + 1}", [_denormalize(x, mean, std) for x in batch]) for d, batch in enumerate(batches)]
    titles = {}
    if mixer is not None and getattr(mixer, "enabled", True):
        mixer = copy.deepcopy(mixer)
        mixer.prob, mixer.rng = 1.0, np.random.default_rng(seed)  # always mix, reproducibly
        mixed, _, partners, lam = mixer(batches[0], torch.arange(n))
        rows.append((f"mixed, lam {lam:.2f}", [_denormalize(x, mean, std) for x in mixed]))
        titles[len(rows) - 1] = [f"#{i + 1} + #{int(p) + 1}" for i, p in enumerate(partners)]
    fig, axes = _grid(len(rows), n, height / width, extra_inch=0.25)
    for r, (row_name, images) in enumerate(rows):
        axes[r, 0].set_ylabel(row_name, fontsize=FONT)
        for c, image in enumerate(images):
            axes[r, c].imshow(image)
            title = f"#{c + 1} {_short(image_paths[c])}" if r == 0 else titles.get(r, [""] * n)[c]
            axes[r, c].set_title(title, fontsize=SMALL_FONT)
    return _save(fig, path, "aug_preview.png")


def top_mistakes(labels, preds, probs, n):
    """Indices of up to n wrong predictions, the most confident (probability of the predicted class) first."""
    labels, preds, probs = np.asarray(labels), np.asarray(preds), np.asarray(probs)
    wrong = np.flatnonzero(labels != preds)
    confidence = probs[wrong, preds[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:n]


def mistakes_png(path, image_paths, labels, preds, probs, class_names, n=16, regions=None):
    """mistakes.png: the n most confident wrong validation predictions, 'true X / pred Y (p=..)'."""
    assert len(image_paths) == len(labels) == len(preds) == len(probs), "one label, prediction, probs row per image"
    picked = top_mistakes(labels, preds, probs, n)
    if len(picked) == 0:
        return _message_figure(path, "mistakes.png", f"no mistakes among {len(labels)} validation images")
    cols = math.ceil(math.sqrt(len(picked)))
    fig, axes = _grid(math.ceil(len(picked) / cols), cols, 4 / 3, extra_inch=0.35)  # the photos: 3:4 portrait
    for ax, i in zip(axes.ravel(), picked):
        image = Image.fromarray(load_image(image_paths[i], region=None if regions is None else regions[i]))
        image.thumbnail((THUMB_PX, THUMB_PX))
        ax.imshow(image)
        ax.set_title(f"true {class_names[labels[i]]}\npred {class_names[preds[i]]} (p={probs[i][preds[i]]:.2f})",
                     fontsize=SMALL_FONT)
    return _save(fig, path, "mistakes.png")


def captioned_grid_png(path, items, title):
    """An image grid: items are (image path or None, caption); audit.py's suspects.png."""
    if not items:
        return _message_figure(path, "suspects.png", "nothing to show")
    cols = min(len(items), math.ceil(math.sqrt(len(items) * 1.5)))
    fig, axes = _grid(math.ceil(len(items) / cols), cols, 4 / 3, extra_inch=0.45)
    for ax, (image_path, caption) in zip(axes.ravel(), items):
        if image_path is not None and os.path.isfile(image_path):
            image = Image.fromarray(load_image(image_path))
            image.thumbnail((THUMB_PX, THUMB_PX))
            ax.imshow(image)
        ax.set_title(caption, fontsize=SMALL_FONT - 1)
    fig.suptitle(title, fontsize=TITLE_FONT)
    return _save(fig, path, "suspects.png")


def gap_png(path, validation, leaderboard, names, rho=math.nan):
    """Each submission's validation F1 (x) against its leaderboard score (y), the diagonal where
    they would agree and a least-squares line through the points."""
    x, y = np.asarray(validation, dtype=float), np.asarray(leaderboard, dtype=float)
    fig = Figure(figsize=(6, 5), layout="constrained")
    ax = fig.subplots()
    ax.scatter(x, y, color="tab:blue", zorder=3)
    for xi, yi, name in zip(x, y, names):
        ax.annotate(_short(name), (xi, yi), fontsize=SMALL_FONT, xytext=(3, 3), textcoords="offset points")
    low, high = min(x.min(), y.min()), max(x.max(), y.max())
    pad = max(high - low, 0.02) * 0.15
    span = np.array([low - pad, high + pad])
    ax.plot(span, span, color="grey", linestyle="--", linewidth=1, label="leaderboard = validation")
    if len(x) > 1 and np.ptp(x) > 0:
        slope, intercept = np.polyfit(x, y, 1)
        ax.plot(span, slope * span + intercept, color="tab:orange", linewidth=1,
                label=f"fit: {slope:.2f} x validation {intercept:+.3f}")
    ax.set(xlim=span, ylim=span, xlabel="validation macro F1 (out-of-fold where there is one)",
           ylabel="leaderboard score")
    title = f"{len(x)} submissions" + (f", Spearman {rho:+.2f}" if rho == rho else "")
    ax.set_title(title, fontsize=TITLE_FONT)
    ax.legend(fontsize=SMALL_FONT, loc="upper left")
    ax.grid(alpha=0.3)
    return _save(fig, path, "gap.png")


def lr_find_png(path, rates, losses, suggestion):
    """train.py --lr_find: the smoothed loss against the learning rate (log scale), the suggested
    rate (valley) and the steepest descent marked."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    ax.plot(rates, losses, color="tab:blue")
    ax.set_xscale("log")
    for key, colour in (("valley", "tab:red"), ("steepest", "tab:orange")):
        rate = suggestion[key]
        ax.axvline(rate, color=colour, linestyle="--", linewidth=1, label=f"{key}: {rate:.1e}")
    ax.set(xlabel="learning rate", ylabel="training loss (smoothed)")
    ax.set_title("learning-rate finder (the suggested --lr: the valley)", fontsize=TITLE_FONT)
    ax.legend(fontsize=SMALL_FONT)
    ax.grid(alpha=0.3, which="both")
    return _save(fig, path, "lr_find.png")


# ---------------------------------------------------------------- Grad-CAM
@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode inside the block; every submodule's own train/eval flag restored afterwards."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for module, training in modes:
            module.training = training


def _model_name(model):
    return (getattr(model, "pretrained_cfg", None) or {}).get("architecture") or type(model).__name__


def find_cam_layer(model, input_size=(224, 224)):
    """(name, module): the last module holding a Conv2d whose output is a spatial feature map
    (NCHW, h x w > 1, the input's aspect ratio), e.g. ResNet's layer4; None when there is none,
    or when most of the weights come after it (a ViT: its only conv is the patch embedding).
    Runs one forward pass on a blank image of `input_size` (H, W)."""
    clock, starts, ends = itertools.count(), {}, {}  # module name -> when it started / (ended, output shape)

    def watch(name, module):  # hooks must return None: a value would replace the input or output
        def on_start(m, inputs):
            starts.setdefault(name, next(clock))

        def on_end(m, inputs, out):
            ends[name] = (next(clock), getattr(out, "shape", None))
        return [module.register_forward_pre_hook(on_start), module.register_forward_hook(on_end)]
    hooks = [h for name, module in model.named_modules() if name for h in watch(name, module)]
    height, width = input_size
    param = next(model.parameters())
    try:
        with _eval_mode(model), torch.no_grad():
            model(torch.zeros(1, 3, height, width, device=param.device, dtype=param.dtype))
    finally:
        for hook in hooks:
            hook.remove()

    def is_map(shape):  # NCHW with h x w > 1; an NHWC tensor (Swin) fails the aspect test
        return (shape is not None and len(shape) == 4 and shape[2] * shape[3] > 1
                and abs(shape[2] - shape[3] * height / width) <= max(1.0, 0.15 * shape[2]))
    has_conv = {name for name, module in model.named_modules()
                if any(isinstance(m, torch.nn.Conv2d) for m in module.modules())}  # not attention maps
    maps = [(end, name) for name, (end, shape) in ends.items() if name in has_conv and is_map(shape)]
    if not maps:
        return None
    end, name = max(maps)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_params = {id(p) for p in head.parameters()} if isinstance(head, torch.nn.Module) else set()
    after = total = 0
    for module_name, module in model.named_modules():
        size = sum(p.numel() for p in module.parameters(recurse=False) if id(p) not in head_params)
        total += size
        after += size if starts.get(module_name, -1) > end else 0
    if total and after / total > MAX_HEAD_SHARE:
        return None
    return name, model.get_submodule(name)


def gradcam(model, images, layer_name, targets=None):
    """Grad-CAM heat maps (N, H, W) in [0, 1] at the input's size, and the logits.

    targets: a class per image (default: the predicted one). Uses autograd.grad on the hooked
    output, so no parameter's .grad or requires_grad is touched; train/eval modes are restored.
    """
    layer = model.get_submodule(layer_name)
    store = {}
    hook = layer.register_forward_hook(lambda m, i, out: store.__setitem__("maps", out))  # returns None
    try:
        with _eval_mode(model), torch.enable_grad():
            images = images.detach().clone().requires_grad_(True)  # a graph even with frozen weights
            logits = model(images)
            targets = logits.argmax(1) if targets is None else torch.as_tensor(targets, device=logits.device)
            maps = store["maps"]
            grads, = torch.autograd.grad(logits.gather(1, targets.view(-1, 1)).sum(), maps)
    finally:
        hook.remove()
    cams = torch.relu((grads.mean((2, 3), keepdim=True) * maps).sum(1, keepdim=True)).detach().float()
    cams = torch.nn.functional.interpolate(cams, size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    cams = cams - cams.amin((1, 2), keepdim=True)
    cams = cams / cams.amax((1, 2), keepdim=True).clamp_min(1e-7)
    return cams.cpu().numpy(), logits.detach()


def gradcam_png(path, model, image_paths, transform, class_names, labels=None, n=8, device="cpu", regions=None,
                prepare_to=None):
    """gradcam.png: per image, the input and the Grad-CAM of the predicted class over it.

    `transform`: the eval pipeline; with `prepare_to` (H, W) the images are prepared as the
    loaders do, so the input shown is what the model sees. Returns None, with one printed line,
    for a model without a convolutional feature map (e.g. a ViT).
    """
    n = min(n, len(image_paths))
    originals = _prepared(image_paths[:n], regions, prepare_to)
    images = torch.stack([transform(image=image)["image"] for image in originals]).to(device)
    height, width = images.shape[-2:]
    found = find_cam_layer(model, (height, width))
    if found is None:
        print(f"gradcam: {_model_name(model)} has no convolutional feature map before its head; skipped")
        return None
    cams, logits = gradcam(model, images, found[0])
    probs, preds = torch.softmax(logits.float(), 1).cpu(), logits.argmax(1).cpu()
    cols = min(n, 8)
    fig, axes = _grid(2 * math.ceil(n / cols), cols, height / width, extra_inch=0.3)
    for i, original in enumerate(originals):
        top, bottom = axes[2 * (i // cols), i % cols], axes[2 * (i // cols) + 1, i % cols]
        shown = np.asarray(Image.fromarray(original).resize((width, height)))
        top.imshow(shown)
        truth = f"true {class_names[labels[i]]}\n" if labels is not None else ""
        top.set_title(f"{truth}pred {class_names[preds[i]]} (p={probs[i, preds[i]]:.2f})", fontsize=SMALL_FONT)
        bottom.imshow(shown)
        bottom.imshow(cams[i], cmap="jet", alpha=CAM_ALPHA, vmin=0, vmax=1)
    for i in range(n, math.ceil(n / cols) * cols):  # empty slots of the last row pair
        for row in (2 * (i // cols), 2 * (i // cols) + 1):
            axes[row, i % cols].set_visible(False)
    fig.suptitle(f"Grad-CAM of the predicted class at {found[0]}", fontsize=TITLE_FONT)
    return _save(fig, path, "gradcam.png")
