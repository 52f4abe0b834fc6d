"""Rank a run's training images by how likely their label is wrong, and draft the fixes.

Reads the run's held-out predictions (oof.csv of a --kfold run: every training image, each
predicted by a model that never saw it; val_predictions.csv of a single run: its validation
side only). In the competition layout a label has three parts, and each is checked where it lives:
- gender and age band belong to the PERSON: all 7 photos must agree. The person's photos'
  probabilities are pooled (mean), and the labelled gender / age band is scored by the pooled
  probability: a person whose photos all say "female" while train.csv says male ranks high.
- the mask state belongs to the IMAGE (swapped incorrect_mask/normal files are the known case):
  scored by that image's probability of its labelled mask state.
A suspect's score is -log(probability of the labelled value): one ranking over persons and
images. Other layouts (ImageFolder) are ranked per image by -log p(label).

Writes RUN/audit/: suspects.csv (rank, kind, path, labelled, suggested, score, p_labelled),
fixes.csv (a DRAFT in --relabel's format for the top --top suspects: review it, delete the rows
that are right, then `python train.py --relabel RUN/audit/fixes.csv`) and suspects.png (the
top suspects' photos with their paths, labelled and suggested values).

Example: python audit.py runs/kf --top 40
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import os
import shutil

import numpy as np
import pandas as pd

from maskcls import cli
from maskcls.atomic import check_outputs, write_csvs
from maskcls.heldout import read_heldout, training_root
from maskcls.labels import AGE_NAMES, GENDER_NAMES, MASK_CLASSES, MASK_NAMES, TASKS, decode_label, task_marginals
from maskcls.readers import data_path

TYPICAL_AGE = (25, 45, 60)  # years written for a suggested age band in the draft (review them)
GENDER_WORDS = ("male", "female")
CAPTION_CHARS = 30  # a path in the picture's captions is cut to its last characters


def get_args_parser():
    parser = cli.ArgumentParser(description="Rank training images by how likely their label is wrong; "
                                            "draft fixes in --relabel's format.",
                                epilog="Every flag also has a kebab-case spelling (--data-dir).")
    parser.add_argument("run", metavar="RUN", help="a run folder with oof.csv (--kfold) or val_predictions.csv")
    parser.add_argument("--top", type=cli.positive_int, default=30, help="suspects in fixes.csv and the picture")
    parser.add_argument("--data_dir", default=None,
                        help="the training folder the run's paths refer to (default: the run's config.json)")
    parser.add_argument("--output_dir", default=None, metavar="DIR", help="where to write (default: RUN/audit)")
    parser.add_argument("--planted", default=None, metavar="CSV",
                        help="label_noise.csv of make_sample_data.py --difficulty real: say how many of its "
                             "wrong labels are among the top suspects")
    cli.bool_flag(parser, "--overwrite", help="replace an earlier audit's files")
    return parser


def _score(p):
    return -np.log(np.clip(p, 1e-9, None))


def person_suspects(held):
    """One row per person and task (gender, age): the pooled probability of the labelled value."""
    rows = []
    frame = pd.DataFrame({"person": held.persons, "i": np.arange(len(held.persons))})
    marginals = task_marginals(held.probs)
    for task, names in (("gender", GENDER_NAMES), ("age", AGE_NAMES)):
        index = list(TASKS).index(task)
        probs = marginals[index]
        labelled = np.array([decode_label(y)[index] for y in held.labels])
        for person, members in frame.groupby("person")["i"]:
            members = members.to_numpy()
            pooled = probs[members].mean(0)
            value = int(np.bincount(labelled[members]).argmax())  # persons carry one value; the majority if not
            rows.append({"kind": task, "path": person, "person": person, "labelled": names[value],
                         "suggested": names[int(pooled.argmax())], "p_labelled": pooled[value],
                         "photos": len(members)})
    return rows


def image_suspects(held):
    """One row per image: the mask state (competition layout) or the whole label (other layouts)."""
    rows = []
    mask_scheme = held.classes == MASK_CLASSES
    probs = task_marginals(held.probs)[0] if mask_scheme else held.probs
    for i, (path, label) in enumerate(zip(held.paths, held.labels)):
        value = decode_label(label)[0] if mask_scheme else int(label)
        names = MASK_NAMES if mask_scheme else held.classes
        rows.append({"kind": "mask" if mask_scheme else "label", "path": path, "person": held.persons[i],
                     "labelled": names[value], "suggested": names[int(probs[i].argmax())],
                     "p_labelled": probs[i, value], "photos": 1})
    return rows


def rank_suspects(held):
    """All suspects (persons' gender and age, images' mask state), the most suspicious first."""
    rows = image_suspects(held)
    if held.classes == MASK_CLASSES and (held.persons != "").all():
        rows += person_suspects(held)
    table = pd.DataFrame(rows)
    table["score"] = _score(table["p_labelled"].to_numpy())
    table = table.sort_values(["score", "path"], ascending=[False, True], kind="stable").reset_index(drop=True)
    table.insert(0, "rank", np.arange(1, len(table) + 1))
    return table[["rank", "kind", "path", "person", "labelled", "suggested", "score", "p_labelled", "photos"]]


def draft_fixes(suspects, top):
    """The top suspects whose suggested value differs, as --relabel rows (path + one changed column)."""
    rows = []
    for s in suspects[suspects["labelled"] != suspects["suggested"]].head(top).itertuples():
        row = {"path": s.path[len("images/"):] if s.path.startswith("images/") else s.path,
               "gender": "", "age": "", "mask": "", "reason": f"{s.kind}: labelled {s.labelled}, "
                                                              f"held-out prediction {s.suggested} "
                                                              f"(p of the label {s.p_labelled:.3f})"}
        if s.kind == "gender":
            row["gender"] = GENDER_WORDS[GENDER_NAMES.index(s.suggested)]
        elif s.kind == "age":
            row["age"] = TYPICAL_AGE[AGE_NAMES.index(s.suggested)]
        elif s.kind == "mask":
            row["mask"] = s.suggested
        else:
            continue  # other layouts: no --relabel
        rows.append(row)
    return pd.DataFrame(rows, columns=["path", "gender", "age", "mask", "reason"])


def suspect_images(suspects, root, top):
    """(image path, caption) for the top suspects: a person shows its first photo."""
    shown = []
    for s in suspects.head(top).itertuples():
        if s.kind in ("gender", "age"):
            folder = os.path.join(root, "images", s.path)
            names = sorted(n for n in os.listdir(folder) if not n.startswith(".")) if os.path.isdir(folder) else []
            path = os.path.join(folder, names[0]) if names else None
        else:
            path = os.path.join(root, s.path)
        name = s.path[len("images/"):] if s.path.startswith("images/") else s.path
        name = name if len(name) <= CAPTION_CHARS else "..." + name[-CAPTION_CHARS + 3:]
        shown.append((path, f"#{s.rank} {s.kind}: {s.labelled} -> {s.suggested}\n{name}"))
    return shown


def planted_recall(suspects, planted_csv, held_paths, top):
    """(found, total): planted wrong images on the held-out side that a top-`top` suspect covers
    (an image suspect names the image; a person suspect covers the person's photos)."""
    planted = pd.read_csv(planted_csv, dtype=str, keep_default_na=False)
    if "path" not in planted.columns:
        raise cli.UserError(f"{planted_csv}: no path column (expected make_sample_data.py's label_noise.csv)")
    held = {p[len("images/"):] if p.startswith("images/") else p for p in held_paths}
    wrong = [p for p in planted["path"] if p in held]
    covered = set()
    for s in suspects.head(top).itertuples():
        name = s.path[len("images/"):] if s.path.startswith("images/") else s.path
        covered |= {p for p in wrong if p == name or p.startswith(name + "/")}
    return len(covered), len(wrong)


def main(args):
    held = read_heldout(args.run)
    out = args.output_dir or os.path.join(args.run, "audit")
    outputs = [os.path.join(out, name) for name in ("suspects.csv", "fixes.csv", "suspects.png")]
    check_outputs(outputs, overwrite=args.overwrite)
    root = training_root(args.run, args.data_dir)
    for path in held.paths:  # every image named is inside the data folder and there
        data_path(root, path, held.source)
    suspects = rank_suspects(held)
    fixes = draft_fixes(suspects, args.top)
    from maskcls import plots  # matplotlib only when there is a picture to draw
    made = not os.path.isdir(out)
    os.makedirs(out, exist_ok=True)
    try:
        write_csvs([suspects.round({"score": 4, "p_labelled": 4}), fixes], outputs[:2], overwrite=True)
        plots.captioned_grid_png(outputs[2], suspect_images(suspects, root, args.top),
                                 f"top {min(args.top, len(suspects))} suspects of {os.path.basename(held.source)}")
    except BaseException:
        if made:  # a full disk (or Ctrl-C) leaves no empty or partial audit folder behind
            shutil.rmtree(out, ignore_errors=True)
        raise
    coverage = "every training image" if held.source.endswith("oof.csv") else "the validation side only"
    print(f"{len(suspects)} suspects ranked from {held.source} ({coverage}); top {min(args.top, len(suspects))}:")
    for s in suspects.head(min(args.top, 10)).itertuples():
        print(f"  #{s.rank} {s.kind:6s} {s.path}: labelled {s.labelled}, predicted {s.suggested} "
              f"(p {s.p_labelled:.3f})")
    if args.planted:
        found, total = planted_recall(suspects, args.planted, held.paths, args.top)
        print(f"planted errors: {found} of the {total} wrong images on the held-out side are covered by the top "
              f"{args.top} suspects ({args.planted})")
    print(f"wrote {outputs[0]}, {outputs[1]} ({len(fixes)} draft fixes: review before "
          f"train.py --relabel {outputs[1]}) and {outputs[2]}")


if __name__ == "__main__":
    cli.run(main, get_args_parser)
