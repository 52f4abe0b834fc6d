"""Re-score a trained run: on its own validation split (split.csv), or on other labelled data.

    python validate.py runs/exp                            # its validation side, as training scored it
    python validate.py runs/kf                             # a k-fold run: each fold on its own held-out side
    python validate.py runs/exp --data_dir data/more/train # any labelled folder (competition layout or classes)
    python validate.py runs/exp --data_dir data/eval --answers data/eval/answers.csv
    python validate.py runs/exp --tta hflip --checkpoint averaged.pth

Prints accuracy, macro F1 and the most-confused class pairs, and writes to RUN/validate/ (or
--output_dir): report.txt (scikit-learn's per-class precision / recall / F1 table and the
confused pairs), per_class.csv, confused_pairs.csv, confusion_matrix.png and (competition
layout) confusion_tasks.png. On the run's own split with its checkpoint, precision, batch size
and validation TTA, the macro F1 is the run's best val F1 (it says so, or by how much it
differs).
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import os

import numpy as np
import pandas as pd

from augmentation import TTA_VIEWS, eval_transform, parse_tta
from dataset import DATASETS, read_csv_columns, read_eval_dir, resolve_train_dir
from facecrop import FACE_MARGIN, face_regions
from maskcls import cli
from maskcls.atomic import check_outputs, replacing, write_csvs
from maskcls.heldout import load_cuts
from maskcls.images import ImageDataset, make_loader
from maskcls.labels import MASK_CLASSES
from maskcls.metrics import macro_f1
from maskcls.predict import predict, run_prepared_size
from maskcls.readers import labels_in_range, member_dirs, read_config, read_json
from maskcls.runtime import resolve_device, resolve_precision
from model import build_from_config, load_state, load_weights, read_checkpoint, set_age_cuts

TOP_PAIRS = 10  # most-confused class pairs printed


def get_args_parser():
    parser = cli.ArgumentParser(description="Re-score a run on its validation split or on labelled data.",
                                epilog="Every flag also has a kebab-case spelling (--data-dir).")
    parser.add_argument("run", metavar="RUN", help="a run folder (a k-fold parent: each fold on its own split)")
    parser.add_argument("--data_dir", default=None,
                        help="labelled images instead of the run's validation split: a training folder "
                             "(train.csv + images/, or a folder per class), or an eval folder with --answers")
    parser.add_argument("--answers", default=None, metavar="CSV", help="with an eval --data_dir: its labels")
    parser.add_argument("--checkpoint", default="best.pth", help="which checkpoint of the run")
    cli.bool_flag(parser, "--use_ema", help="score the EMA weights last.pth keeps (a run trained with --ema)")
    parser.add_argument("--tta", default=None, metavar="VIEWS",
                        help=f"test-time views (scale<f> for f in 0.5-2, scale<f>_hflip, or {TTA_VIEWS.help()}); "
                             f"default: the run's --val_tta")
    cli.words_flag(parser, "--tta_weights", parse=cli.parse_floats, default=None, metavar="W0,W1,...",
                   help="the weight of each prediction in the TTA average, the original image's first (default: equal)")
    parser.add_argument("--output_dir", default=None, metavar="DIR", help="where to write (default: RUN/validate)")
    cli.bool_flag(parser, "--overwrite", help="replace an earlier report")
    parser.add_argument("--batch_size", "-b", type=cli.positive_int, default=None,
                        help="images per batch (default: the run's --valid_batch_size)")
    parser.add_argument("--num_workers", "--workers", "-j", type=cli.number(int, 0),
                        default=min(4, os.cpu_count() or 1), help="DataLoader worker processes")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA where there is a GPU")
    return parser


# ---------------------------------------------------------------- the images to score
def own_split(run_dir, config):
    """(full paths, labels) of the validation side a run trained beside, in split.csv's order."""
    split_path = os.path.join(run_dir, "split.csv")
    split = read_csv_columns(split_path, ("path", "side"))
    source = DATASETS.build(config["dataset"], config["data_dir"], val_ratio=config.get("val_ratio", 0.2),
                            seed=config.get("seed", 42), relabel=config.get("relabel"),
                            **DATASETS.values_for(config["dataset"], config, os.path.join(run_dir, "config.json")))
    label_of = {s.path: s.label for s in source.samples}
    val = split.loc[split["side"] == "val", "path"].tolist()
    if not val:
        raise cli.UserError(f"{run_dir} has no validation side (--val_ratio 0): give --data_dir LABELLED")
    missing = [p for p in val if p not in label_of]
    if missing:
        raise cli.UserError(f"{split_path}: {missing[0]!r} is not in {config['data_dir']} any more")
    return source.root, [os.path.join(source.root, p) for p in val], [label_of[p] for p in val]


def labelled_data(data_dir, answers, config):
    """(root, full paths, labels) of --data_dir: an eval folder with --answers, or a training folder
    read by the run's dataset entry (its classes must be the run's)."""
    if answers:
        eval_set = read_eval_dir(data_dir)
        table = read_csv_columns(answers, ("ImageID", "ans"))
        truth = dict(zip(table["ImageID"], labels_in_range(answers, table, "ans", len(config["classes"]),
                                                          id_column="ImageID")))
        missing = [i for i in eval_set.image_ids if i not in truth]
        if missing:
            raise cli.UserError(f"{answers} has no answer for {len(missing)} image(s), first {missing[0]}")
        return os.path.normpath(data_dir), eval_set.paths, [int(truth[i]) for i in eval_set.image_ids]
    source = DATASETS.build(config["dataset"], resolve_train_dir(data_dir))
    if source.classes != config["classes"]:
        raise cli.UserError(f"{data_dir} has other classes than the run ({len(source.classes)} vs "
                            f"{len(config['classes'])}): validate on data of the same classes")
    return source.root, source.all_paths(), [s.label for s in source.samples]


# ---------------------------------------------------------------- predicting as training validated
def load_model(run_dir, config, checkpoint, use_ema, device):
    model = build_from_config(config, source=os.path.join(run_dir, "config.json"))
    if use_ema:
        path = os.path.join(run_dir, "last.pth")
        saved = read_checkpoint(path).get("ema")
        if saved is None:
            raise cli.UserError(f"{path} holds no EMA weights: the run was trained without --ema")
        load_state(model, saved, path, config["model"])
    else:
        load_weights(model, os.path.join(run_dir, checkpoint), config["model"])
    if config.get("age_head") == "regression":
        set_age_cuts(model, *load_cuts(run_dir)[:2])
    return model.to(device).eval()


def score_images(run_dir, config, root, paths, args, device):
    """Probabilities of the run's model on `paths`, prepared, normalized, cropped, batched and at
    the precision its validation used."""
    precision = resolve_precision(config.get("precision", "fp32"), device, config.get("channels_last", False))
    views = parse_tta(args.tta if args.tta is not None else config.get("val_tta", "none"), args.tta_weights)
    size = tuple(config["input_size"])
    regions = face_regions(paths, root, config.get("face_margin", FACE_MARGIN)) if config.get("facecrop") else None
    dataset = ImageDataset(paths, [-1] * len(paths), eval_transform(size, config["mean"], config["std"]),
                           prepare_to=run_prepared_size(config), regions=regions)
    loader = make_loader(dataset, args.batch_size or config.get("valid_batch_size", 128), args.num_workers, device)
    model = precision.model(load_model(run_dir, config, args.checkpoint, args.use_ema, device))
    return predict(model, loader, device, precision, views, desc=os.path.basename(os.path.normpath(run_dir)))


# ---------------------------------------------------------------- the report
def confused_pairs(labels, preds, classes, top=TOP_PAIRS):
    """The most frequent (true, predicted) pairs among the mistakes, with their share of the true class."""
    n = len(classes)
    confusion = np.bincount(np.asarray(labels) * n + np.asarray(preds), minlength=n * n).reshape(n, n)
    support = confusion.sum(1)
    pairs = [(int(confusion[t, p]), t, p) for t in range(n) for p in range(n) if t != p and confusion[t, p]]
    pairs.sort(key=lambda item: (-item[0], item[1], item[2]))
    return pd.DataFrame([{"true": classes[t], "predicted": classes[p], "images": c,
                          "share_of_true": round(c / support[t], 4)} for c, t, p in pairs[:top]],
                        columns=["true", "predicted", "images", "share_of_true"])


def report(labels, preds, classes):
    """(text report, per-class table): scikit-learn's classification report over every class."""
    from sklearn.metrics import classification_report
    kwargs = dict(labels=list(range(len(classes))), target_names=[str(c) for c in classes], zero_division=0, digits=4)
    table = pd.DataFrame(classification_report(labels, preds, output_dict=True, **kwargs)).T
    per_class = table.loc[[str(c) for c in classes]].reset_index(names="class")
    per_class["support"] = per_class["support"].astype(int)
    return classification_report(labels, preds, **kwargs), per_class.round(4)


def recorded_f1(run_dir, members, args):
    """(the F1 the run recorded, what it is) where this re-scoring should reproduce it: a single
    run's best val F1 (best.pth keeps it unrounded), a k-fold run's out-of-fold F1 (kfold.json);
    None for other data, another checkpoint, TTA or weights, or fitted age cut points (the run
    validated at 30, 60; this uses the fitted ones, as inference does)."""
    if args.data_dir or args.tta is not None or args.use_ema or args.checkpoint != "best.pth":
        return None
    if any(read_config(m).get("age_head") == "regression" and load_cuts(m)[2] is not None for m in members):
        return None
    if members == [run_dir]:
        saved = read_checkpoint(os.path.join(run_dir, "best.pth"))
        score = saved.get("val_f1")
        return (float(score), f"best val F1 (epoch {saved.get('epoch')})") if score == score and score is not None \
            else None
    path = os.path.join(run_dir, "kfold.json")
    if not os.path.isfile(path) or len(members) != len(read_json(path, "a k-fold summary").get("fold_dirs", [])):
        return None
    return float(read_json(path, "a k-fold summary")["oof_f1"]), "out-of-fold F1 (kfold.json)"


def main(args):
    config = read_config(args.run)
    members = [os.path.join(args.run, d) for d in member_dirs(config, os.path.join(args.run, "config.json"))]
    if config.get("seed_dirs"):
        raise cli.UserError(f"{args.run} is a seed group: validate one of its runs ({', '.join(members)})")
    members = members or [args.run]
    out = args.output_dir or os.path.join(args.run, "validate")
    names = ("report.txt", "per_class.csv", "confused_pairs.csv", "confusion_matrix.png", "confusion_tasks.png")
    outputs = [os.path.join(out, name) for name in names]
    check_outputs(outputs, overwrite=args.overwrite)
    device = resolve_device(args.device)
    labels, preds, classes = [], [], None
    for member in members:
        member_config = read_config(member)
        classes = member_config["classes"]
        root, paths, truth = (labelled_data(args.data_dir, args.answers, member_config) if args.data_dir
                              else own_split(member, member_config))
        probs = score_images(member, member_config, root, paths, args, device)
        labels += list(truth)
        preds += probs.argmax(1).tolist()
        if args.data_dir:
            break  # the same images: one member's model (a k-fold parent's first fold) is not an ensemble
    finish(args, members, config, classes, np.array(labels), np.array(preds), outputs)


def finish(args, members, config, classes, labels, preds, outputs):
    f1, accuracy = macro_f1(labels, preds, len(classes)), float((labels == preds).mean())
    text, per_class = report(labels, preds, classes)
    pairs = confused_pairs(labels, preds, classes)
    where = args.data_dir or ("each fold's own validation side" if len(members) > 1 else "its validation side")
    lines = [f"{args.run} on {where}: {len(labels)} images, accuracy {accuracy:.4f}, macro F1 {f1:.4f}"]
    expected = recorded_f1(args.run, members, args)
    if expected is not None:
        lines.append(f"the run's {expected[1]}: {expected[0]:.6f}, "
                     f"{'reproduced exactly' if expected[0] == f1 else f'this differs by {f1 - expected[0]:+.6f}'}")
    lines.append("most confused (true -> predicted, images, share of the true class):")
    lines += [f"  {r.true} -> {r.predicted}: {r.images} ({r.share_of_true:.1%})" for r in pairs.itertuples()]
    print("\n".join(lines))
    os.makedirs(os.path.dirname(os.path.abspath(outputs[0])), exist_ok=True)
    head = 2 if expected is not None else 1  # the scores, then scikit-learn's table, then the pairs
    with replacing(outputs[0]) as tmp, open(tmp, "w") as f:
        f.write("\n".join(lines[:head]) + "\n\n" + text + "\n" + "\n".join(lines[head:]) + "\n")
    write_csvs([per_class, pairs], outputs[1:3], overwrite=True)
    from maskcls import plots  # matplotlib only when there is a figure to draw
    plots.confusion_matrix_png(outputs[3], labels, preds, classes, title=f"{os.path.basename(args.run)}: {f1:.4f}")
    if list(classes) == MASK_CLASSES:
        plots.task_confusion_png(outputs[4], labels, preds)
    print(f"wrote {os.path.dirname(outputs[0])}/: report.txt, per_class.csv, confused_pairs.csv, "
          f"confusion_matrix.png{', confusion_tasks.png' if list(classes) == MASK_CLASSES else ''}")
    return f1


if __name__ == "__main__":
    cli.run(main, get_args_parser)
