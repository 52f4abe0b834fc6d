"""A run folder's models, for prediction: a parent expanded into its members (`expand_runs`), a
model rebuilt from config.json alone with its checkpoint (`load_run`), the size its images are
prepared to (`run_prepared_size`), and softmax probabilities over a loader (`predict`,
`predict_many`: each batch decoded once for several models). inference.py, validate.py,
export.py, knowledge distillation and the smoke test share them.

Example: python inference.py --model_dir runs/kf --tta hflip
"""
import os

import torch

from augmentation import tta_logits, with_headroom
from maskcls import cli
from maskcls.heldout import load_cuts
from maskcls.readers import REFIT_DIR, member_dirs, read_config
from model import build_from_config, load_weights, set_age_cuts


def expand_runs(run_dirs, weights=None):
    """Run folders with every parent replaced by its members (a k-fold run's folds, a seed
    group's runs, in turn): an ensemble of them; and each one's weight (a parent's weight is
    shared by its members)."""
    expanded, expanded_weights = [], []
    for run_dir, weight in zip(run_dirs, weights or [1.0] * len(run_dirs)):
        config = read_config(run_dir)
        members = [os.path.join(run_dir, m) for m in member_dirs(config, os.path.join(run_dir, "config.json"))]
        inner = expand_runs(members, [weight / len(members)] * len(members)) if members else ([run_dir], [weight])
        expanded += inner[0]
        expanded_weights += inner[1]
    return expanded, expanded_weights



def refit_runs(run_dirs):
    """`--checkpoint refit`: each run folder's full-data refit (train.py --refit: RUN/refit), a seed
    group's for each of its seeds; its best.pth is the refit's model."""
    found = []
    for run_dir in run_dirs:
        refit = os.path.join(run_dir, REFIT_DIR)
        if os.path.isfile(os.path.join(refit, "best.pth")):
            found.append(refit)
            continue
        config = read_config(run_dir)
        if config.get("seed_dirs"):
            seeds = member_dirs(config, os.path.join(run_dir, "config.json"))
            found += refit_runs([os.path.join(run_dir, seed) for seed in seeds])
        else:
            raise cli.UserError(f"--checkpoint refit: {run_dir} has no finished refit ({refit}/best.pth); train it "
                                f"with python train.py --resume {run_dir} --refit True")
    return found


def load_run(run_dir, config, checkpoint, device):
    """The model of a run folder, rebuilt from its config.json alone, in eval mode (an age head with
    the run's fitted cut points)."""
    model = build_from_config(config, source=os.path.join(run_dir, "config.json"))
    load_weights(model, os.path.join(run_dir, checkpoint), config["model"])
    if config.get("age_head") == "regression":
        set_age_cuts(model, *load_cuts(run_dir)[:2])
    return model.to(device).eval()



@torch.inference_mode()
def predict(model, loader, device, precision, views=(), desc="predict"):
    """Softmax probabilities (averaged over the TTA views) for every image, in loader order."""
    return predict_many([model], loader, device, precision, views, desc)[0]



@torch.inference_mode()
def predict_many(models, loader, device, precision, views=(), desc="predict"):
    """predict() for several models in one pass over the loader: each batch is decoded once and
    goes through every model. One array per model."""
    probs = [[] for _ in models]
    for images, _ in cli.progress(loader, desc=desc, unit="batch"):
        images = precision.batch(images.to(device, non_blocking=True))
        with precision.autocast():
            for model, out in zip(models, probs):
                out.append(tta_logits(model, images, views)[1])
    return [torch.cat(out).exp().cpu().numpy() for out in probs]



def run_prepared_size(config):
    """(H, W) the run's validation images were prepared to; runs from before config.json recorded
    it were prepared with the headroom (their cache's size)."""
    return tuple(config.get("prepared_size") or with_headroom(config["input_size"]))
