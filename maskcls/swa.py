"""Stochastic weight averaging (`--swa_start E --swa_lr X`, torch.optim.swa_utils) and the
BatchNorm refresh every averaged model needs: an average of weights is not trained with the
average of their batch statistics, so they are recomputed over the training images
(`refresh_bn`) before the average is scored and saved (swa.pth; averaged.pth too).

From epoch E the run's schedule hands over to torch's SWALR: `--swa_lr` at once, or reached
over `--swa_anneal_epochs` (cosine); without --swa_lr the run's own schedule goes on. The
weights at the end of every epoch from E on are averaged. last.pth holds the average and
SWALR's state, so --resume continues both.

Example: python train.py --epochs 30 --swa_start 21 --swa_lr 5e-4; then
         python inference.py --checkpoint swa.pth
"""
import torch
from torch.optim.swa_utils import SWALR, AveragedModel, update_bn


def has_batch_norm(model):
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


@torch.no_grad()
def refresh_bn(model, loader, device):
    """Recompute every BatchNorm's running mean and variance over one pass of `loader` (its batches
    (images, labels)): torch's update_bn, with the statistics an equal-weight average over the
    batches (momentum None). A model without BatchNorm is left as it is; returns whether it had any."""
    if not has_batch_norm(model):
        return False
    update_bn(loader, model, device)
    return True


class SWA:
    """The running average of the weights from epoch `start` on, and the rate SWALR holds them at.
    A checkpoint part (state_dict / load_state_dict: the average and SWALR's state)."""

    def __init__(self, net, optimizer, start, swa_lr, anneal_epochs=0):
        self.start, self.swa_lr, self.anneal_epochs = start, swa_lr, anneal_epochs
        self.optimizer = optimizer
        self.model = AveragedModel(net)
        self.scheduler = None  # SWALR, made when epoch `start` begins (it sets the rate when made)

    def active(self, epoch):
        return epoch >= self.start

    def begin_epoch(self, epoch):
        """Epochs from `start` on: the rate for this epoch (SWALR made on the first, stepped after)."""
        if not self.active(epoch):
            return
        if self.scheduler is None:
            self.scheduler = self._swalr()
        elif epoch > self.start:
            self.scheduler.step()

    def end_epoch(self, epoch, net):
        if self.active(epoch):
            self.model.update_parameters(net)

    @property
    def averaged(self):
        return int(self.model.n_averaged)

    def state_dict(self):
        return {"model": self.model.state_dict(),
                "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None}

    def load_state_dict(self, state):
        self.model.load_state_dict(state["model"])
        if state["scheduler"] is not None:  # the optimizer's rates as last.pth left them, not as SWALR's first step
            rates = [group["lr"] for group in self.optimizer.param_groups]
            self.scheduler = self._swalr()
            self.scheduler.load_state_dict(state["scheduler"])
            for group, rate in zip(self.optimizer.param_groups, rates):
                group["lr"] = rate

    def _swalr(self):
        # per group: --swa_lr times the group's own scale (layer decay, --backbone_lr_ratio)
        rates = [self.swa_lr * group.get("lr_scale", 1.0) for group in self.optimizer.param_groups]
        return SWALR(self.optimizer, swa_lr=rates, anneal_epochs=self.anneal_epochs, anneal_strategy="cos")
