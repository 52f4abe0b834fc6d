"""Whether a left-right flip keeps the labels of a dataset, measured on its images: the check
behind train.py's default --hflip where the dataset entry does not say (a folder per class, a
CSV). Digits, letters, arrows, "turn left" / "turn right" signs change class when mirrored;
faces, animals and most objects do not.

The measure: what sets each class apart from the others is its mean image minus the mean image
of all classes. Each class's images are split into two random halves, and the two halves' class
signals are correlated as they are (`same`: how reliable the signal is) and with one half mirrored
(`mirrored`). Where the classes differ in mirror-symmetric ways (a face and a non-face) the two
agree; where mirroring changes what sets a class apart (a 3 and its mirror) `mirrored` falls far
below `same`. A dataset whose classes differ in texture rather than layout has no reliable mean
signal (`same` near 0): nothing is concluded, and the pipeline keeps its flip.

Measured (split halves, 8x8 scikit-learn digits and scikit-image's lfw_subset at full size):
digits same 0.99, mirrored 0.32 (per digit from -0.27 for the 5 to 0.89 for the 0); lfw_subset
(faces against other patches) 0.92 and 0.73; noise -0.06 and 0.01. With 32 images a class read
from their files, mirrored / same over five sampling seeds: digits 0.27-0.29, lfw_subset
0.68-0.87, the sample competition photos by class 0.96-0.98.

Example: python train.py --dataset ImageFolder --data_dir digits/  # prints the check when it turns flips off
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from maskcls.cli import UserError

SIZE = 32            # images are compared at SIZE x SIZE, greyscale
PER_CLASS = 32       # at most this many images of a class are read (two halves of 16)
MAX_IMAGES = 512     # and at most this many in all (fewer per class where there are many classes)
MIN_SAME = 0.3       # below: the classes have no reliable layout to compare; nothing concluded
MIN_RATIO = 0.5      # mirrored / same below this: mirroring changes what sets the classes apart


def class_signal_agreement(images, labels, seed=0):
    """(same, mirrored) for images [N, H, W] (greyscale) and their labels: the correlation of the
    two random halves' class signals (class mean minus the mean of all), as they are and with
    one half mirrored left-right. Classes with fewer than 4 images are left out; (0, 0) when
    none is left."""
    rng = np.random.default_rng(seed)
    x = np.asarray(images, dtype=np.float64)
    x = (x - x.mean(axis=(1, 2), keepdims=True)) / (x.std(axis=(1, 2), keepdims=True) + 1e-6)
    labels = np.asarray(labels)
    overall = x.mean(axis=0)
    same = mirrored = norm_a = norm_b = 0.0
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        if len(members) < 4:
            continue
        a, b = x[members[0::2]].mean(axis=0) - overall, x[members[1::2]].mean(axis=0) - overall
        same += (a * b).sum()
        mirrored += (a * b[:, ::-1]).sum()
        norm_a, norm_b = norm_a + (a * a).sum(), norm_b + (b * b).sum()
    if norm_a == 0 or norm_b == 0:
        return 0.0, 0.0
    scale = np.sqrt(norm_a * norm_b)
    return float(same / scale), float(mirrored / scale)


def sample_images(paths, labels, regions=None, seed=0):
    """A class-balanced sample of the images (PER_CLASS of each at most, MAX_IMAGES in all) as
    [N, SIZE, SIZE] greyscale, prepared as training prepares them, and their labels; an image
    that cannot be read is left out."""
    from maskcls.images import load_image, prepare_image
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    classes = np.unique(labels)
    per_class = max(4, min(PER_CLASS, MAX_IMAGES // max(len(classes), 1)))
    picks = [i for label in classes for i in rng.permutation(np.flatnonzero(labels == label))[:per_class]]

    def read(i):
        try:
            image = load_image(paths[i], (SIZE, SIZE), None if regions is None else regions.get(paths[i]))
        except UserError:
            return None
        return prepare_image(image, (SIZE, SIZE)).mean(axis=2)
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # decoding releases the GIL
        images = list(pool.map(read, picks))
    kept = [i for i, image in zip(picks, images) if image is not None]
    images = [image for image in images if image is not None]
    return np.stack(images) if images else np.zeros((0, SIZE, SIZE)), labels[kept]


def flips_keep_labels(paths, labels, regions=None):
    """(verdict, same, mirrored): False where mirroring changes what sets the classes apart
    (mirrored < MIN_RATIO x same), True where it does not, None where the classes have no
    reliable layout to compare (same < MIN_SAME)."""
    images, kept = sample_images(paths, labels, regions)
    same, mirrored = class_signal_agreement(images, kept)
    if same < MIN_SAME:
        return None, same, mirrored
    return mirrored >= MIN_RATIO * same, same, mirrored
