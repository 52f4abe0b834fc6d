"""From an image file to a training batch: decoding, preparing, the shared image cache, the
torch Dataset of one side of a split, and the loaders.

- `load_image(path, min_size, region)`: upright RGB uint8, cropped to a face region, decoded at
  a reduced JPEG scale where that still leaves it large enough.
- `prepare_image(image, size)`: the one resize (antialiased) every path applies before the transform:
  cached or not, training, validation and inference see the same input.
- `RamCache` / `DiskCache` (`open_cache(count, size, kind)`): prepared images kept from the
  first epoch, shared by every DataLoader worker.
- `ImageDataset`: paths, labels and the transform of one side; `EpochSampler`: the training
  order as a function of (seed, epoch); `make_loader`: the DataLoader with its workers.

Example: python train.py --cache disk --num_workers 4
"""
import collections
import contextlib
import functools
import hashlib
import io
import os
import random
import signal

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps

from augmentation import seed_transform, split_for_device
from maskcls.cli import UserError

# Image work is per image and runs in parallel DataLoader worker processes: OpenCV's own thread
# pool there only oversubscribes the cores. Set here, in the parent, because changing the count
# inside a forked worker after the parent has used the pool deadlocks.
cv2.setNumThreads(1)

PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): a signal for this process when its parent dies
SOFT_STREAM = 0x50534F  # the random stream of --pseudo_soft's label draws, apart from the augmentation's
FLIP_STREAM = 0x464C50  # the device flips' stream (--prefetcher), apart from the sampler's
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


# ---------------------------------------------------------------- reading images
def load_image(path, min_size=None, region=None, data=None):
    """Read an image as an RGB uint8 array, upright (EXIF orientation applied).

    `region=(x1, y1, x2, y2)` crops it (pixel coordinates of the full-size upright image).
    `min_size=(H, W)` lets a JPEG decode at a reduced scale (PIL draft mode) that still leaves
    the image (or the region) at least that large: much faster when the model input is smaller
    than the photo. `data`: the file's bytes, already read (the path then only names it).
    """
    try:
        if data is None:
            with open(path, "rb") as f:
                data = f.read()
        with Image.open(io.BytesIO(data)) as img:
            orientation = img.getexif().get(0x0112, 1)
            rotated = orientation in (5, 6, 7, 8)  # stored turned by 90 degrees
            full_w, full_h = img.size[::-1] if rotated else img.size  # upright size
            if min_size is not None and img.format == "JPEG":
                height, width = min_size
                if region is not None:  # the region, not the whole photo, must stay that large
                    height = height * full_h / max(region[3] - region[1], 1)
                    width = width * full_w / max(region[2] - region[0], 1)
                want = (int(np.ceil(height)), int(np.ceil(width))) if rotated else \
                    (int(np.ceil(width)), int(np.ceil(height)))
                img.draft("RGB", want)
            image = decode_opencv(data, img, full_w, full_h) if orientation == 1 else None
            if image is None:
                image = to_rgb(ImageOps.exif_transpose(img))
    except Image.DecompressionBombError as err:  # not an OSError
        raise UserError(f"cannot read image {path}: {err}") from None
    except (OSError, ValueError, SyntaxError) as err:
        raise UserError(f"cannot read image {path}: {err}") from None
    if region is not None:
        sy, sx = image.shape[0] / full_h, image.shape[1] / full_w  # < 1 after a reduced decode
        x1, y1, x2, y2 = region
        image = image[int(y1 * sy):max(int(np.ceil(y2 * sy)), int(y1 * sy) + 1),
                      int(x1 * sx):max(int(np.ceil(x2 * sx)), int(x1 * sx) + 1)]
    return image


JPEG_SCALES = {1: cv2.IMREAD_COLOR, 2: cv2.IMREAD_REDUCED_COLOR_2, 4: cv2.IMREAD_REDUCED_COLOR_4,
               8: cv2.IMREAD_REDUCED_COLOR_8}


def decode_opencv(data, img, full_w, full_h):
    """The pixels of an upright colour JPEG (`img`: PIL's view of `data`, its header read and its
    draft scale chosen), decoded by OpenCV; None where PIL decodes it (another format or mode, no
    end-of-image marker, as in a file cut short, a scale OpenCV has no flag for). Both use
    libjpeg-turbo: the same pixels at every scale (checked on 200 sample photos, and in
    tests/test_dataset.py), in 0.76 ms against PIL's 0.93 for a 384x512 photo on one thread. PIL opened the file first, so its checks
    (format, decompression bombs) still apply. PNGs stay with PIL: OpenCV's decoder, on the one
    thread it has here, took 7.7 ms a sample PNG against PIL's 4.2."""
    if img.format != "JPEG" or img.mode != "RGB" or not data.endswith(b"\xff\xd9"):
        return None
    width, height = img.size  # after draft: the reduced size
    scale = next((s for s in JPEG_SCALES if -(-full_w // s) == width and -(-full_h // s) == height), None)
    if scale is None:
        return None
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), JPEG_SCALES[scale] | cv2.IMREAD_IGNORE_ORIENTATION)
    if pixels is None or pixels.shape != (height, width, 3):
        return None
    return cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB)


def to_rgb(img):
    """A PIL image as a writable RGB uint8 array. Integer greyscale of more than 8 bits (16-bit PNGs open
    as mode I;16 or I) is scaled to 8 bits at its real values: PIL's own convert("RGB") clips
    every value above 255 to white."""
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        values = np.asarray(img).astype(np.float64)
        depth = 65535.0 if img.mode.startswith("I;16") or values.max() <= 65535 else float(2**32 - 1)
        grey = np.clip(np.round(values * 255.0 / depth), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":  # float greyscale (TIFF): taken as 0..1 where it fits there, else as 0..255
        values = np.asarray(img).astype(np.float64)
        grey = values * 255.0 if values.max() <= 1.0 else values
        return np.repeat(np.clip(np.round(grey), 0, 255).astype(np.uint8)[..., None], 3, axis=2)
    # a writable array (np.asarray of a PIL image is read-only, and a pipeline that changes
    # nothing would hand it to torch as it is); convert("RGB") copies only when the mode differs
    return np.array(img if img.mode == "RGB" else img.convert("RGB"))


def prepare_image(image, size):
    """A decoded (cropped) image as the transform receives it: resized to `size` (H, W; see
    augmentation.prepared_size). Shrinking is antialiased bilinear (`shrink`: a direct bilinear
    resize of a photo would alias); enlarging is bicubic (area interpolation enlarges like
    nearest neighbour: an 8x8 digit became 4x4-pixel blocks); where one side shrinks and the
    other grows, the shrinking comes first. The cache holds exactly this, and the uncached path
    does the same, so `--cache` never changes what the model sees, and inference sees what
    validation saw."""
    height, width = size
    h, w = image.shape[:2]
    if (h, w) == (height, width):
        return image
    if height <= h and width <= w:
        return shrink(image, height, width)
    if height < h or width < w:  # one side shrinks: that side first
        image = shrink(image, min(height, h), min(width, w))
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_CUBIC)


def shrink(image, height, width):
    """An RGB uint8 image made smaller by antialiased bilinear interpolation (a triangle filter
    as wide as the scale: the filter of PIL's BILINEAR resize and of torchvision's Resize, within
    1 of PIL's values), by torch's uint8 kernel: 0.37 ms for a 384x512 photo to 224x224 on one
    thread, where OpenCV's area interpolation (the filter before) took 0.94-1.1 ms at these
    non-integer scales, as much as decoding the photo."""
    pixels = torch.from_numpy(np.require(image, requirements=("C", "W")))  # a view or PIL's read-only array: copied
    if pixels.ndim == 2:
        return shrink(image[..., None], height, width)[..., 0]
    batch = pixels.permute(2, 0, 1)[None]  # channels-last memory: the kernel's fast layout
    out = torch.nn.functional.interpolate(batch, size=(height, width), mode="bilinear", antialias=True,
                                          align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())


# ---------------------------------------------------------------- the image cache
def cache_shape(count, size):
    """(count, H, W, 3): the cache holds prepared images of `size` (H, W)."""
    return (count, *size, 3)


def shared_memory_free():
    """(bytes, where) free for shared-memory tensors: the smaller of the available RAM and the
    free space of /dev/shm, where they live (a docker container's is 64 MiB unless --shm-size)."""
    free, where = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "memory"
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as meminfo:
        free = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    with contextlib.suppress(OSError):
        stat = os.statvfs("/dev/shm")
        if stat.f_bavail * stat.f_frsize < free:
            free, where = stat.f_bavail * stat.f_frsize, "/dev/shm"
    return free, where


class ImageCache:
    """Decoded (and face-cropped) images, prepared once to a fixed size, shared by every
    DataLoader worker: the first epoch fills it, later epochs skip decoding. A subclass says
    where the arrays live (`_arrays`: images [count, H, W, 3] uint8 and a filled flag per slot)."""
    kind = None

    def __init__(self, count, size):
        self.shape = cache_shape(count, size)

    def _arrays(self):
        raise NotImplementedError

    def get(self, index):
        images, filled = self._arrays()
        return np.asarray(images[index]) if filled[index] else None

    def put(self, index, image):
        """Store a prepared image (prepare_image, at the cache's size) and return it."""
        assert image.shape == self.shape[1:], f"cache holds {self.shape[1:]} images, got {image.shape}"
        images, filled = self._arrays()
        images[index] = image  # a copy; image may be read-only
        filled[index] = True
        return image

    def close(self):
        pass


class RamCache(ImageCache):
    """Shared-memory arrays: every forked worker writes to and reads from the same pages."""
    kind = "ram"

    def __init__(self, count, size):
        super().__init__(count, size)
        need, free, where = int(np.prod(self.shape)), *shared_memory_free()
        if need > 0.8 * free:
            raise UserError(f"--cache ram needs {need / 2**30:.2f} GiB, {where} has {free / 2**30:.2f} GiB free; "
                            f"use --cache disk or a smaller --resize")
        self.images = torch.zeros(self.shape, dtype=torch.uint8).share_memory_()
        self.filled = torch.zeros(count, dtype=torch.bool).share_memory_()

    def _arrays(self):
        return self.images.numpy(), self.filled.numpy()


class DiskCache(ImageCache):
    """A memory-mapped file at `path`, for data larger than RAM (the OS keeps what fits in its
    page cache); removed by close()."""
    kind = "disk"

    def __init__(self, count, size, path):
        super().__init__(count, size)
        self.path = path
        size = int(np.prod(self.shape)) + count
        np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(size,))
        # reserve the space now: a sparse file on a full disk would fail later, with SIGBUS in a worker
        if hasattr(os, "posix_fallocate"):
            fd = os.open(path, os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, os.path.getsize(path))
            except OSError as err:
                os.remove(path)
                raise UserError(f"--cache disk needs {size / 2**30:.2f} GiB on the disk of {path}: {err.strerror}; "
                                f"free space there or use --cache none") from None
            finally:
                os.close(fd)
        self._opened = None  # opened per process: a memmap must not be pickled into workers

    def _arrays(self):
        if self._opened is None or self._opened[0] != os.getpid():
            flat = np.load(self.path, mmap_mode="r+")
            count = self.shape[0]
            self._opened = (os.getpid(), flat[:-count].reshape(self.shape), flat[-count:])
        return self._opened[1:]

    def __getstate__(self):
        return {**self.__dict__, "_opened": None}

    def close(self):
        if os.path.exists(self.path):
            os.remove(self.path)


class PreparedStore:
    """Prepared images that outlive the run: one file per image and preparation, named by a hash of
    the photo's bytes and of everything that changes the prepared pixels (the size, the face crop
    region, PREPARE_VERSION), in a folder beside the data (`<data folder>/.prepared_cache`). The
    first run that needs an image writes it (a .npy file); every later run, and inference, reads it
    (one read into the array's own buffer) instead of decoding the photo. A changed photo has
    another hash: it is prepared again. Each entry is written to a temporary name and renamed, so
    runs filling it at once never see half an entry; a full disk (or a folder that cannot be
    written) stops the writing, not the run."""

    def __init__(self, folder):
        self.folder = folder
        self.writing = True

    def key(self, data, size, region):
        # SHA-256, which CPUs with SHA extensions hash at 0.05 ms per 94 KB photo (BLAKE2b 0.10 ms)
        digest = hashlib.sha256(data)
        digest.update(repr((PREPARE_VERSION, tuple(size), None if region is None else tuple(map(int, region))))
                      .encode())
        name = digest.hexdigest()[:40]
        return os.path.join(self.folder, name[:2], f"{name}.npy")

    def get(self, path, size):
        """The prepared image stored at `path` (a key), or None (missing, or not exactly the .npy of
        a uint8 image of `size`: a damaged entry is prepared again). One read into the array's own
        buffer: 0.05 ms for a 224x224 entry, where np.load's memory map and copy took 0.14 ms."""
        header = npy_header(tuple(size))
        buffer = bytearray(len(header) + int(np.prod(size)) * 3 + 1)  # one byte over: a longer file is caught
        try:
            with open(path, "rb") as f:
                got = f.readinto(buffer)
        except OSError:
            return None
        if got != len(buffer) - 1 or buffer[:len(header)] != header:
            return None
        return np.frombuffer(buffer, np.uint8, count=got - len(header), offset=len(header)).reshape(*size, 3)

    def put(self, path, image):
        if not self.writing:
            return
        tmp = f"{path}.tmp{os.getpid()}"
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(tmp, "wb") as f:  # a .npy file (np.load reads it), its header the one get() expects
                f.write(npy_header(tuple(image.shape[:2])))
                f.write(np.ascontiguousarray(image, dtype=np.uint8).tobytes())
            os.replace(tmp, path)
        except OSError:  # a full disk (numpy says "N requested and M written"), no permission...
            with contextlib.suppress(OSError):
                os.remove(tmp)
            self.writing = False  # this process writes no more; reading goes on

    def read(self, path, size, region):
        """(prepared image, whether it came from the store): the file read once, its bytes hashed
        and, on a miss, decoded and prepared (then stored)."""
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as err:
            raise UserError(f"cannot read image {path}: {err.strerror}") from None
        key = self.key(data, size, region)
        image = self.get(key, size)
        if image is not None:
            return image, True
        image = prepare_image(load_image(path, size, region, data=data), size)
        self.put(key, image)
        return image, False


PREPARE_VERSION = 3  # bump when prepare_image or load_image changes the pixels: old entries are then unused
STORE_NAME = ".prepared_cache"  # beside the data, like the face box cache; hidden from the dataset readers


@functools.lru_cache(maxsize=None)
def npy_header(size):
    """The bytes before the pixels of the .npy file np.save writes for a uint8 image of `size` (H, W)."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": "|u1", "fortran_order": False, "shape": (*size, 3)})
    return out.getvalue()


def open_store(folder, images, size, announce=True):
    """A PreparedStore at `folder`, or None (with one line) where it cannot be written or the
    disk lacks room for `images` more prepared images of `size`."""
    if folder is None:
        return None
    need = images * (int(np.prod(size)) * 3 + 128)
    try:
        os.makedirs(folder, exist_ok=True)
        probe = os.path.join(folder, f".probe{os.getpid()}")
        with open(probe, "wb"):
            pass
        os.remove(probe)
        stat = os.statvfs(folder)
    except OSError as err:
        if announce:
            print(f"note: no prepared-image cache at {folder} ({err.strerror}); --cache_dir DIR puts it elsewhere")
        return None
    if stat.f_bavail * stat.f_frsize < need:
        if announce:
            print(f"note: no prepared-image cache at {folder}: it may need {need / 2**30:.2f} GiB, "
                  f"{stat.f_bavail * stat.f_frsize / 2**30:.2f} GiB are free; images are decoded every run")
        return None
    return PreparedStore(folder)


def open_cache(count, size, kind="ram", path=None):
    """An empty cache of `count` prepared images of `size` (H, W): in shared memory, or in a file."""
    if kind == "ram":
        return RamCache(count, size)
    if kind == "disk":
        return DiskCache(count, size, path)
    raise UserError(f"unknown cache kind {kind!r}; expected ram or disk")


# ---------------------------------------------------------------- one side of a split
class ImageDataset(torch.utils.data.Dataset):
    """One side of a split: paths and labels, and the transform of that side only.

    `prepare_to` (H, W) (augmentation.prepared_size): each image is decoded (at a reduced JPEG
    scale where that still leaves it large enough), cropped to its region and resized to it
    (prepare_image) before the transform; the cache, when given, keeps these prepared images.
    None: the transform gets the decoded photo as it is.
    """

    def __init__(self, paths, labels, transform, prepare_to=None, regions=None, cache=None, cache_slots=None,
                 soft=None, ages=None, targets=None, store=None):
        assert len(paths) == len(labels), "one label per image"
        assert ages is None or len(ages) == len(paths), "one age (or -1) per image"
        assert soft is None or len(soft) == len(paths), "one soft label (or None) per image"
        assert regions is None or len(regions) == len(paths), "one crop region per image"
        assert cache is None or prepare_to is not None, "a cache holds prepared images: give prepare_to"
        self.paths, self.labels = list(paths), list(labels)
        self.transform = transform
        self.prepare_to = None if prepare_to is None else tuple(prepare_to)
        self.regions = regions  # face crops, or None for the whole photo
        self.cache = cache      # an ImageCache, or None
        self.cache_slots = list(range(len(self.paths))) if cache_slots is None else list(cache_slots)
        self.store = store if prepare_to is not None else None  # a PreparedStore: prepared images across runs
        # --pseudo_soft: per image None or class probabilities; in training (an augmentation seed
        # given) the label is drawn from them with that seed, so the expected loss is the loss
        # against the soft target, every criterion and mixer still gets a class index, and the
        # draw depends on (seed, epoch, index) only, like the augmentation
        self.soft = None if soft is None or all(p is None for p in soft) else \
            [None if p is None else np.cumsum(p) for p in soft]
        # --age_head regression: the target is (label, age in years or -1), a [2] tensor
        self.ages = None if ages is None else [int(a) for a in ages]
        # --soft_oof: the target is (label, C probabilities), a [1 + C] tensor; an image without
        # soft targets (None) gets its label's one-hot
        assert targets is None or ages is None, "soft targets and ages share the target's columns"
        self.targets = None if targets is None or all(t is None for t in targets) else list(targets)
        self.num_classes = None if self.targets is None else len(next(t for t in self.targets if t is not None))

    def __len__(self):
        return len(self.paths)

    def read(self, index):
        """The decoded, cropped and prepared image, from the cache when it holds it."""
        slot = self.cache_slots[index]
        image = self.cache.get(slot) if self.cache is not None else None
        if image is None:
            region = None if self.regions is None else self.regions[index]
            if self.prepare_to is None:
                return load_image(self.paths[index], None, region)
            if self.store is not None:
                image, _ = self.store.read(self.paths[index], self.prepare_to, region)
            else:
                image = prepare_image(load_image(self.paths[index], self.prepare_to, region), self.prepare_to)
            if self.cache is not None:
                image = self.cache.put(slot, image)
        return image

    def __getitem__(self, item):
        """`item` is an index, or (index, augmentation seed) from an EpochSampler."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        label = self.labels[index]
        if seed is not None:
            seed_transform(self.transform, seed)
            if self.soft is not None and self.soft[index] is not None:
                draw = np.random.default_rng([int(seed) % 2**32, SOFT_STREAM]).random() * self.soft[index][-1]
                label = int(np.searchsorted(self.soft[index], draw, side="right"))
        if self.ages is not None:
            label = torch.tensor([label, self.ages[index]])
        elif self.targets is not None:
            soft = self.targets[index]
            soft = torch.nn.functional.one_hot(torch.tensor(label), self.num_classes).float() if soft is None \
                else torch.as_tensor(soft, dtype=torch.float32)
            label = torch.cat([torch.tensor([float(label)]), soft])
        return self.transform(image=self.read(index))["image"], label


# ---------------------------------------------------------------- loaders
class EpochSampler(torch.utils.data.Sampler):
    """The training order, as a pure function of (seed, epoch): a shuffle, or class-balanced
    draws with replacement (`weights`), sharded over `world_size` ranks under torchrun.

    Each index comes with its own augmentation seed, so what a sample looks like depends on
    (seed, epoch, index) only: not on the worker count, the worker that loads it, or whether
    the run was interrupted and resumed (`set_epoch` before each epoch).
    """

    def __init__(self, count, seed=0, weights=None, rank=0, world_size=1, drop_last=False):
        self.count, self.seed, self.weights = count, seed, weights
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return self.count // self.world_size if self.drop_last else -(-self.count // self.world_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        if self.weights is None:
            order = torch.randperm(self.count, generator=generator)
        else:
            order = torch.multinomial(torch.as_tensor(self.weights, dtype=torch.double), self.count,
                                      replacement=True, generator=generator)
        sample_seeds = torch.randint(0, 2**31 - 1, (self.count,), generator=generator)
        total = len(self) * self.world_size
        picks = torch.arange(total) % self.count  # pad by wrapping (like DistributedSampler)
        for position in picks[self.rank::self.world_size].tolist():
            yield int(order[position]), int(sample_seeds[position])


class DeviceLoader:
    """The GPU path (train.py --prefetcher, timm's prefetcher idea): the workers only decode and
    augment, and hand over uint8 batches (augmentation.split_for_device); here each batch goes to
    the device as it is (a quarter of float32's bytes), becomes float and is normalized there, and
    is flipped there with probability `hflip` per image. The flips depend on (seed, epoch, rank,
    batch) alone (the sampler's epoch), so a resumed run flips as an uninterrupted one. Iterates
    like the loader it wraps ([images, labels, ...] with the images on the device, the rest as the
    loader gives it) and passes every other attribute through."""

    def __init__(self, loader, device, mean, std, hflip=0.0, seed=0):
        self.loader, self.device, self.hflip, self.seed = loader, torch.device(device), hflip, seed
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)
        self.inv_std = 1.0 / torch.tensor(std, dtype=torch.float32, device=self.device)

    def wrap(self, loader):
        """Another loader over the same (already split) dataset, normalized as this one, unflipped."""
        out = DeviceLoader.__new__(DeviceLoader)
        out.__dict__.update({**self.__dict__, "loader": loader, "hflip": 0.0})
        out.__dict__.pop("mapped", None)  # its own loader's buffers
        return out

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)

    def normalize(self, images):
        """uint8 [N, H, W, C] -> float32 [N, C, H, W], normalized, in channels-last memory. The
        per-channel mean and scale are tiled along a row (W x C values), so the arithmetic runs
        over contiguous rows: 0.7 ms for 32 images of 224x224 on 2 cores, where broadcasting over
        the last axis of 3 took 8 ms."""
        n, h, w, c = images.shape
        rows = images.reshape(n * h, w * c).float()
        rows.sub_(self.mean.repeat(w)).mul_(self.inv_std.repeat(w))
        return rows.view(n, h, w, c).permute(0, 3, 1, 2)

    def __iter__(self):
        sampler = getattr(self.loader, "sampler", None)
        generator = torch.Generator().manual_seed(
            (self.seed * 100_003 + getattr(sampler, "epoch", 0)) * 1_009 + getattr(sampler, "rank", 0) + FLIP_STREAM)
        collate = getattr(self.loader, "collate_fn", None)
        # the reused buffers' mappings, kept across epochs: torch maps a shared buffer it still
        # holds only once (reductions.rebuild_storage_fd), so its pages are not faulted in again
        if isinstance(collate, ReusedBatches) and self.device.type == "cpu" and "mapped" not in self.__dict__:
            self.mapped = collections.deque(maxlen=collate.count * self.loader.num_workers)
        mapped = self.__dict__.get("mapped")
        for images, *rest in self.loader:  # uint8 [N, H, W, C] (augmentation.ToHWCTensor)
            if mapped is not None:  # on a GPU the pinned copy is what arrives here
                mapped.append(images.untyped_storage())
            images = images.to(self.device, non_blocking=True)
            if self.hflip:  # on the uint8 batch, a quarter of the bytes; the same pixels as after normalizing
                images = flip_images(images, torch.rand(len(images), generator=generator) < self.hflip)
            yield [self.normalize(images), *rest]


def flip_images(images, flip):
    """uint8 [N, H, W, C] with the images where `flip` (a CPU bool [N]) holds mirrored left to right.
    On a CPU in place, one OpenCV flip per image: 0.2 ms for 32 images of 224x224, where torch's
    flip and where over the batch took 5 ms of the main process's time between two steps."""
    if images.device.type != "cpu" or not images.is_contiguous() or images.shape[-1] > 4:
        return torch.where(flip.to(images.device, non_blocking=True).view(-1, 1, 1, 1), images.flip(2), images)
    pixels = images.numpy()
    for i in flip.nonzero().flatten().tolist():
        cv2.flip(pixels[i], 1, dst=pixels[i])
    return images


class ReusedBatches:
    """A DataLoader worker's collate_fn for uint8 image batches (the --prefetcher path): each
    batch's images are stacked into one of a few shared-memory buffers the worker keeps and
    reuses in turn, instead of the fresh shared-memory segment torch's default collate makes per
    batch, whose every page the kernel then zero-fills on first touch (32 images of 224x224:
    3.7-4.1 ms a batch into a fresh segment, 0.4 ms into a reused one). Everything else in the
    sample is collated as by default; outside a worker, or for other batches, it is the default.

    A buffer is written again only after the main process is done with it: a worker has at most
    `prefetch_factor` batches in flight beyond the one the main process is reading (the
    DataLoader hands out tasks in turn and no more than prefetch_factor x workers at once), and
    it cycles through `prefetch_factor + 2` buffers. So the batch must be used up (copied,
    normalized) before the next one is taken, as DeviceLoader does: only the DataLoader a
    DeviceLoader wraps gets this collate_fn (device_loader), and nothing else iterates it."""

    def __init__(self, prefetch_factor):
        self.count, self.taken = prefetch_factor + 2, 0
        self.buffers = [None] * self.count

    def __call__(self, samples):
        if torch.utils.data.get_worker_info() is None or not isinstance(samples[0], (tuple, list)):
            return torch.utils.data.default_collate(samples)
        images = [sample[0] for sample in samples]
        first = images[0]
        if not isinstance(first, torch.Tensor) or first.dtype != torch.uint8 \
                or any(image.shape != first.shape for image in images):
            return torch.utils.data.default_collate(samples)
        slot = self.taken % self.count
        self.taken += 1
        buffer = self.buffers[slot]
        if buffer is None or buffer.shape[1:] != first.shape or len(buffer) < len(images):
            buffer = self.buffers[slot] = torch.empty((len(images), *first.shape), dtype=torch.uint8).share_memory_()
        batch = torch.stack(images, out=buffer[:len(images)])
        return [batch, *torch.utils.data.default_collate([sample[1:] for sample in samples])]


def device_loader(loader, transform, device, seed=0):
    """`loader` wrapped in a DeviceLoader for the `transform` it was built with, after its
    dataset's transform became the CPU part; the loader unchanged where the transform cannot split."""
    split = split_for_device(transform)
    if split is None:
        return loader
    cpu, mean, std, hflip = split
    loader.dataset.transform = cpu
    if loader.num_workers > 0 and loader.collate_fn is torch.utils.data.default_collate:
        loader.collate_fn = ReusedBatches(loader.prefetch_factor)
    return DeviceLoader(loader, device, mean, std, hflip, seed)


def die_with_parent(parent_pid):
    """Linux: this process gets SIGKILL the moment its parent dies. A DataLoader worker
    otherwise notices a killed parent only at its next status check (up to 5 s later), and
    until then holds the dead run's resources (its shared memory, an open cache file)."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    except (OSError, AttributeError):  # not Linux: the worker's own status check remains
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def seed_worker(worker_id, parent_pid=None):
    """Per DataLoader worker: one intra-op thread (workers would otherwise oversubscribe the
    cores; OpenCV's count is set once at import, see above), the global RNGs seeded from the
    loader's seed, and no life beyond its parent's (die_with_parent)."""
    if parent_pid is not None:
        die_with_parent(parent_pid)
    torch.set_num_threads(1)
    seed = torch.initial_seed() % 2**32  # the loader's base seed + worker id
    np.random.seed(seed)
    random.seed(seed)


def make_loader(dataset, batch_size, num_workers, device, shuffle=False, drop_last=False, seed=0, sampler=None):
    """A DataLoader with persistent workers, one thread each; pinned memory on CUDA.
    `shuffle` without a sampler means an EpochSampler seeded with `seed`."""
    if shuffle and sampler is None:
        sampler = EpochSampler(len(dataset), seed)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=False, drop_last=drop_last, sampler=sampler,
        num_workers=num_workers, pin_memory=torch.device(device).type == "cuda",
        worker_init_fn=functools.partial(seed_worker, parent_pid=os.getpid()) if num_workers > 0 else None,
        persistent_workers=num_workers > 0,
        # its own generator: starting workers must not draw from the global RNG (dropout's), or a
        # resumed run, whose workers start one epoch later, would drift from an uninterrupted one
        generator=torch.Generator().manual_seed(seed))
