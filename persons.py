"""Person-consistent predictions: group photos into persons, pool gender and age within a person.

In the competition every person has 7 photos (5 masks worn, 1 incorrect, 1 without), and
gender and age band are the person's, the same on all 7; only the mask state differs per
photo. The eval set does not say which photos belong together, but one person's photos share
background, clothes, hair and lighting. `group_photos` clusters images on that content: the
frame of a 24x32 thumbnail (its outer rows and columns: background, clothes and hair, not the
face, whose mask changes between the photos), standardized, Ward-linkage agglomerative
clustering into N/7 groups (measured on 700 held-out photos of 100 generated persons: purity
0.97 with the frame and Ward; 0.68 with the whole thumbnail and average linkage). A wrong
group hurts more than pooling helps (on 3,500 photos of 500 persons, purity 0.94: macro F1
0.7585 unpooled, 0.7283 pooled in every group), so `complete_groups` keeps only the groups
whose predicted mask states are one person's (5 worn, 1 incorrect, 1 not worn): 351 of 500
there, purity 0.9997, F1 0.7722 (pooling by the true persons: 0.7696). `pool` replaces each
image's gender and age-band probabilities by their mean over its group and keeps its own mask
probabilities (the 18-class probability is the product of the three).

`inference.py --person_pool` uses both. `python persons.py RUN` measures them first where the
persons are known, on the run's held-out images (oof.csv or val_predictions.csv): the grouping's
purity and the macro F1 of the unpooled, truly-pooled and group-pooled predictions.

`--eval_dir data/eval` measures the purity on generated eval data too (its persons.csv says
who is on each photo).

Example: python persons.py runs/kf --eval_dir data/eval
"""
import maskcls  # noqa: F401  (first: it sets OpenMP's wait policy before torch loads)
import json
import os
import time

import numpy as np
from PIL import Image

from maskcls import cli
from maskcls.heldout import read_heldout, training_root
from maskcls.labels import MASK_CLASSES, PHOTO_MASK, decode_label, task_marginals
from maskcls.metrics import macro_f1
from maskcls.readers import data_path

PHOTOS_PER_PERSON = 7
THUMB = (24, 32)  # (width, height) of the content descriptor: background, clothes, hair survive it
FRAME = (5, 4)    # rows at the top and bottom, columns at each side, of the thumbnail: the descriptor


def thumbnail(path):
    """The frame of a small thumbnail, flattened: what the 7 photos of a person share."""
    try:
        with Image.open(path) as image:
            image.draft("RGB", (THUMB[0] * 4, THUMB[1] * 4))  # JPEG: decode at 1/8 scale, much faster
            small = np.asarray(image.convert("RGB").resize(THUMB, Image.BILINEAR), dtype=np.float32)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        raise cli.UserError(f"cannot read image {path}: {err}") from None
    rows, cols = FRAME
    return np.concatenate([small[:rows].ravel(), small[-rows:].ravel(),
                           small[rows:-rows, :cols].ravel(), small[rows:-rows, -cols:].ravel()])


def content_features(paths):
    features = np.stack([thumbnail(p) for p in cli.progress(paths, desc="thumbnails", unit="image")])
    features -= features.mean(0)
    return features / (features.std(0) + 1e-6)


def group_photos(paths, per_person=PHOTOS_PER_PERSON, features=None):
    """A group id per image: photos of one person should share one (clusters = images / per_person)."""
    features = content_features(paths) if features is None else features
    groups = max(1, round(len(paths) / per_person))
    if groups >= len(paths):
        return np.arange(len(paths))
    from sklearn.cluster import AgglomerativeClustering  # here: only --person_pool's clustering needs it
    return AgglomerativeClustering(n_clusters=groups, linkage="ward").fit_predict(features)


PERSON_MASKS = sorted(PHOTO_MASK.values())  # one person's mask states: 5 worn, 1 incorrect, 1 not worn


def complete_groups(groups, probs, per_person=PHOTOS_PER_PERSON):
    """Groups kept only where their photos' predicted mask states are one person's (5 worn, 1
    incorrect, 1 not worn; with another --photos_per_person: only groups of that size); every
    other photo becomes a group of its own (not pooled). A merged or split cluster almost never
    has that composition, so what is pooled is nearly pure."""
    masks = task_marginals(probs)[0].argmax(1)
    out = np.asarray(groups).copy()
    spare = out.max() + 1
    for g in np.unique(out):
        members = np.flatnonzero(out == g)
        composition = sorted(masks[members].tolist())
        if len(members) != per_person or (per_person == len(PERSON_MASKS) and composition != PERSON_MASKS):
            out[members] = spare + np.arange(len(members))
            spare += len(members)
    return out


def pooled_groups(groups):
    """Groups with more than one photo."""
    return int((np.bincount(groups) > 1).sum())


def purity(groups, persons):
    """Share of images whose group's majority person is their own person."""
    right = 0
    for g in np.unique(groups):
        _, counts = np.unique(np.asarray(persons)[groups == g], return_counts=True)
        right += counts.max()
    return right / len(groups)


def pool(probs, groups):
    """18-class probabilities with gender and age band pooled (mean) within each group."""
    mask, gender, age = task_marginals(probs)
    for g in np.unique(groups):
        members = groups == g
        gender[members] = gender[members].mean(0)
        age[members] = age[members].mean(0)
    out = np.zeros_like(probs)
    for c in range(probs.shape[1]):
        m, g, a = decode_label(c)
        out[:, c] = mask[:, m] * gender[:, g] * age[:, a]
    return out / out.sum(1, keepdims=True)


def measure(run_dir, data_dir=None):
    """On a run's held-out images (persons known): grouping purity and macro F1 with and without pooling."""
    held = read_heldout(run_dir)
    if held.classes != MASK_CLASSES or (held.persons == "").any():
        raise cli.UserError(f"{run_dir}: person pooling needs the competition layout (persons and 18 classes)")
    root = training_root(run_dir, data_dir)
    start = time.perf_counter()
    groups = group_photos([data_path(root, p, held.source) for p in held.paths])
    seconds = time.perf_counter() - start
    complete = complete_groups(groups, held.probs)
    n = len(held.classes)
    _, true_groups = np.unique(held.persons, return_inverse=True)

    def f1(g):
        return round(macro_f1(held.labels, pool(held.probs, g).argmax(1), n), 4)
    return {"images": len(held.labels), "persons": int(true_groups.max() + 1), "groups": int(groups.max() + 1),
            "purity": round(purity(groups, held.persons), 4), "grouping_seconds": round(seconds, 1),
            "complete_groups": pooled_groups(complete), "complete_purity": round(purity(complete, held.persons), 4),
            "f1_unpooled": round(macro_f1(held.labels, held.probs.argmax(1), n), 4),
            "f1_true_persons": f1(true_groups), "f1_all_groups": f1(groups), "f1_complete_groups": f1(complete)}


def eval_purity(eval_dir, per_person=PHOTOS_PER_PERSON):
    """Grouping purity on an eval folder whose persons.csv (make_sample_data.py) says who is on each photo."""
    from dataset import read_csv_columns
    owners = read_csv_columns(os.path.join(eval_dir, "persons.csv"), ("ImageID", "person"))
    source = os.path.join(eval_dir, "persons.csv")
    images = os.path.join(eval_dir, "images")
    groups = group_photos([data_path(images, i, source) for i in owners["ImageID"]], per_person)
    return purity(groups, owners["person"].to_numpy(dtype=str)), int(groups.max() + 1)


def main(args):
    if args.eval_dir:
        value, groups = eval_purity(args.eval_dir)
        print(f"{args.eval_dir}: {groups} groups, purity {value:.3f}")
        if not args.run:
            return
    if not args.run:
        raise cli.UserError("give a run folder (RUN) or --eval_dir")
    result = measure(args.run, args.data_dir)
    print(f"{result['images']} held-out images of {result['persons']} persons -> {result['groups']} groups, "
          f"purity {result['purity']:.3f} ({result['grouping_seconds']}s); {result['complete_groups']} with one "
          f"person's mask states (purity {result['complete_purity']:.4f} counting the rest as single photos)")
    print(f"macro F1: unpooled {result['f1_unpooled']:.4f}, pooled by true person {result['f1_true_persons']:.4f}, "
          f"by every group {result['f1_all_groups']:.4f}, by complete groups {result['f1_complete_groups']:.4f} "
          f"(what inference.py --person_pool does)")
    if args.json:
        print(json.dumps(result))


def get_args_parser():
    parser = cli.ArgumentParser(description="Measure person grouping and pooling on a run's held-out images.")
    parser.add_argument("run", metavar="RUN", nargs="?", help="a run folder with oof.csv (--kfold) or val_predictions.csv")
    parser.add_argument("--data_dir", default=None, help="the training folder (default: the run's config.json)")
    parser.add_argument("--eval_dir", default=None, metavar="DIR",
                        help="also measure the grouping on an eval folder with persons.csv (generated data)")
    cli.bool_flag(parser, "--json", help="also print the numbers as one JSON line")
    return parser


if __name__ == "__main__":
    cli.run(main, get_args_parser)
