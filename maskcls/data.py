"""What a run trains on, built once and complete before the first fold: the dataset entry over
--data_dir, the extra training images (--extra_data, --pseudo_labels), the unreadable images
left out (--skip_bad_images), the face crop regions (--facecrop) and the sizes images are
prepared to. The image cache is opened beside it, for the run's lifetime (`open_image_cache`).

Example: python train.py --facecrop True --extra_data more/train --skip_bad_images True
"""
import contextlib
import dataclasses
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from augmentation import horizontal_flips, prepared_size, train_transform
from dataset import DATASETS, read_extra, read_pseudo_labels
from facecrop import face_regions
from maskcls import cli, distributed
from maskcls.images import (STORE_NAME, ImageDataset, cache_shape, load_image, open_cache, open_store,
                            shared_memory_free)
from maskcls.mirror import flips_keep_labels


@dataclasses.dataclass(frozen=True)
class TrainingData:
    """What every fold trains on, complete once `load` returns it."""
    source: object        # the dataset entry: samples, classes, mean/std, split()/folds()
    extra: list           # Samples with full paths for the training side only (--extra_data, --pseudo_labels)
    regions: dict         # full image path -> face crop region (--facecrop), else empty
    augmentation: str     # the training pipeline (--augmentation, or the layout's default)
    prepared: tuple       # (H, W) validation images (and cached ones) are prepared to
    train_prepared: tuple  # the same for the training side; None: its pipeline gets full photos
    hflip: float = None   # 0.0 where the mirror check turned the pipeline's flip off, else None

    @classmethod
    def load(cls, args, input_size, context=distributed.Context()):
        """The data folder, the extra training images, their face crops (--facecrop), the
        training pipeline and the sizes images are prepared to for `input_size` (H, W)."""
        source = read_source(args)
        if source.warning and context.is_main:  # a known trap of the entry chosen
            print(f"warning: {source.warning}", file=sys.stderr)
        extra, groups = extra_images(args, source)
        if args.skip_bad_images:
            extra = drop_unreadable(source, extra)
            kept = set(source.all_paths()) | {s.path for s in extra}
            groups = [(folder, [p for p in paths if p in kept]) for folder, paths in groups]
        regions = {}
        if args.facecrop:  # one face box cache per data folder, filled by rank 0 alone
            if not context.is_main:
                distributed.barrier(context)
            for folder, paths in groups:
                regions.update(zip(paths, face_regions(paths, folder, args.face_margin)))
            if context.is_main:
                distributed.barrier(context)
        augmentation = args.augmentation or source.default_augmentation
        probe = train_transform(augmentation, input_size, source.mean, source.std, vars(args))
        train_prepared = prepared_size(probe, input_size)
        if train_prepared is None and context.is_main:
            print(f"note: --augmentation {augmentation} does not start with a resize: training gets full-size "
                  f"photos, decoded every epoch (only validation images are prepared and cached)")
        hflip = None
        if args.hflip is None and source.flips_keep_labels is None and any(t.p > 0 for t in horizontal_flips(probe)):
            hflip = mirror_check(source, regions, context)
        return cls(source, extra, regions, augmentation, train_prepared or tuple(input_size), train_prepared, hflip)

    def all_paths(self):
        """Every image the folds use: the data folder's, then the extra training images."""
        return self.source.all_paths() + [s.path for s in self.extra]

    def splits(self, k):
        """[(train indices, val indices)]: K person-grouped folds with --kfold K, else one split."""
        return self.source.folds(k) if k else [self.source.split()]

    def dataset(self, paths, labels, transform, prepare_to, cache=None, soft=None, ages=None, targets=None):
        """An ImageDataset over `paths` with this data's face crops and the run's `cache`
        (RunCache). prepare_to None: the transform gets full-size photos (a pipeline that does not
        resize first), never cached."""
        regions = [self.regions[p] for p in paths] if self.regions else None
        images = cache.images if cache is not None and prepare_to is not None else None
        return ImageDataset(paths, labels, transform, prepare_to=prepare_to, regions=regions, cache=images,
                            cache_slots=[cache.slots[p] for p in paths] if images is not None else None,
                            soft=soft, ages=ages, targets=targets, store=cache.store if cache is not None else None)


def mirror_check(source, regions, context):
    """0.0 (flips off, said in one line) where mirroring changes what sets the classes apart
    (maskcls/mirror.py), else None (the pipeline's flip stays)."""
    keeps, same, mirrored = flips_keep_labels(source.all_paths(), [s.label for s in source.samples],
                                              regions or None)
    if keeps is not False:
        return None
    if context.is_main:
        print(f"note: no horizontal flips (--hflip 0): mirroring changes what sets these classes apart (their "
              f"mean images agree {mirrored:.2f} mirrored, {same:.2f} as they are); --hflip 0.5 flips anyway")
    return 0.0


def read_source(args):
    """The dataset entry over --data_dir, checked against the flags that need the competition layout."""
    split_seed = args.seed if args.split_seed is None else args.split_seed
    source = DATASETS.build(args.dataset, args.data_dir, val_ratio=args.val_ratio, seed=split_seed,
                            relabel=args.relabel, **DATASETS.values_for(args.dataset, vars(args)))
    if args.relabel and source.label_scheme != "mask":
        raise cli.UserError("--relabel applies to the competition layout only")
    if source.label_scheme != "mask":
        for flag, value in (("--head multitask", args.head == "multitask"), ("--age_bins", args.age_bins),
                            ("--age_head regression", args.age_head == "regression"),
                            ("--extra_data", args.extra_data), ("--pseudo_labels", args.pseudo_labels)):
            if value:
                raise cli.UserError(f"{flag} needs the competition's 18-class layout, not {args.dataset}")
    return source


def extra_images(args, source):
    """(Samples of --extra_data and --pseudo_labels, [(folder, its image paths)] for the face boxes)."""
    groups = [(source.root, source.all_paths())]
    extra = []
    for folder in args.extra_data or []:
        found = read_extra(folder)
        print(f"extra data: {len(found)} training images from {folder}")
        extra += found
        groups.append((folder, [s.path for s in found]))
    if args.pseudo_labels:
        pseudo = read_pseudo_labels(args.pseudo_labels, args.pseudo_data_dir, args.pseudo_threshold, source.classes,
                                    soft=args.pseudo_soft)
        soft = ", soft (each epoch a label drawn from an image's probabilities)" if args.pseudo_soft else ""
        print(f"pseudo labels: {len(pseudo)} eval images at top probability >= {args.pseudo_threshold}{soft}")
        extra += pseudo
        groups.append((args.pseudo_data_dir, [s.path for s in pseudo]))
    return extra, groups


def drop_unreadable(source, extra):
    """--skip_bad_images: decode every image once (small) and leave out, and count, those that fail."""
    def readable(path):
        try:
            load_image(path, min_size=(32, 32))
            return True
        except cli.UserError:
            return False
    paths = source.all_paths() + [s.path for s in extra]
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:  # PIL decodes without the GIL
        ok = dict(zip(paths, pool.map(readable, paths)))
    bad = [p for p in paths if not ok[p]]
    if bad:
        print(f"skipped {len(bad)} unreadable image(s), first: {bad[0]}")
    source.samples = [s for s, p in zip(source.samples, paths) if ok[p]]
    return [s for s in extra if ok[s.path]]


@dataclasses.dataclass(frozen=True)
class RunCache:
    """--cache: prepared images of every image the folds use, shared by all folds and workers (in
    RAM or a file, for the run; None where --cache auto finds them too large), and the prepared-image
    store that outlives the run (--cache_dir; None where it is off or cannot be written)."""
    images: object  # an images.ImageCache, or None
    slots: dict     # full image path -> its slot in `images`
    store: object = None  # an images.PreparedStore, or None


def store_folder(cache_dir, data_root):
    """Where the prepared images that outlive the run live: --cache_dir, 'auto' beside the data."""
    if cache_dir in (None, "none"):
        return None
    return os.path.join(data_root, STORE_NAME) if cache_dir == "auto" else cache_dir


@contextlib.contextmanager
def open_image_cache(data, kind, run_dir, store_dir=None, announce=True):
    """--cache for the run's lifetime (kind "auto": in RAM when it fits; the file of a disk cache
    removed at the end) and the store of --cache_dir: a RunCache, or None with --cache none."""
    if kind == "none":
        yield None
        return
    paths = data.all_paths()
    store = open_store(store_dir, len(paths), data.prepared, announce) if store_dir else None
    if kind == "auto":
        # under torchrun every process on this machine holds its own cache
        need = int(np.prod(cache_shape(len(paths), data.prepared))) * int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        free, where = shared_memory_free()
        kind = "ram" if need <= free / 2 else None
        if kind is None and announce:
            print(f"cache: off in memory (decoded images would take {need / 2**30:.1f} GiB, {where} has "
                  f"{free / 2**30:.1f} GiB free; --cache disk keeps them in a file)")
    images = None if kind is None else open_cache(len(paths), data.prepared, kind,
                                                  path=os.path.join(run_dir, f".image_cache{os.getpid()}.npy"))
    if announce:
        where = f"{kind}" if images is not None else "no in-run cache"
        kept = f"; prepared images kept across runs in {store.folder}" if store is not None else ""
        print(f"cache: {len(paths)} images at {data.prepared[0]}x{data.prepared[1]} in {where}{kept}")
    try:
        yield RunCache(images, {p: i for i, p in enumerate(paths)}, store)
    finally:
        if images is not None:
            images.close()
