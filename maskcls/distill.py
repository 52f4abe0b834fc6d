"""Knowledge distillation (`--teacher RUN`) and out-of-fold self-distillation (`--soft_oof RUN`).

- `Teacher`: a trained run (a k-fold parent: its folds averaged) gives soft targets on every
  training batch, the batch the student sees (augmented and mixed alike), so it composes with
  every criterion and with CutMix / MixUp: loss = (1 - w) x the criterion's loss + w x T^2 x
  KL(teacher || student), both softened by the temperature T (Hinton et al., 2015). A teacher of
  another input size or normalization gets the batch resized and renormalized to its own.
- `oof_targets`: a k-fold run's out-of-fold probabilities of each training image (oof.csv), for
  `loss.SoftTargetLoss`: the labels blended with them (the 1st place of Plant Pathology 2020 mixed
  labels and out-of-fold predictions 3:7).

Example: python train.py --teacher runs/kf_big --kd_weight 0.5 --kd_temperature 4
"""
import os

import numpy as np
import torch
import torch.nn.functional as F

from maskcls import cli
from maskcls.heldout import read_heldout
from maskcls.predict import expand_runs, load_run
from maskcls.readers import read_config


class Teacher:
    """The models of a trained run (every member of a parent), frozen, giving tempered soft
    targets for the student's batches."""

    def __init__(self, run_dir, student_config, weight, temperature, device, precision):
        members, _ = expand_runs([run_dir])
        configs = [read_config(m) for m in members]
        if configs[0]["classes"] != student_config["classes"]:
            raise cli.UserError(f"--teacher {run_dir} has other classes than this run's data")
        if any(bool(c.get("facecrop")) != bool(student_config.get("facecrop")) for c in configs):
            raise cli.UserError(f"--teacher {run_dir}: its face crop differs from this run's (--facecrop)")
        self.models = [precision.model(load_run(m, c, "best.pth", device)) for m, c in zip(members, configs)]
        for model in self.models:
            model.requires_grad_(False)
        self.inputs = [(tuple(c["input_size"]), c["mean"], c["std"]) for c in configs]
        self.student = (tuple(student_config["input_size"]), student_config["mean"], student_config["std"])
        self.weight, self.temperature = float(weight), float(temperature)
        self.num_classes = len(student_config["classes"])
        self.members = len(members)

    def adapt(self, images, size, mean, std):
        """The student's normalized batch as this teacher model expects it."""
        _, student_mean, student_std = self.student
        if (list(mean), list(std)) != (list(student_mean), list(student_std)):
            shape = (1, -1, 1, 1)
            raw = images * torch.tensor(student_std, device=images.device).view(shape) + \
                torch.tensor(student_mean, device=images.device).view(shape)
            images = (raw - torch.tensor(mean, device=images.device).view(shape)) / \
                torch.tensor(std, device=images.device).view(shape)
        if tuple(images.shape[-2:]) != tuple(size):
            images = F.interpolate(images, size=size, mode="bilinear", align_corners=False, antialias=True)
        return images

    @torch.no_grad()
    def targets(self, images):
        """The members' mean tempered probabilities [N, C] on the batch."""
        total = 0
        for model, (size, mean, std) in zip(self.models, self.inputs):
            logits = model(self.adapt(images, size, mean, std))[:, :self.num_classes].float()
            total = total + torch.softmax(logits / self.temperature, 1)
        return total / len(self.models)

    def blend(self, loss, logits, images):
        """(1 - w) x loss + w x T^2 x KL(teacher || student) on this batch."""
        teacher = self.targets(images)
        student = torch.log_softmax(logits[:, :self.num_classes].float() / self.temperature, 1)
        kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - student)).sum(1).mean()
        return (1 - self.weight) * loss + self.weight * self.temperature ** 2 * kl


def oof_targets(run_dir, samples, root, classes):
    """[C] out-of-fold probabilities per training sample from a k-fold run's oof.csv (None for an
    image it did not hold out: extra and pseudo-labelled images keep their hard label)."""
    if not os.path.isfile(os.path.join(run_dir, "oof.csv")):
        raise cli.UserError(f"--soft_oof {run_dir}: no oof.csv; it takes a --kfold run's out-of-fold predictions")
    held = read_heldout(run_dir)
    if held.classes != list(classes):
        raise cli.UserError(f"--soft_oof {run_dir} has other classes than this run's data")
    by_path = dict(zip(held.paths, held.probs))
    found = [by_path.get(os.path.relpath(s.path, root) if os.path.isabs(s.path) else s.path) for s in samples]
    if not any(p is not None for p in found):
        raise cli.UserError(f"--soft_oof {run_dir}: its oof.csv holds none of this run's training images (another "
                            f"data folder?)")
    return [None if p is None else np.asarray(p, dtype=np.float32) for p in found]
