"""Turn run folders into a submission.

With no arguments: the newest run under runs/, the images of data/eval, and
output/submission.csv (info.csv's rows, in info.csv's order, with `ans` filled in).
Everything about the model (architecture, class count, input size, mean/std) comes from the
run's config.json; nothing has to be repeated here.

Several `--model_dir` flags make a soft-voting ensemble (mean of the runs' softmax).
On a plain folder of images (no info.csv) the output has ImageID (path relative to that
folder), ans (class index) and class_name.

Example:
    python inference.py --model_dir runs/exp --model_dir runs/exp2 --answers data/eval/answers.csv
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import os
import time

import numpy as np
import pandas as pd

from augmentation import TTA_VIEWS, eval_transform, parse_tta
from dataset import read_csv_columns, read_eval_csv, read_eval_dir
from ensemble import probs_path_for
from facecrop import FACE_MARGIN, face_regions
from maskcls import cli
from maskcls.atomic import check_outputs, write_csvs
from maskcls.data import store_folder
from maskcls.heldout import BIAS_FILE, apply_bias, load_bias, load_cuts
from maskcls.images import ImageDataset, device_loader, make_loader, open_store
from maskcls.labels import MASK_CLASSES
from maskcls.metrics import macro_f1
from maskcls.predict import expand_runs, load_run, predict_many, refit_runs, run_prepared_size
from maskcls.readers import is_number, labels_in_range, read_config, read_json
from maskcls.runtime import resolve_device, resolve_precision
from maskcls.summary import EVAL_SCORES, SEEDS_FILE
from persons import complete_groups, group_photos, pool, pooled_groups

# Runs with the same preprocessing predict in one pass over the images while their weights
# together stay under this; past it the next pass starts (bounds device memory for big ensembles).
SHARED_WEIGHTS_BYTES = 2 * 2**30


def get_args_parser():
    parser = cli.ArgumentParser(description="Predict with trained run folders and write a submission.",
                                epilog="Every flag also has a kebab-case spelling (--model-dir).")
    parser.add_argument("--data_dir", default=os.path.join("data", "eval"),
                        help="eval folder: info.csv + images/, or any folder of images")
    parser.add_argument("--csv", default=None, metavar="CSV",
                        help="predict the images this CSV lists (a test CSV, a sample submission), relative to "
                             "--data_dir; the output is its rows with ans and class_name")
    parser.add_argument("--image_col", default=None, help="with --csv: the image column, name or 0-based index "
                                                          "(default: the first)")
    parser.add_argument("--model_dir", action="append", default=None, metavar="RUN",
                        help="a run folder; repeat for an ensemble (default: the newest run under --runs)")
    parser.add_argument("--recipe", default=None, metavar="JSON",
                        help="an ensemble recipe from ensemble.py --fit: its members with their weights")
    parser.add_argument("--runs", default="runs", help="where to look for the newest run")
    parser.add_argument("--checkpoint", default="best.pth",
                        help="which checkpoint of each run folder (refit: the run's full-data refit, train.py --refit)")
    parser.add_argument("--output", default=os.path.join("output", "submission.csv"), help="the submission to write")
    parser.add_argument("--output_dir", default=None, metavar="DIR",
                        help="the public baseline's flag: write DIR/submission.csv (DIR/<name> with --output)")
    cli.bool_flag(parser, "--overwrite", help="replace an existing output file (off: refuse)")
    parser.add_argument("--answers", default=None, metavar="CSV",
                        help="true labels (ImageID,ans): print accuracy and macro F1")
    parser.add_argument("--tta", default="none", metavar="VIEWS",
                        help=f"average the softmax over the image and these views, e.g. "
                             f"hflip,zoom,scale0.9,scale1.15_hflip "
                             f"(scale<f> for f in 0.5-2, scale<f>_hflip, or {TTA_VIEWS.help()})")
    cli.words_flag(parser, "--tta_weights", parse=cli.parse_floats, default=None, metavar="W0,W1,...",
                   help="the weight of each prediction in the TTA average, the original image's first (default: "
                        "equal), e.g. --tta scale0.9,scale1.15 --tta_weights 2,1,1")
    cli.bool_flag(parser, "--save_probs", help="also write per-class probabilities to <output>_probs.csv "
                                               "(the input of ensemble.py and --pseudo_labels)")
    cli.bool_flag(parser, "--person_pool", help="group the photos into persons by their content (7 each) and pool "
                                                "gender and age within a group; mask stays per photo")
    parser.add_argument("--photos_per_person", type=cli.positive_int, default=7,
                        help="with --person_pool: photos per person (groups = images / this)")
    cli.bool_flag(parser, "--no_bias", help=f"ignore the run's {BIAS_FILE} (the per-class offsets tune_bias.py "
                                            f"fitted for macro F1)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: bf16 where the CPU/GPU has native bf16, fp16 on older GPUs, else fp32")
    cli.bool_flag(parser, "--channels_last", default=None, help="NHWC memory format (default: on with bf16/fp16)")
    parser.add_argument("--batch_size", "-b", type=cli.positive_int, default=128, help="images per batch")
    parser.add_argument("--num_workers", "--workers", "-j", type=cli.number(int, 0), default=min(4, os.cpu_count() or 1),
                        help="DataLoader worker processes (0: load in the main process)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: CUDA where there is a GPU")
    cli.bool_flag(parser, "--prefetcher", default=True,
                  help="timm's prefetcher: the loader workers hand over uint8 batches, normalized on the device "
                       "(the GPU, or the main process on a CPU)")
    parser.add_argument("--cache_dir", default="auto", metavar="DIR",
                        help="prepared images kept across inferences and ensembles (auto: <data_dir>/.prepared_cache; "
                             "none: off)")
    return parser


def newest_run(runs_root, checkpoint):
    """The run folder under `runs_root` (a k-fold parent counts as one) finished last."""
    candidates = []
    if os.path.isdir(runs_root):
        for entry in os.scandir(runs_root):
            done = [os.path.join(entry.path, name) for name in (checkpoint, "kfold.json", SEEDS_FILE)]
            done = [p for p in done if os.path.isfile(p)]
            if entry.is_dir() and done and os.path.isfile(os.path.join(entry.path, "config.json")):
                candidates.append((max(map(os.path.getmtime, done)), entry.path))
    if not candidates:
        raise cli.UserError(f"no trained run (config.json + {checkpoint}) under {runs_root}/: "
                            f"train one first (python train.py) or pass --model_dir")
    return max(candidates)[1]


def read_recipe(path):
    """(members, weights) of an ensemble.py --fit recipe. Members are stored relative to the
    recipe's folder (recipes from before that: to where --fit ran, tried second); each weight a
    finite positive number."""
    if not os.path.isfile(path):
        raise cli.UserError(f"recipe {path} not found")
    recipe = read_json(path, "an ensemble recipe from ensemble.py --fit")
    members, weights = recipe.get("members"), recipe.get("weights")
    if not (isinstance(members, list) and members and all(isinstance(m, str) and m for m in members)):
        raise cli.UserError(f"{path}: members is {members!r}; expected a list of run folders "
                            f"(write one with ensemble.py --fit)")
    if not (isinstance(weights, list) and len(weights) == len(members)):
        raise cli.UserError(f"{path}: expected one weight per member ({len(members)}), found {weights!r}")
    bad = [w for w in weights if not (is_number(w) and w > 0)]
    if bad:
        raise cli.UserError(f"{path}: weight {bad[0]!r} is not a finite positive number")
    return [recipe_member(path, m) for m in members], [float(w) for w in weights]


def recipe_member(recipe_path, member):
    """A recipe member's run folder: relative to the recipe's own folder, else (older recipes)
    to the working folder."""
    if os.path.isabs(member):
        return member
    beside = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(recipe_path)), member))
    if os.path.isdir(beside) or not os.path.isdir(member):
        return beside
    return member


def report_age_cuts(run_dirs, configs):
    """One line per age cut file the runs use (--age_head regression)."""
    seen = set()
    for run_dir, config in zip(run_dirs, configs):
        if config.get("age_head") == "regression":
            cuts, width, path = load_cuts(run_dir)
            if path not in seen:
                seen.add(path)
                print(f"age bands of {run_dir} from its regressed age: cut points {cuts[0]:g}, {cuts[1]:g}, width "
                      f"{width:g} years ({path or 'training defaults: no age_cuts.json'})")


def preprocessing(config):
    """What a run does to an image before its model sees it: runs that agree can share one
    decoding pass (the folds of a k-fold run always do)."""
    facecrop = bool(config.get("facecrop"))
    return (tuple(config["input_size"]), run_prepared_size(config), tuple(config["mean"]), tuple(config["std"]),
            facecrop, config.get("face_margin", FACE_MARGIN) if facecrop else None)


def weight_bytes(model):
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def ensemble_probs(run_dirs, configs, checkpoint, paths, views, batch_size, num_workers, device, precision,
                   weights=None, store=None, prefetcher=False):
    """The (weighted) mean of the runs' softmax probabilities on `paths` (float64), the prepared
    images read from `store` (images.PreparedStore) where it holds them; with `prefetcher`, the
    workers hand over uint8 batches normalized on the device (images.DeviceLoader).

    Each run gets its own input size, normalization and face crop from its config. Runs whose
    preprocessing agrees share one pass over the images: each batch is decoded once and goes
    through all their models (held together while their weights stay under SHARED_WEIGHTS_BYTES;
    past that, another pass).
    """
    weights = list(weights or [1.0] * len(run_dirs))
    groups = {}
    for k, (run_dir, config) in enumerate(zip(run_dirs, configs)):
        groups.setdefault(preprocessing(config), []).append((k, run_dir, config))
    total = np.zeros((len(paths), len(configs[0]["classes"])), dtype=np.float64)
    for members in groups.values():
        config = members[0][2]
        size = tuple(config["input_size"])
        regions = None
        if config.get("facecrop"):
            regions = face_regions(paths, os.path.commonpath([os.path.dirname(p) for p in paths]),
                                   config.get("face_margin", FACE_MARGIN))
        transform = eval_transform(size, config["mean"], config["std"])
        dataset = ImageDataset(paths, [-1] * len(paths), transform, prepare_to=run_prepared_size(config),
                               regions=regions, store=store)
        loader = make_loader(dataset, batch_size, num_workers, device)
        if prefetcher:
            loader = device_loader(loader, transform, device)
        models, held = [], 0
        for i, (k, run_dir, run_config) in enumerate(members):
            models.append((k, run_dir, precision.model(load_run(run_dir, run_config, checkpoint, device))))
            held += weight_bytes(models[-1][2])
            if i + 1 == len(members) or held >= SHARED_WEIGHTS_BYTES:
                short = "+".join(os.path.basename(os.path.normpath(d)) for _, d, _ in models)
                outs = predict_many([m for _, _, m in models], loader, device, precision, views, desc=short)
                for (index, _, _), probs in zip(models, outs):
                    total += weights[index] * probs
                models, held = [], 0
    return total / sum(weights)


def score(answers_path, image_ids, preds, num_classes):
    """Accuracy and macro F1 against a CSV of true labels (ImageID,ans)."""
    table = read_csv_columns(answers_path, ("ImageID", "ans"))
    twice = table["ImageID"][table["ImageID"].duplicated()]
    if len(twice):
        raise cli.UserError(f"{answers_path}: ImageID {twice.iloc[0]!r} appears twice")
    answers = pd.Series(labels_in_range(answers_path, table, "ans", num_classes, id_column="ImageID"),
                        index=table["ImageID"])
    missing = [i for i in image_ids if i not in answers.index]
    if missing:
        raise cli.UserError(f"{answers_path} has no answer for {len(missing)} image(s), first {missing[0]}")
    truth = answers.loc[image_ids].to_numpy()
    return float((truth == preds).mean()), macro_f1(truth, preds, num_classes)


def person_pooled(probs, paths, per_person):
    """--person_pool: gender and age pooled within the content groups that hold one person's mask states."""
    groups = complete_groups(group_photos(paths, per_person), probs, per_person)
    sizes = np.bincount(groups)
    print(f"person pool: {len(paths)} photos, {pooled_groups(groups)} groups of one person's {per_person} mask "
          f"states pooled ({len(paths) - int(sizes[sizes > 1].sum())} photos left as they were)")
    return pool(probs, groups)


def maybe_bias(probs, given, classes, off):
    """Apply the bias.json of the one run folder given (a k-fold parent's applies to its folds'
    mean); an ensemble of several runs gets none (its members' biases were fitted apart)."""
    found = [run for run in given if os.path.isfile(os.path.join(run, BIAS_FILE))]
    if not found:
        return probs
    if off:  # not even read: a broken file the user asked to ignore stays ignored
        print(f"per-class bias of {', '.join(found)} not applied (--no_bias)")
        return probs
    if len(given) > 1:
        print(f"per-class bias of {', '.join(found)} not applied: it was fitted for one run, "
              f"not for this ensemble of {len(given)}")
        return probs
    run = found[0]
    bias, saved = load_bias(run, classes)
    print(f"applying the per-class bias of {os.path.join(run, BIAS_FILE)} (cross-fitted macro F1 "
          f"{saved.get('f1_before', float('nan')):.4f} -> {saved.get('f1_cross_fitted', float('nan')):.4f} on "
          f"{saved.get('fitted_on', '?')}; --no_bias: off)")
    return apply_bias(probs, bias)


def chosen_runs(args):
    """(the run folders given, the checkpoint each model loads, the models' run folders, their
    weights, their configs): --model_dir, a --recipe, or the newest run; with --checkpoint refit
    each run's full-data refit in its place. Every config read and checked before any work."""
    if args.recipe and args.model_dir:
        raise cli.UserError("--recipe names its own runs: give it or --model_dir, not both")
    refit = args.checkpoint == "refit"
    checkpoint = "best.pth" if refit else args.checkpoint  # a refit's model is its best.pth
    if args.recipe:
        given, weights = read_recipe(args.recipe)
    else:
        given, weights = args.model_dir or [newest_run(args.runs, checkpoint)], None
    members = refit_runs(given) if refit else given
    if weights is not None and len(members) != len(weights):
        raise cli.UserError("--checkpoint refit with --recipe: a recipe of seed groups has one refit per seed; "
                            "list the seeds' runs in the recipe")
    run_dirs, run_weights = expand_runs(members, weights)
    configs = [read_config(r) for r in run_dirs]
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        if config["classes"] != configs[0]["classes"]:
            raise cli.UserError(f"cannot ensemble {run_dirs[0]} and {run_dir}: their classes differ")
    return given, checkpoint, run_dirs, run_weights, configs


def main(args):
    device = resolve_device(args.device)
    views = parse_tta(args.tta, args.tta_weights)
    if args.output_dir:
        args.output = os.path.join(args.output_dir, os.path.basename(args.output))
    outputs = [args.output] + ([probs_path_for(args.output)] if args.save_probs else [])
    check_outputs(outputs, overwrite=args.overwrite)
    given, checkpoint, run_dirs, run_weights, configs = chosen_runs(args)
    classes = configs[0]["classes"]
    if args.person_pool and classes != MASK_CLASSES:
        raise cli.UserError("--person_pool needs the competition's 18 classes (mask x gender x age band)")
    # checks every image exists
    eval_set = read_eval_csv(args.data_dir, args.csv, args.image_col) if args.csv else read_eval_dir(args.data_dir)
    largest = max((tuple(c["input_size"]) for c in configs), key=lambda size: size[0] * size[1])
    precision = resolve_precision(args.precision, device, args.channels_last, largest)
    report_age_cuts(run_dirs, configs)
    store = open_store(store_folder(args.cache_dir, args.data_dir), len(eval_set.paths),
                       max((run_prepared_size(c) for c in configs), key=lambda s: s[0] * s[1]))
    probs = ensemble_probs(run_dirs, configs, checkpoint, eval_set.paths, views, args.batch_size,
                           args.num_workers, device, precision, run_weights, store,
                           args.prefetcher)
    if args.person_pool:
        probs = person_pooled(probs, eval_set.paths, args.photos_per_person)
    probs = maybe_bias(probs, given, classes, args.no_bias)
    preds = probs.argmax(1)
    assert preds.min() >= 0 and preds.max() < len(classes), "prediction outside the class range"

    if eval_set.info is not None:
        submission = eval_set.info.copy()
        submission["ans"] = preds
        if args.csv:  # a CSV of image names: the class name beside its index
            submission["class_name"] = [classes[p] for p in preds]
    else:
        submission = pd.DataFrame({"ImageID": eval_set.image_ids, "ans": preds,
                                   "class_name": [classes[p] for p in preds]})
    assert len(submission) == len(eval_set.image_ids), "one row per image"
    tables = [submission]
    if args.save_probs:
        tables.append(pd.DataFrame(probs.round(6), columns=classes).assign(ImageID=eval_set.image_ids)
                      [["ImageID", *classes]])
    write_csvs(tables, outputs, args.overwrite)  # the submission and its probabilities: both or neither
    print(f"wrote {args.output}: {len(submission)} rows from {', '.join(run_dirs)}"
          f"{' with TTA ' + args.tta if views else ''}")
    if args.save_probs:
        print(f"wrote {outputs[1]}: per-class probabilities")
    if args.answers:
        acc, f1 = score(args.answers, eval_set.image_ids, preds, len(classes))
        print(f"accuracy {acc:.4f}  macro F1 {f1:.4f}  ({len(preds)} images, {args.answers})")
        if len(given) == 1:  # one run (or one k-fold run, one seed group): runs.py compare shows it
            record_eval_score(given[0], args, acc, f1, len(preds))
    return args.output


def record_eval_score(run_dir, args, accuracy, f1, images):
    """A row of RUN/eval_scores.csv: how this inference scored against known answers."""
    path = os.path.join(run_dir, EVAL_SCORES)
    row = {"time": time.strftime("%Y-%m-%d %H:%M:%S"), "data_dir": args.data_dir, "answers": args.answers,
           "checkpoint": args.checkpoint, "tta": args.tta,
           "tta_weights": ",".join(f"{w:g}" for w in args.tta_weights) if args.tta_weights else "",
           "person_pool": args.person_pool,
           "bias": not args.no_bias, "images": images, "accuracy": round(accuracy, 6), "macro_f1": round(f1, 6)}
    try:
        earlier = pd.read_csv(path) if os.path.isfile(path) else pd.DataFrame()
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
        print(f"note: {path} was damaged; it starts again with this score")
        earlier = pd.DataFrame()
    try:
        write_csvs([pd.concat([earlier, pd.DataFrame([row])], ignore_index=True)], [path])
    except (OSError, cli.UserError) as err:  # the submission is written; the record is a convenience
        print(f"note: could not record the score in {path}: {err}")


if __name__ == "__main__":
    cli.run(main, get_args_parser)
