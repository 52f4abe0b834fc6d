"""Batch mixing: CutMix and MixUp, applied to a whole batch in one call.

- `rand_box(height, width, lam, rng, mode)`: the region to paste (a box, or a full-height
  vertical strip).
- `BatchMixer(cutmix, mixup, prob, beta, mode, seed, cutmix_alpha, mixup_alpha, switch_prob)`:
  `mixer(x, y)` returns `(x_mixed, y_a, y_b, lam)`; unmixed batches come back as `(x, y, y, 1.0)`.
- `mixed_loss(criterion, logits, y_a, y_b, lam)`: `lam * crit(logits, y_a) +
  (1 - lam) * crit(logits, y_b)`, which works with every criterion in `loss.py` (see its
  docstring for the contract).

Flags: the seed's `--cutmix True --mixup True --beta 1.0` (both with lambda ~ Beta(beta, beta)), or
timm's `--cutmix_alpha A --mixup_alpha B` (an alpha > 0 turns it on, with its own alpha);
`--cutmix_prob` (timm: `--mixup_prob`) is the share of batches mixed, `--mix_switch_prob` the
chance that a mixed batch uses CutMix when both are on, `--mix_off_epoch N` stops mixing from
epoch N on (train.py), `--cutmix_mode box|vertical`.
`vertical` pastes a full-height strip: faces sit in the centre of the competition's photos, so a
strip swaps a part of the face (and the mask) rather than, often, only background.

Training accuracy on mixed batches is not comparable with validation accuracy (each image
carries two labels); judge the model on the validation metrics.

Example: `python train.py --cutmix True --cutmix_prob 0.5 --cutmix_mode vertical`
"""
import numpy as np
import torch

from maskcls.cli import UserError

MODES = ("box", "vertical")


def _check_mode(mode):
    if mode not in MODES:
        raise UserError(f"invalid cutmix mode {mode!r}; expected one of: {', '.join(MODES)}")


def rand_box(height, width, lam, rng, mode="box"):
    """A region covering about (1 - lam) of a height x width image, as ints (y1, y2, x1, x2).

    "box": a box with the image's aspect ratio, random centre, clipped to the image (so it may
    cover less than asked; recompute lam from the result). "vertical": a full-height strip of
    width about (1 - lam) * width at a random x, always inside the image. Cut a tensor as
    `x[..., y1:y2, x1:x2]` (NCHW: `height, width = x.shape[-2:]`).
    """
    _check_mode(mode)
    if mode == "vertical":
        cut_w = int(round(width * (1.0 - lam)))
        x1 = int(rng.integers(0, width - cut_w + 1))
        return 0, height, x1, x1 + cut_w
    cut_ratio = np.sqrt(1.0 - lam)
    cut_h, cut_w = int(height * cut_ratio), int(width * cut_ratio)
    cy, cx = int(rng.integers(height)), int(rng.integers(width))
    y1, y2 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x1, x2 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return y1, y2, x1, x2


class BatchMixer:
    """Mixes a batch with CutMix or MixUp with probability `prob`, from its own seeded RNG.

    `cutmix_alpha` / `mixup_alpha` (> 0: on) are each method's Beta parameter; left None they
    follow the switches `cutmix` / `mixup` with `beta`. If both are on, a mixed batch uses CutMix
    with chance `switch_prob`. The partner of sample i is sample perm[i] of the same batch;
    lam ~ Beta(alpha, alpha). With its own RNG (not the global one) a training run is
    reproducible from `seed` alone. `active = False` (train.py's --mix_off_epoch) stops mixing.
    """

    def __init__(self, cutmix=False, mixup=False, prob=0.5, beta=1.0, mode="box", seed=0, cutmix_alpha=None,
                 mixup_alpha=None, switch_prob=0.5):
        _check_mode(mode)
        if not beta > 0:
            raise UserError(f"--beta must be > 0, got {beta}")
        for name, value in (("--cutmix_prob", prob), ("--mix_switch_prob", switch_prob)):
            if not 0.0 <= value <= 1.0:
                raise UserError(f"{name} must be in [0, 1], got {value}")
        self.cutmix_alpha = float(cutmix_alpha if cutmix_alpha is not None else beta if cutmix else 0.0)
        self.mixup_alpha = float(mixup_alpha if mixup_alpha is not None else beta if mixup else 0.0)
        if self.cutmix_alpha < 0 or self.mixup_alpha < 0:
            raise UserError("--cutmix_alpha and --mixup_alpha must be >= 0 (0: off)")
        self.cutmix, self.mixup = self.cutmix_alpha > 0, self.mixup_alpha > 0
        self.prob, self.beta, self.mode, self.switch_prob = float(prob), float(beta), mode, float(switch_prob)
        self.rng = np.random.default_rng(seed)
        self.active = True

    @property
    def enabled(self):
        return self.cutmix or self.mixup

    def state_dict(self):
        """The RNG's position, so that a resumed run mixes as an uninterrupted one (last.pth)."""
        return self.rng.bit_generator.state

    def load_state_dict(self, state):
        self.rng.bit_generator.state = state

    def __call__(self, x, y):
        """Return (x_mixed, y_a, y_b, lam); the caller's `x` is never modified."""
        if not (self.enabled and self.active) or self.rng.random() >= self.prob:
            return x, y, y, 1.0
        use_cutmix = self.cutmix and (not self.mixup or self.rng.random() < self.switch_prob)
        alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
        lam = float(self.rng.beta(alpha, alpha))
        perm = torch.from_numpy(self.rng.permutation(x.shape[0]))
        partner = x[perm.to(x.device)]
        if use_cutmix:
            height, width = x.shape[-2:]
            y1, y2, x1, x2 = rand_box(height, width, lam, self.rng, self.mode)
            mixed = x.clone()
            mixed[..., y1:y2, x1:x2] = partner[..., y1:y2, x1:x2]
            # The box was clipped to the image: lam is the share actually left unpasted.
            lam = 1.0 - (y2 - y1) * (x2 - x1) / (height * width)
        else:
            mixed = lam * x + (1.0 - lam) * partner
        return mixed, y, y[perm.to(y.device)], lam


def mixed_loss(criterion, logits, y_a, y_b, lam):
    """lam * criterion(logits, y_a) + (1 - lam) * criterion(logits, y_b)."""
    loss = criterion(logits, y_a)
    if lam == 1.0:  # unmixed batch: the second term has weight 0
        return loss
    return lam * loss + (1.0 - lam) * criterion(logits, y_b)
