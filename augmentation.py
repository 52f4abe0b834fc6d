"""Augmentation registry: albumentations 2.x pipelines for training, and the one eval pipeline.

An entry is a factory `(resize, mean, std, **kwargs) -> albumentations.Compose` for the TRAIN
side; every pipeline ends with Normalize + ToTensorV2 so it returns a CHW float tensor.
Validation and inference always use `eval_transform` (resize + normalize), so a training
augmentation can never leak into validation.

Add your own in this file; an option it declares becomes a flag of train.py (default and type
from the factory's signature) and is recorded in config.json:

    @AUGMENTATIONS.register(options={"clahe_clip": "CLAHE's contrast limit"})
    def MyAugmentation(resize, mean, std, clahe_clip=4.0, **kwargs):
        return A.Compose([A.Resize(*resize), A.CLAHE(clip_limit=clahe_clip, p=1), *to_tensor(mean, std)])

    python train.py --augmentation MyAugmentation --clahe_clip 2

Example: python train.py --augmentation AlbuAugmentation --resize 256,192
"""
import functools
import math
import random
import re

import albumentations as A
import numpy as np
import torch
from albumentations.pytorch import ToTensorV2
from PIL import Image

from maskcls import cli
from maskcls.cli import UserError
from maskcls.registry import Option, Registry

# The knobs every pipeline may take, with timm's meanings (train.py's --hflip, --vflip, --scale,
# --ratio, --color_jitter): options shared by the entries, each passed to an entry whose signature
# names it; not given (None), the entry's own default stays.
_SHARE = cli.number(float, 0, 1)
KNOBS = {
    "hflip": Option("horizontal flip probability; default: the pipeline's own, 0 where train.py's mirror check "
                    "finds that mirroring changes the class (maskcls/mirror.py)", type=_SHARE, default=None),
    "vflip": Option("vertical flip probability; default: the pipeline's own", type=_SHARE, default=None),
    "scale": Option("random resized crop: area range; default: the pipeline's own (timm's 0.08,1)",
                    type=cli.parse_floats, default=None, metavar="MIN,MAX", words=True),
    "ratio": Option("random resized crop: aspect range; default: the pipeline's own (timm's 0.75,1.33)",
                    type=cli.parse_floats, default=None, metavar="MIN,MAX", words=True),
    "color_jitter": Option("brightness/contrast(/saturation) jitter; default: the pipeline's own",
                           type=cli.number(float, 0), default=None),
}
AUGMENTATIONS = Registry("augmentation", shared=KNOBS)


def to_tensor(mean, std):
    """The common tail: scale to [0, 1], normalize with the dataset's mean/std, HWC -> CHW tensor."""
    return [A.Normalize(mean=mean, std=std, max_pixel_value=255.0), ToTensorV2()]


def eval_transform(resize, mean, std):
    """Validation and inference: resize + normalize, nothing random."""
    return A.Compose([A.Resize(*resize), *to_tensor(mean, std)])


def train_transform(name, resize, mean, std, values=None):
    """The training pipeline `name` (registered, or a factory passed in) at input size `resize`, with
    its own options and the shared KNOBS it takes from `values` (the parsed flags or a run's config), and
    --aa (timm's RandAugment / AugMix / TrivialAugment) and --reprob (random erasing) added in
    front of its Normalize step where given."""
    values = values or {}
    options = AUGMENTATIONS.values_for(name, values)  # its own options and the KNOBS it takes
    if values.get("aa") and "color_jitter" in options and options["color_jitter"] is None:
        options["color_jitter"] = 0.0  # as timm: auto-augment replaces the colour jitter unless it is asked for
    transform = AUGMENTATIONS.build(name, resize=resize, mean=mean, std=std, **options)
    extra = []
    if values.get("aa"):
        extra.append(TimmAutoAugment(values["aa"], resize, mean))
    if values.get("reprob"):
        # timm's RandomErasing defaults: area 2%-33%, aspect 0.3-3.3, per-pixel random fill
        extra.append(A.Erasing(scale=(0.02, 1 / 3), ratio=(0.3, 3.3), fill="random", p=values["reprob"]))
    return insert_before_normalize(transform, extra) if extra else transform


def insert_before_normalize(transform, steps):
    """The pipeline with `steps` placed right before its A.Normalize (at its end if it has none)."""
    current = list(transform.transforms)
    at = next((i for i, t in enumerate(current) if isinstance(t, A.Normalize)), len(current))
    return A.Compose(current[:at] + list(steps) + current[at:])


def split_for_device(transform):
    """The prefetcher's path (train.py --prefetcher): the pipeline's worker part, and what moves to
    the device. (cpu transform, mean, std, hflip): the CPU part is `transform` without its closing
    A.Normalize (its mean/std, in 0-255 pixel units, come back to be applied on the device) and
    without a top-level A.HorizontalFlip (its probability comes back: the device flips the batch
    after the other steps, the same distribution where they are left-right symmetric, as every
    bundled pipeline's are); it ends in ToHWCTensor, which hands over uint8 H x W x C tensors.
    None when the pipeline does not end with A.Normalize + ToTensorV2 (it keeps normalizing on
    the CPU)."""
    steps = list(getattr(transform, "transforms", []))
    if len(steps) < 2 or not isinstance(steps[-1], ToTensorV2) or not isinstance(steps[-2], A.Normalize) \
            or steps[-2].normalization != "standard" or steps[-2].p < 1:
        return None
    normalize = steps[-2]
    flips = horizontal_flips(transform)
    if len(flips) > 1:
        return None
    scale = normalize.max_pixel_value
    mean = [m * scale for m in np.broadcast_to(normalize.mean, 3)]
    std = [d * scale for d in np.broadcast_to(normalize.std, 3)]
    kept = [t for t in steps[:-2] if t not in flips] + [ToHWCTensor()]
    return A.Compose(kept), mean, std, flips[0].p if flips else 0.0


def horizontal_flips(transform):
    """The top-level A.HorizontalFlip steps of a pipeline (the prefetcher moves them to the
    device; the mirror check turns them off where mirroring changes the class)."""
    return [t for t in getattr(transform, "transforms", []) if type(t) is A.HorizontalFlip]


class ToHWCTensor(ToTensorV2):
    """The workers' last step on the prefetcher's path: the uint8 image as a tensor in its own
    H x W x C layout. A batch of them is stacked with one plain copy per image (a C x H x W view
    took a strided copy: 3.2 ms a batch of 32 at 224x224 against 0.13 ms) and arrives channels-last,
    the layout bf16 convolutions want (images.DeviceLoader)."""

    def apply(self, img, **params):
        return torch.from_numpy(np.ascontiguousarray(img if img.ndim == 3 else img[..., None]))


class TimmAutoAugment(A.ImageOnlyTransform):
    """timm's auto-augment policies on an albumentations pipeline: `rand-m9-mstd0.5` (RandAugment),
    `augmix-m5-w4-d2` (AugMix), `original` / `v0` (AutoAugment), or `trivial` (TrivialAugment
    Wide, torchvision's). They draw from Python's, NumPy's and torch's global RNGs: here those
    are seeded from the pipeline's own stream for each image (and restored), so what an image
    looks like still depends on (seed, epoch, image) alone."""

    def __init__(self, config, input_size, mean, p=1.0):
        super().__init__(p=p)
        self.config = config
        self.policy = auto_augment_policy(config, input_size, mean)

    def apply(self, img, seed=0, **params):
        saved = random.getstate(), np.random.get_state()
        random.seed(seed)
        np.random.seed(seed)
        try:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                return np.array(self.policy(Image.fromarray(img)))  # writable: ToTensorV2 may get it next
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])

    def get_params(self):
        return {"seed": self.py_random.getrandbits(32)}

    def get_transform_init_args_names(self):
        return ("config",)


# --aa strings, checked part by part: timm skips a part it cannot read (rand-m9-x, augmix-foo,
# original-mstd) without a word, so a typo trained without the augmentation it asked for
AA_PARTS = {"rand": {"m": r"\d+", "n": r"\d+", "p": r"[\d.]+", "mstd": r"[\d.]+", "mmax": r"\d+",
                     "inc": r"[01]", "t": r"[A-Za-z0-9]+"},
            "augmix": {"m": r"\d+", "w": r"\d+", "d": r"-?\d+", "a": r"[\d.]+", "b": r"[01]",
                       "mstd": r"[\d.]+"},
            "auto": {"mstd": r"[\d.]+"}}
AA_POLICIES = ("original", "originalr", "v0", "v0r", "3a")  # timm's AutoAugment policies


def check_aa_policy(config):
    """One line for a --aa string with an unknown or malformed part (timm ignores them)."""
    family, *parts = config.split("-")
    kind = family if family in ("rand", "augmix") else "auto" if family in AA_POLICIES else None
    if config == "trivial":
        return
    if kind is None:
        raise UserError(f"--aa {config!r}: starts with {family!r}; expected rand-..., augmix-..., "
                        f"{', '.join(AA_POLICIES)} or trivial (e.g. rand-m9-mstd0.5, augmix-m5-w4-d2)")
    allowed = AA_PARTS[kind]
    for part in parts:
        # the longest key first: mstd and mmax before m
        key = next((k for k in sorted(allowed, key=len, reverse=True) if part.startswith(k)), None)
        if key is None or not re.fullmatch(allowed[key], part[len(key):]):
            raise UserError(f"--aa {config!r}: cannot read the part {part!r}; {family} takes "
                            f"{', '.join(k + '<' + ('name' if k == 't' else 'number') + '>' for k in allowed)}")


def auto_augment_policy(config, input_size, mean):
    """The PIL transform timm's create_transform would build for --aa `config`."""
    check_aa_policy(config)
    from timm.data.auto_augment import augment_and_mix_transform, auto_augment_transform, rand_augment_transform
    hparams = {"translate_const": int(min(input_size) * 0.45),
               "img_mean": tuple(min(255, round(255 * x)) for x in mean)}
    try:
        if config == "trivial":
            from torchvision.transforms import TrivialAugmentWide
            return TrivialAugmentWide()
        if config.startswith("rand"):
            return rand_augment_transform(config, hparams)
        if config.startswith("augmix"):
            return augment_and_mix_transform(config, {**hparams, "translate_pct": 0.3})
        return auto_augment_transform(config, hparams)
    except (AssertionError, KeyError, ValueError, IndexError) as err:
        raise UserError(f"--aa {config!r} is not a timm auto-augment string (e.g. rand-m9-mstd0.5, "
                        f"augmix-m5-w4-d2, original, trivial): {err or type(err).__name__}") from None




@AUGMENTATIONS.register()
def BaseAugmentation(resize, mean, std, **kwargs):
    """No augmentation: resize + normalize (the eval pipeline)."""
    return eval_transform(resize, mean, std)


@AUGMENTATIONS.register()
def AlbuAugmentation(resize, mean, std, hflip=0.5, vflip=0.0, color_jitter=None, **kwargs):
    """Photometric and mild geometric noise; resize first so every later step runs small. The
    default for the competition layout: faces are left-right symmetric, so they flip."""
    jitter = 0.2 if color_jitter is None else color_jitter
    return A.Compose([
        A.Resize(*resize),
        *([A.HorizontalFlip(p=hflip)] if hflip else []),  # labels do not change
        *([A.VerticalFlip(p=vflip)] if vflip else []),
        # shift-scale-rotate, kept mild: the face stays centred as in the real photos
        A.Affine(translate_percent=(-0.06, 0.06), scale=(0.9, 1.1), rotate=(-15, 15), p=0.5),
        A.RandomBrightnessContrast(brightness_limit=jitter, contrast_limit=jitter, p=0.5),
        # small hue shift: mask colour varies, but hair and skin colour carry age and gender cues
        A.HueSaturationValue(hue_shift_limit=10, sat_shift_limit=20, val_shift_limit=10, p=0.3),
        A.GaussNoise(std_range=(0.02, 0.08), p=0.2),
        A.GaussianBlur(blur_limit=(3, 5), p=0.1),
        A.CoarseDropout(num_holes_range=(1, 4), hole_height_range=(0.05, 0.12),
                        hole_width_range=(0.05, 0.12), p=0.3),
        *to_tensor(mean, std),
    ])


@AUGMENTATIONS.register()
def TimmAugmentation(resize, mean, std, hflip=0.5, vflip=0.0, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3),
                     color_jitter=0.4, **kwargs):
    """timm's training pipeline (timm.data.create_transform with train.py's defaults), in
    albumentations: a random resized crop (area `scale`, aspect `ratio`), flips, colour jitter
    (brightness, contrast, saturation by `color_jitter`; timm turns it off under --aa, so does
    train_transform's caller). The default for a folder-per-class dataset."""
    return A.Compose([
        A.RandomResizedCrop(size=tuple(resize), scale=tuple(scale), ratio=tuple(ratio)),
        *([A.HorizontalFlip(p=hflip)] if hflip else []),
        *([A.VerticalFlip(p=vflip)] if vflip else []),
        *([A.ColorJitter(brightness=color_jitter, contrast=color_jitter, saturation=color_jitter, hue=0, p=1.0)]
          if color_jitter else []),
        *to_tensor(mean, std),
    ])


# First steps that bring the whole image to a size of their own: a pipeline that starts with one
# works the same on a photo and on the same photo prepared smaller (images.prepare_image), so
# its images can be prepared and cached. One that starts otherwise (A.CenterCrop(320, 256): pixel
# units of the photo) gets the full-size photo, decoded every epoch.
RESIZING_FIRST = (A.Resize, A.RandomResizedCrop, A.RandomSizedCrop, A.LongestMaxSize, A.SmallestMaxSize)
# Prepared images are this much larger than the input where the first step crops or zooms
# (RandomResizedCrop, ...), so its crops keep their detail; a plain Resize to the input size
# gets images at exactly that size (one resampling, not two).
HEADROOM = 1.125


def resizes_first(transform):
    """True when an albumentations pipeline's first step resizes the whole image (RESIZING_FIRST)."""
    steps = getattr(transform, "transforms", None)
    return bool(steps) and isinstance(steps[0], RESIZING_FIRST)


def with_headroom(size):
    return tuple(int(math.ceil(s * HEADROOM)) for s in size)


def prepared_size(transform, input_size):
    """(H, W) to which images are prepared (and cached) before `transform`, for model input
    `input_size`: the input size itself when the pipeline starts with A.Resize to it, HEADROOM
    times it for other resizing first steps, None when it does not resize first (full photos)."""
    if not resizes_first(transform):
        return None
    first, size = transform.transforms[0], tuple(input_size)
    return size if isinstance(first, A.Resize) and (first.height, first.width) == size else with_headroom(size)


def seed_transform(transform, seed):
    """Seed an albumentations pipeline so that what it does depends on `seed` only.

    albumentations 2.x draws from each transform's own generators, not the global RNGs, and its
    `set_random_seed` gives every transform of a Compose the same seed: their streams are then
    identical, so the "apply?" draws of all transforms coincide (two HorizontalFlip(p=0.5) in a
    row always cancel; every p=0.5 step fires together). Here one fresh pair of generators is
    shared by the whole pipeline, so each transform takes the next draws of one stream: the
    decisions are independent, and reseeding per sample costs one generator pair, not one per
    transform.
    """
    seed = int(seed) % 2**32
    rng, py_random = np.random.default_rng(seed), random.Random(seed)
    stack = [transform]
    while stack:
        node = stack.pop()
        if hasattr(node, "random_generator"):
            node.random_generator, node.py_random = rng, py_random
        stack.extend(getattr(node, "transforms", ()))


# ---------------------------------------------------------------- test-time augmentation
# Views of an already resized and normalized NCHW batch; the softmax is averaged over the
# original and every view asked for (`--tta hflip,zoom`).
TTA_VIEWS = Registry("TTA view")


@TTA_VIEWS.register("hflip")
def hflip(images):
    return images.flip(-1)


@TTA_VIEWS.register("zoom")
def zoom(images, scale=1.1):
    """Scale up by 10% and crop the centre back to the input size."""
    height, width = images.shape[-2:]
    big = torch.nn.functional.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
    top, left = (big.shape[-2] - height) // 2, (big.shape[-1] - width) // 2
    return big[..., top:top + height, left:left + width]


@TTA_VIEWS.register("zoom_hflip")
def zoom_hflip(images):
    return hflip(zoom(images))


def scaled(images, factor):
    """The batch seen at `factor` times its scale, at its own size: larger than 1, the centre of
    the enlarged image (as `zoom`); smaller, the shrunk image in the middle, its border
    reflected outward (a frame of the image, not of black)."""
    if factor >= 1:
        return zoom(images, factor)
    height, width = images.shape[-2:]
    size = (max(1, round(height * factor)), max(1, round(width * factor)))
    small = torch.nn.functional.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
    top, left = (height - small.shape[-2]) // 2, (width - small.shape[-1]) // 2
    pad = (left, width - small.shape[-1] - left, top, height - small.shape[-2] - top)
    mode = "reflect" if min(small.shape[-2:]) > max(pad) else "replicate"
    return torch.nn.functional.pad(small, pad, mode=mode)


SCALE_VIEW = re.compile(r"^scale(\d+(?:\.\d+)?)(_hflip)?$")
SCALE_RANGE = (0.5, 2.0)


class TTAViews(list):
    """The view functions of a --tta text, and the weight of each prediction (the original
    first): `weights` None averages them equally."""
    weights = None


def parse_tta(text, weights=None):
    """'hflip,zoom,scale0.9,scale1.15_hflip' -> the view functions (an empty text or 'none': no
    TTA); `scale<f>` sees the image at f times its scale (0.5-2), `_hflip` mirrors it too.
    `weights` (w_original, w_view1, ...): the weight of each prediction in the average, the
    original's first (normalised; default equal). Unknown names, a weight per view missing or a
    negative or non-finite weight fail in one line."""
    names = [n.strip() for n in (text or "").split(",") if n.strip() and n.strip() != "none"]
    views = TTAViews()
    for name in names:
        match = SCALE_VIEW.match(name.lower())
        if match is None:
            views.append(TTA_VIEWS.get(name))
            continue
        factor = float(match.group(1))
        if not SCALE_RANGE[0] <= factor <= SCALE_RANGE[1]:
            raise UserError(f"TTA view {name}: a scale from {SCALE_RANGE[0]} to {SCALE_RANGE[1]}, e.g. scale0.9, "
                            f"scale1.15")
        view = functools.partial(scaled, factor=factor)
        views.append((lambda images, view=view: hflip(view(images))) if match.group(2) else view)
    if weights is not None:
        if len(weights) != len(views) + 1:
            raise UserError(f"--tta_weights: {len(views) + 1} weights, the original's first and one per view of "
                            f"--tta {text!r}; got {len(weights)}")
        if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
            raise UserError(f"--tta_weights {','.join(map(str, weights))}: finite weights >= 0, not all 0")
        views.weights = [w / sum(weights) for w in weights]
    return views


def tta_logits(model, images, views):
    """Logits of the plain batch, and the log of the softmax averaged over it and its views (with
    `views.weights`, a weighted average)."""
    logits = model(images)
    if not views:
        return logits, torch.log_softmax(logits.float(), dim=1)
    weights = getattr(views, "weights", None)
    if weights is None:
        probs = torch.softmax(logits.float(), dim=1)
        for view in views:
            probs = probs + torch.softmax(model(view(images)).float(), dim=1)
        return logits, torch.log(probs / (len(views) + 1))
    probs = weights[0] * torch.softmax(logits.float(), dim=1)
    for view, weight in zip(views, weights[1:]):
        probs = probs + weight * torch.softmax(model(view(images)).float(), dim=1)
    return logits, torch.log(probs)
