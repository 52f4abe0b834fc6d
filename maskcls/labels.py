"""The competition's label scheme: 18 classes = mask state x gender x age band.

    label = mask * 6 + gender * 3 + age_band
    mask: wear 0 (mask1..mask5), incorrect 1 (incorrect_mask), not wear 2 (normal)
    gender: male 0, female 1;  age band: <30 0, 30..59 1, >=60 2

Everything that knows these numbers lives here: the photo names, encode/decode, the class
names, the three sub-tasks (for the multi-task head and the per-task report), and the training
labels re-cut with `--age_bins`. A folder-per-class dataset has no scheme: its classes are its
folder names.

Example: python train.py --head multitask --age_bins 30,58
"""
import bisect

import numpy as np

PHOTO_MASK = {"mask1": 0, "mask2": 0, "mask3": 0, "mask4": 0, "mask5": 0,
              "incorrect_mask": 1, "normal": 2}  # file stem -> mask state
MASK_NAMES = ("wear", "incorrect", "not_wear")
GENDERS = {"male": 0, "female": 1}
GENDER_NAMES = ("M", "F")
AGE_BINS = (30, 60)  # band edges: <30, 30..59, >=60
AGE_NAMES = ("<30", "30-59", "60+")
NUM_CLASSES = len(MASK_NAMES) * len(GENDER_NAMES) * len(AGE_NAMES)
MAX_AGE = 120
# what a relabel file may write in its mask column
MASK_VALUES = {"wear": 0, "incorrect": 1, "not_wear": 2, "normal": 2, "0": 0, "1": 1, "2": 2}


def age_band(age, bins=AGE_BINS):
    """0 for age < bins[0], 1 for bins[0] <= age < bins[1], 2 above."""
    return bisect.bisect_right(bins, age)


def encode_label(mask, gender, age_class):
    return (mask * len(GENDER_NAMES) + gender) * len(AGE_NAMES) + age_class


def decode_label(label):
    """18-class label -> (mask, gender, age band)."""
    label = int(label)
    return (label // (len(GENDER_NAMES) * len(AGE_NAMES)),
            label // len(AGE_NAMES) % len(GENDER_NAMES),
            label % len(AGE_NAMES))


MASK_CLASSES = [f"{MASK_NAMES[m]}/{GENDER_NAMES[g]}/{AGE_NAMES[a]}"
                for m, g, a in map(decode_label, range(NUM_CLASSES))]
TASKS = {"mask": len(MASK_NAMES), "gender": len(GENDER_NAMES), "age": len(AGE_NAMES)}  # label's factors


def task_marginals(probs):
    """[N, 18] class probabilities -> [mask [N, 3], gender [N, 2], age [N, 3]] sub-task probabilities."""
    probs = np.asarray(probs)
    parts = [np.zeros((len(probs), size)) for size in TASKS.values()]
    for c in range(probs.shape[1]):
        for task, value in enumerate(decode_label(c)):
            parts[task][:, value] += probs[:, c]
    return parts


def training_label(sample, age_bins=None):
    """The label to train on: with `age_bins` (e.g. 30,58) the age band is re-cut; validation,
    metrics and submissions always keep the standard bands."""
    if not age_bins or sample.age < 0:
        return sample.label
    mask, gender, _ = decode_label(sample.label)
    return encode_label(mask, gender, age_band(sample.age, tuple(age_bins)))
