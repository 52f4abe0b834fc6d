"""Data: reading both layouts, person-level splits and the dataset registry.

Layouts (README "Your own experiments"):
- competition: `TRAIN_DIR/train.csv` (id,gender,race,age,path) and `TRAIN_DIR/images/<path>/`
  with the photos mask1..mask5, incorrect_mask, normal (.jpg/.jpeg/.png);
  eval: `EVAL_DIR/info.csv` (ImageID,ans) and `EVAL_DIR/images/<ImageID>`.
- folder per class: `TRAIN_DIR/<class_name>/<images>` (`--dataset ImageFolder`); classes are
  the sorted folder names.

A dataset entry reads a folder into `samples` (path, label, person) and decides the
train/validation split (`split()`, `folds(k)`); `maskcls/images.py`'s ImageDataset turns one side
into tensors with its own transform. The label scheme lives in maskcls/labels.py.

Add your own entry with `@DATASETS.register()` on a subclass of `SplitDataset` (or of
`MaskSplitByProfileDataset` for the competition layout): read `samples`, set `classes`, and
override `split()` where the split differs. Its constructor takes
`(data_dir, val_ratio=0.2, seed=42, relabel=None, **kwargs)`.

Example: python train.py --dataset MaskSplitByProfileDataset --val_ratio 0.2
"""
import csv
import os
from dataclasses import dataclass

import numpy as np
import pandas as pd

from maskcls.atomic import replacing
from maskcls.cli import UserError
from maskcls.images import IMAGE_EXTENSIONS
from maskcls.labels import (AGE_NAMES, GENDER_NAMES, GENDERS, MASK_CLASSES, MASK_VALUES, MAX_AGE, NUM_CLASSES,
                            PHOTO_MASK, age_band, decode_label, encode_label)
from maskcls.readers import read_probs
from maskcls.registry import Option, Registry

DATASETS = Registry("dataset")

# Mean/std of the competition's photos (measured on its training set), ImageNet's otherwise.
MASK_MEAN, MASK_STD = (0.548, 0.504, 0.479), (0.237, 0.247, 0.246)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PHOTO_EXTENSIONS = (".jpg", ".jpeg", ".png")
TRAIN_COLUMNS = ("id", "gender", "race", "age", "path")


def _is_hidden(name):
    # Archives made on macOS carry `._mask1.jpg` and `.DS_Store`: never data.
    return name.startswith(".")


# ---------------------------------------------------------------- the competition layout
@dataclass(frozen=True)
class Sample:
    path: str     # relative to the dataset root
    label: int
    person: str   # the person's folder; "" where the layout has no persons
    age: int = -1  # the person's age (competition layout), for --age_bins
    soft: tuple = None  # --pseudo_soft: the class probabilities a label is drawn from each epoch


def resolve_train_dir(data_dir):
    """Accept TRAIN_DIR or TRAIN_DIR/images (the path the public baseline asks for)."""
    data_dir = os.path.normpath(data_dir)
    if not os.path.isdir(data_dir):
        raise UserError(f"data folder {data_dir} does not exist")
    parent = os.path.dirname(data_dir)
    if (os.path.basename(data_dir) == "images" and not os.path.exists(os.path.join(data_dir, "train.csv"))
            and os.path.isfile(os.path.join(parent, "train.csv"))):
        return parent
    return data_dir


def read_csv_columns(path, columns):
    """A CSV as strings (ids like `000600-1` must stay strings), with the columns checked."""
    if not os.path.isfile(path):
        raise UserError(f"{path} not found")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise UserError(f"cannot parse {path}: {err}") from None
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(columns)}, "
                        f"found {','.join(frame.columns)}")
    return frame


def _person_photos(folder):
    """{stem: file name} for one person's folder, checking the 7 expected photos."""
    try:
        names = sorted(n for n in os.listdir(folder) if not _is_hidden(n))
    except FileNotFoundError:
        raise UserError(f"person folder {folder} does not exist (listed in train.csv)") from None
    photos = {}
    for name in names:
        stem, ext = os.path.splitext(name)
        if stem not in PHOTO_MASK or ext.lower() not in PHOTO_EXTENSIONS:
            raise UserError(f"unknown photo {os.path.join(folder, name)}: expected "
                            f"{', '.join(PHOTO_MASK)} with extension {'/'.join(PHOTO_EXTENSIONS)}")
        if stem in photos:
            raise UserError(f"{folder} holds two photos named {stem}: {photos[stem]} and {name}")
        photos[stem] = name
    missing = [stem for stem in PHOTO_MASK if stem not in photos]
    if missing:
        raise UserError(f"{folder} is missing photo(s) {', '.join(missing)}")
    return photos


def _parse_age(text, row):
    try:
        age = int(str(text).strip())
    except ValueError:
        age = -1
    if not 0 <= age <= MAX_AGE:
        raise UserError(f"train.csv row {row}: bad age {text!r}, expected a whole number 0..{MAX_AGE}")
    return age


def read_mask_train(data_dir, relabel=None):
    """Read and validate the competition layout into (root, [Sample]); `relabel`: a CSV of fixes."""
    root = resolve_train_dir(data_dir)
    csv_path = os.path.join(root, "train.csv")
    if not os.path.isfile(csv_path):
        raise UserError(f"{root} has no train.csv: expected the competition layout "
                        f"(train.csv + images/); for a folder per class use --dataset ImageFolder")
    frame = read_csv_columns(csv_path, TRAIN_COLUMNS)
    images_dir = os.path.join(root, "images")
    if not os.path.isdir(images_dir):
        raise UserError(f"{root} has no images/ folder next to train.csv")
    if frame.empty:
        raise UserError(f"{csv_path} lists no person")
    duplicated = frame["path"][frame["path"].duplicated()].tolist()
    if duplicated:
        raise UserError(f"{csv_path}: person folder {duplicated[0]!r} is listed twice")
    samples = []
    for row, person in enumerate(frame.itertuples(index=False), start=2):  # row 1 is the header
        gender = GENDERS.get(person.gender.strip().lower())
        if gender is None:
            raise UserError(f"train.csv row {row}: bad gender {person.gender!r}, expected male or female")
        age = _parse_age(person.age, row)
        age_class = age_band(age)
        folder = person.path.strip()
        if not folder or _is_hidden(folder) or os.path.isabs(folder) or ".." in folder.split("/"):
            raise UserError(f"train.csv row {row}: bad path {person.path!r}")
        for stem, name in _person_photos(os.path.join(images_dir, folder)).items():
            samples.append(Sample(f"images/{folder}/{name}",
                                  encode_label(PHOTO_MASK[stem], gender, age_class), folder, age))
    if relabel:
        samples = apply_relabel(samples, relabel, frame)
    return root, samples


def apply_relabel(samples, relabel_csv, meta):
    """Corrected labels from a CSV, applied as the data is read.

    Columns: `path` (a person folder, e.g. 000001_female_Asian_45, or one image,
    e.g. 000001_female_Asian_45/normal.jpg) or `id` (train.csv's id; must name one person),
    and any of `gender` (male/female), `age` (years), `mask` (wear/incorrect/not_wear or 0/1/2;
    for an image row only). Blank cells keep the old value. Prints how many images changed.
    """
    fixes = pd.read_csv(relabel_csv, dtype=str, keep_default_na=False) if os.path.isfile(relabel_csv) else None
    if fixes is None:
        raise UserError(f"relabel file {relabel_csv} not found")
    if "path" not in fixes.columns and "id" not in fixes.columns:
        raise UserError(f"{relabel_csv}: needs a 'path' or an 'id' column")
    by_id = meta.groupby(meta["id"].str.strip())["path"].apply(list).to_dict()
    people = {s.person for s in samples}
    samples = list(samples)
    index = {s.path: i for i, s in enumerate(samples)}
    changed = set()
    for row_no, fix in enumerate(fixes.to_dict("records"), start=2):
        target = str(fix.get("path", "")).strip().strip("/")
        if not target:
            folders = by_id.get(str(fix.get("id", "")).strip(), [])
            if len(folders) != 1:
                raise UserError(f"{relabel_csv} row {row_no}: id {fix.get('id')!r} names "
                                f"{len(folders)} people; use the person's folder in a 'path' column")
            target = folders[0]
        target = target[len("images/"):] if target.startswith("images/") else target
        if target in people:
            hits = [i for i, s in enumerate(samples) if s.person == target]
        elif f"images/{target}" in index:
            hits = [index[f"images/{target}"]]
        else:
            raise UserError(f"{relabel_csv} row {row_no}: no person or image {target!r} in the data")
        for i in hits:
            sample = samples[i]
            mask, gender, _ = decode_label(sample.label)
            age = sample.age
            if str(fix.get("gender", "")).strip():
                gender = GENDERS.get(fix["gender"].strip().lower())
                if gender is None:
                    raise UserError(f"{relabel_csv} row {row_no}: bad gender {fix['gender']!r}")
            if str(fix.get("age", "")).strip():
                age = _parse_age(fix["age"], row_no)
            if str(fix.get("mask", "")).strip():
                if len(hits) != 1:
                    raise UserError(f"{relabel_csv} row {row_no}: a mask fix needs an image path, not a person")
                mask = MASK_VALUES.get(fix["mask"].strip().lower())
                if mask is None:
                    raise UserError(f"{relabel_csv} row {row_no}: bad mask {fix['mask']!r}, "
                                    f"expected wear/incorrect/not_wear or 0/1/2")
            label = encode_label(mask, gender, age_band(age))
            if (label, age) != (sample.label, sample.age):
                samples[i] = Sample(sample.path, label, sample.person, age)
                changed.add(i)
    print(f"relabel: {len(changed)} image label(s) changed by {relabel_csv}")
    return samples


# ---------------------------------------------------------------- splits
def _stratify_or_none(strata, test_size):
    """Stratify only where scikit-learn can: every stratum twice, both sides >= #strata."""
    strata = np.asarray(strata)
    counts = np.unique(strata, return_counts=True)[1]
    n_test = int(np.ceil(test_size * len(strata)))
    if counts.min() >= 2 and len(counts) <= n_test <= len(strata) - len(counts):
        return strata
    print(f"note: too few samples per class to stratify the split ({len(strata)} items, "
          f"{len(counts)} classes); splitting at random")
    return None


def _split_items(n_items, val_ratio, seed, strata=None):
    """Indices 0..n-1 split into (train, val), stratified on `strata` where possible."""
    if not val_ratio:  # --val_ratio 0: no validation, everything trains
        return list(range(n_items)), []
    if n_items < 2:
        raise UserError(f"need at least 2 items to split into train and validation, found {n_items}")
    from sklearn.model_selection import train_test_split  # here: inference never splits (0.5-1 s of start-up)
    index = np.arange(n_items)
    stratify = None if strata is None else _stratify_or_none(strata, val_ratio)
    train, val = train_test_split(index, test_size=val_ratio, random_state=seed, shuffle=True, stratify=stratify)
    return sorted(train.tolist()), sorted(val.tolist())


class SplitDataset:
    """What every dataset entry is: `samples` read from a folder, `classes`, normalization, and
    the split into training and validation. This base splits over images (class-stratified);
    the person-split entries below override `split()`."""
    mean, std = IMAGENET_MEAN, IMAGENET_STD
    label_scheme = "folder"  # "mask": the competition's 18 classes (labels.py)
    splits_by_person = False
    default_augmentation = "TimmAugmentation"  # --augmentation when none is given: timm's own pipeline
    # whether a left-right flip keeps every label: None = unknown, measured on the images before
    # training where --hflip is not given (maskcls/mirror.py; flips are turned off where they do not)
    flips_keep_labels = None
    warning = None  # a line train.py prints to stderr when this entry is chosen (a known trap)

    def __init__(self, root, samples, classes, val_ratio=0.2, seed=42):
        self.root, self.samples, self.classes = root, samples, list(classes)
        self.val_ratio, self.seed = val_ratio, seed

    @property
    def num_classes(self):
        return len(self.classes)

    def paths(self, indices):
        return [os.path.join(self.root, self.samples[i].path) for i in indices]

    def all_paths(self):
        return self.paths(range(len(self.samples)))

    def labels(self, indices):
        return [self.samples[i].label for i in indices]

    def split(self):
        """(train indices, val indices) into `samples`."""
        return _split_items(len(self.samples), self.val_ratio, self.seed, [s.label for s in self.samples])

    def folds(self, k):
        """K (train indices, val indices) pairs: every sample is held out exactly once."""
        from sklearn.model_selection import KFold, StratifiedGroupKFold, StratifiedKFold
        labels = [s.label for s in self.samples]
        if self.splits_by_person:  # people never straddle folds
            splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=self.seed)
            groups = [s.person for s in self.samples]
            if len(set(groups)) < k:
                raise UserError(f"--kfold {k}: only {len(set(groups))} people")
        else:
            splitter, groups = StratifiedKFold(n_splits=k, shuffle=True, random_state=self.seed), None
            if min(np.bincount(labels)[np.unique(labels)]) < k:
                splitter = KFold(n_splits=k, shuffle=True, random_state=self.seed)  # a class too small
        folds = [(sorted(t.tolist()), sorted(v.tolist()))
                 for t, v in splitter.split(np.zeros(len(labels)), labels, groups)]
        if self.splits_by_person:
            for train, val in folds:
                leaked = {self.samples[i].person for i in train} & {self.samples[i].person for i in val}
                assert not leaked, f"fold leaked {len(leaked)} people into both sides"
        return folds


class MaskBaseDataset(SplitDataset):
    """Competition layout, random split over IMAGES.

    Warning: this leaks: the 7 photos of one person land on both sides, so validation scores
    are inflated. Kept because the public baseline uses it; prefer a person split.
    """
    mean, std = MASK_MEAN, MASK_STD
    label_scheme = "mask"
    default_augmentation = "AlbuAugmentation"  # faces: flips, mild shifts, photometric noise
    flips_keep_labels = True  # a mirrored face keeps its mask, gender and age
    # README "Squeezing macro F1": the demo recipe on --difficulty real data, 3 seeds
    warning = ("--dataset MaskBaseDataset splits images, not persons: a person's photos land on both sides, so "
               "validation overestimates (measured: val 0.865 vs eval 0.804 macro F1, +0.061 over 3 seeds); "
               "datasetSplitByClasses splits by person")

    def __init__(self, data_dir, val_ratio=0.2, seed=42, relabel=None, **kwargs):
        root, samples = read_mask_train(data_dir, relabel)
        super().__init__(root, samples, MASK_CLASSES, val_ratio, seed)

    def split(self):
        return _split_items(len(self.samples), self.val_ratio, self.seed)


class MaskSplitByProfileDataset(MaskBaseDataset):
    """Competition layout, split by PERSON: all 7 photos of a person go to the same side."""
    splits_by_person = True
    warning = None

    def person_strata(self, persons):
        """The value to stratify people on (None: not stratified)."""
        return None

    def split(self):
        persons = sorted({s.person for s in self.samples})
        first_label = {}
        for s in self.samples:
            first_label.setdefault(s.person, s.label)
        strata = self.person_strata([first_label[p] for p in persons])
        train_p, val_p = _split_items(len(persons), self.val_ratio, self.seed, strata)
        val_people = {persons[i] for i in val_p}
        train = [i for i, s in enumerate(self.samples) if s.person not in val_people]
        val = [i for i, s in enumerate(self.samples) if s.person in val_people]
        leaked = {self.samples[i].person for i in train} & {self.samples[i].person for i in val}
        assert not leaked, f"person split leaked {len(leaked)} people into both sides"
        return train, val


class datasetSplitByClasses(MaskSplitByProfileDataset):  # noqa: N801 (the seed's flag value)
    """Competition layout, split by person, stratified on the person's gender x age class."""

    def person_strata(self, labels):
        return [label % (len(GENDER_NAMES) * len(AGE_NAMES)) for label in labels]


class ImageFolder(SplitDataset):
    """Any folder-per-class dataset: TRAIN_DIR/<class>/**/<image>; class-stratified split."""

    def __init__(self, data_dir, val_ratio=0.2, seed=42, **kwargs):
        if not os.path.isdir(data_dir):
            raise UserError(f"data folder {data_dir} does not exist")
        root = os.path.normpath(data_dir)
        classes = sorted(e.name for e in os.scandir(root) if e.is_dir() and not _is_hidden(e.name))
        if not classes:
            raise UserError(f"{root} has no class folders: expected TRAIN_DIR/<class_name>/<images>")
        samples = []
        for label, name in enumerate(classes):
            found = list_images(os.path.join(root, name))
            if not found:
                raise UserError(f"class folder {os.path.join(root, name)} holds no images "
                                f"({'/'.join(IMAGE_EXTENSIONS)})")
            samples += [Sample(os.path.join(name, rel), label, "") for rel in found]
        super().__init__(root, samples, classes, val_ratio, seed)


def resolve_image(root, name, source, row):
    """The image a CSV row names, relative to `root`: as written, or with a known extension added
    (Kaggle CSVs name images by id); one line where it is missing or leaves `root`."""
    text = str(name).strip()
    if not text or os.path.isabs(text) or ".." in text.replace("\\", "/").split("/"):
        raise UserError(f"{source}: row {row}: image {text!r} is empty or leaves {root}")
    for candidate in (text, *(text + ext for ext in IMAGE_EXTENSIONS)):
        if os.path.isfile(os.path.join(root, candidate)):
            return candidate
    raise UserError(f"{source}: row {row}: no image {text!r} in {root} (tried {', '.join(IMAGE_EXTENSIONS)} too)")


def csv_column(frame, given, default_index, source, what):
    """The column named `given` (a name, or a 0-based index as digits), or the default_index-th."""
    columns = list(frame.columns)
    if given is None:
        if len(columns) <= default_index:
            raise UserError(f"{source} has {len(columns)} column(s): name the {what} column (--{what}_col)")
        return columns[default_index]
    if str(given).isdigit() and given not in columns:
        index = int(given)
        if index >= len(columns):
            raise UserError(f"{source}: --{what}_col {given}: only {len(columns)} columns")
        return columns[index]
    if given not in columns:
        raise UserError(f"{source}: no column {given!r} (--{what}_col); columns: {', '.join(columns)}")
    return given


def class_order(values):
    """The distinct labels in class-index order: numerically where every one is a whole number."""
    distinct = sorted(set(values))
    if all(v.lstrip("-").isdigit() for v in distinct):
        return sorted(distinct, key=int)
    return distinct


class CSV(SplitDataset):
    """A CSV of images and labels, as most competitions ship them: `--labels train.csv` (in or
    relative to --data_dir), one row per image, the image relative to --data_dir (an id without
    extension works too), its label (any text; classes are the distinct labels, numerically
    ordered where they are numbers). `--group_col` (a patient, site or person): the split and the
    folds keep each group on one side, stratified by label, exactly like the person split.
    `--fold_col`: the folds given (--kfold uses them, so every model family shares them; a single
    split holds out the first fold). Columns by name or 0-based index."""

    def __init__(self, data_dir, val_ratio=0.2, seed=42, labels="train.csv", image_col=None, label_col=None,
                 group_col=None, fold_col=None, **kwargs):
        if not os.path.isdir(data_dir):
            raise UserError(f"data folder {data_dir} does not exist")
        root = os.path.normpath(data_dir)
        source = labels if os.path.isfile(labels) else os.path.join(root, labels)
        frame = read_csv_columns(source, ())
        if frame.empty:
            raise UserError(f"{source} lists no image")
        image_col, label_col = (csv_column(frame, image_col, 0, source, "image"),
                                csv_column(frame, label_col, 1, source, "label"))
        group_col = csv_column(frame, group_col, 0, source, "group") if group_col is not None else None
        fold_col = csv_column(frame, fold_col, 0, source, "fold") if fold_col is not None else None
        names = [str(v).strip() for v in frame[label_col]]
        empty = [i for i, v in enumerate(names) if not v]
        if empty:
            raise UserError(f"{source}: row {empty[0] + 2}: no label in column {label_col!r}")
        classes = class_order(names)
        index = {c: i for i, c in enumerate(classes)}
        paths = [resolve_image(root, name, source, row + 2) for row, name in enumerate(frame[image_col])]
        seen = {}
        for row, path in enumerate(paths):
            if path in seen:
                raise UserError(f"{source}: rows {seen[path] + 2} and {row + 2} both name {path}")
            seen[path] = row
        groups = [str(g) for g in frame[group_col]] if group_col else [""] * len(paths)
        samples = [Sample(p, index[n], g) for p, n, g in zip(paths, names, groups)]
        super().__init__(root, samples, classes, val_ratio, seed)
        self.splits_by_person = group_col is not None
        self.given_folds = [str(f) for f in frame[fold_col]] if fold_col else None
        if len(classes) < 2:
            raise UserError(f"{source}: column {label_col!r} holds one label ({classes[0]!r}): nothing to learn")

    def split(self):
        if self.given_folds is not None:  # the first of the given folds is held out
            first = sorted(set(self.given_folds), key=lambda f: (len(f), f))[0]
            val = [i for i, f in enumerate(self.given_folds) if f == first] if self.val_ratio else []
            held = set(val)
            return [i for i in range(len(self.samples)) if i not in held], val
        if self.splits_by_person:
            return self.group_split()
        return super().split()

    def group_split(self):
        """About --val_ratio of the groups held out, stratified by label (StratifiedGroupKFold)."""
        if not self.val_ratio:
            return list(range(len(self.samples))), []
        from sklearn.model_selection import StratifiedGroupKFold
        parts = max(2, round(1 / self.val_ratio))
        labels, groups = [s.label for s in self.samples], [s.person for s in self.samples]
        if len(set(groups)) < parts:
            raise UserError(f"--val_ratio {self.val_ratio}: only {len(set(groups))} groups to split")
        splitter = StratifiedGroupKFold(n_splits=parts, shuffle=True, random_state=self.seed)
        train, val = next(splitter.split(np.zeros(len(labels)), labels, groups))
        return sorted(train.tolist()), sorted(val.tolist())

    def folds(self, k):
        if self.given_folds is None:
            return super().folds(k)
        names = sorted(set(self.given_folds), key=lambda f: (len(f), f))
        if len(names) != k:
            raise UserError(f"--kfold {k}: the fold column holds {len(names)} folds ({', '.join(names)}); "
                            f"give --kfold {len(names)}")
        return [([i for i, f in enumerate(self.given_folds) if f != name],
                 [i for i, f in enumerate(self.given_folds) if f == name]) for name in names]


CSV_OPTIONS = {"labels": Option("CSV: the file listing images and labels (in --data_dir, or a path)", type=str),
               "image_col": Option("CSV: the image column, a name or 0-based index (default: the first)", type=str,
                                   default=None),
               "label_col": Option("CSV: the label column (default: the second)", type=str, default=None),
               "group_col": Option("CSV: a group column (patient, site, person): never split across train and "
                                   "validation", type=str, default=None),
               "fold_col": Option("CSV: a column of given folds, used by --kfold", type=str, default=None)}

for _entry in (MaskBaseDataset, MaskSplitByProfileDataset, datasetSplitByClasses, ImageFolder):
    DATASETS.register()(_entry)
DATASETS.register("CSV", options=CSV_OPTIONS)(CSV)


def write_split_csv(path, source, train_idx, val_idx, extra=()):
    """split.csv: path (relative to the data folder; extra training images as given), person, side."""
    with replacing(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "person", "side"])
        for side, indices in (("train", train_idx), ("val", val_idx)):
            writer.writerows([source.samples[i].path, source.samples[i].person, side] for i in indices)
        writer.writerows([s.path, s.person, "train"] for s in extra)


def class_counts(labels, num_classes):
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).tolist()


def read_extra(data_dir):
    """--extra_data: more training images, as Samples with full paths.

    The competition layout (train.csv + images/), or class-index folders
    `DIR/<0..17>/<images>` (the 18 mask classes by number).
    """
    if os.path.isfile(os.path.join(resolve_train_dir(data_dir), "train.csv")):
        root, samples = read_mask_train(data_dir)
        return [Sample(os.path.join(root, s.path), s.label, f"extra:{s.person}", s.age) for s in samples]
    folders = sorted(e.name for e in os.scandir(data_dir) if e.is_dir() and not _is_hidden(e.name))
    bad = [f for f in folders if not (f.isdigit() and int(f) < NUM_CLASSES)]
    if bad or not folders:
        raise UserError(f"extra data {data_dir}: expected train.csv + images/, or folders named by class "
                        f"index 0..{NUM_CLASSES - 1}; found {bad[0] if bad else 'no folders'!r}")
    return [Sample(os.path.join(data_dir, f, rel), int(f), "extra:") for f in folders
            for rel in list_images(os.path.join(data_dir, f))]


def read_pseudo_labels(probs_csv, eval_dir, threshold, classes, soft=False):
    """--pseudo_labels: eval images whose saved top probability is >= threshold, labelled by
    their argmax, as Samples with full paths (for the training side only). With `soft`
    (--pseudo_soft) each keeps its probabilities (below SOFT_FLOOR dropped, renormalized)."""
    image_ids, columns, probs = read_probs(probs_csv)  # checked: probabilities, rows summing to 1
    if columns != list(classes):
        raise UserError(f"{probs_csv}: probability columns do not match this dataset's classes")
    eval_set = read_eval_dir(eval_dir)
    where = dict(zip(eval_set.image_ids, eval_set.paths))
    missing = [i for i in image_ids if i not in where]
    if missing:
        raise UserError(f"{probs_csv}: ImageID {missing[0]!r} is not in {eval_dir}")
    keep = probs.max(1) >= threshold
    kept_ids = [i for i, k in zip(image_ids, keep) if k]
    if not soft:
        return [Sample(where[i], int(p), "pseudo:") for i, p in zip(kept_ids, probs[keep].argmax(1))]
    kept = np.where(probs[keep] >= SOFT_FLOOR, probs[keep], 0.0)
    kept /= kept.sum(1, keepdims=True)
    return [Sample(where[i], int(p.argmax()), "pseudo:", soft=tuple(np.round(p, 6).tolist()))
            for i, p in zip(kept_ids, kept)]


SOFT_FLOOR = 1e-3  # --pseudo_soft: smaller saved probabilities are never drawn


# ---------------------------------------------------------------- eval / test images
def list_images(folder):
    """Image files under `folder`, recursively, as sorted relative paths (hidden names skipped)."""
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _is_hidden(d))
        rel = os.path.relpath(dirpath, folder)
        found += [os.path.normpath(os.path.join(rel, n)) for n in filenames
                  if not _is_hidden(n) and os.path.splitext(n)[1].lower() in IMAGE_EXTENSIONS]
    return sorted(found)


@dataclass
class EvalSet:
    image_ids: list   # what goes into the ImageID column
    paths: list       # full paths, same order
    info: object      # info.csv as a DataFrame, or None for a plain folder


def read_eval_csv(data_dir, csv_path, image_col=None):
    """The images a CSV lists (a test CSV, a sample submission), in its order, relative to
    `data_dir` (an id without extension works too); its table is the submission's frame."""
    if not os.path.isdir(data_dir):
        raise UserError(f"folder {data_dir} does not exist")
    frame = read_csv_columns(csv_path, ())
    if frame.empty:
        raise UserError(f"{csv_path} lists no image: nothing to predict")
    column = csv_column(frame, image_col, 0, csv_path, "image")
    root = os.path.normpath(data_dir)
    found = [resolve_image(root, name, csv_path, row + 2) for row, name in enumerate(frame[column])]
    twice = [p for p in set(found) if found.count(p) > 1] if len(set(found)) < len(found) else []
    if twice:
        raise UserError(f"{csv_path}: {twice[0]} is listed more than once")
    return EvalSet(frame[column].tolist(), [os.path.join(root, p) for p in found], frame)


def read_eval_dir(eval_dir):
    """The competition's eval layout (info.csv + images/), or a plain folder of images.

    Every image is checked before any work starts; ImageIDs that leave the images folder
    (absolute, `..`) or repeat are refused.
    """
    if not os.path.isdir(eval_dir):
        raise UserError(f"eval folder {eval_dir} does not exist")
    info_path = os.path.join(eval_dir, "info.csv")
    if not os.path.isfile(info_path):
        ids = list_images(eval_dir)
        if not ids:
            raise UserError(f"{eval_dir} has neither info.csv nor any image")
        return EvalSet(ids, [os.path.join(eval_dir, i) for i in ids], None)
    info = read_csv_columns(info_path, ("ImageID", "ans"))
    if info.empty:
        raise UserError(f"{info_path} lists no image (only a header row): nothing to predict")
    images_dir = os.path.join(eval_dir, "images")
    ids = info["ImageID"].tolist()
    repeated = info["ImageID"][info["ImageID"].duplicated()].tolist()
    if repeated:
        raise UserError(f"{info_path}: ImageID {repeated[0]!r} appears more than once")
    for image_id in ids:
        if not image_id or os.path.isabs(image_id) or ".." in image_id.replace("\\", "/").split("/"):
            raise UserError(f"{info_path}: ImageID {image_id!r} points outside {images_dir}")
    paths = [os.path.join(images_dir, i) for i in ids]
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise UserError(f"{len(missing)} image(s) listed in {info_path} are missing, first: {missing[0]}")
    return EvalSet(ids, paths, info)
