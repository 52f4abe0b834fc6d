"""Plug-ins with options of their own: a loss, a model and an augmentation, each added in one
place (here: registered by this module's fixture for its tests only, as a user's edit of loss.py,
model.py or augmentation.py would register them), each with a flag set on the command line; the
flags land in config.json, and inference rebuilds the run from it alone."""
import argparse
import json

import albumentations as A
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from augmentation import AUGMENTATIONS, to_tensor
from conftest import FAST
import inference
from loss import CRITERIONS
from maskcls.cli import UserError, run
from maskcls.registry import Option, Registry
from model import MODELS, build_from_config
import train

SEEN = {}  # what each plug-in was built with


class Poly1Loss(nn.Module):
    """PolyLoss (Leng et al., 2022), poly-1: CE + epsilon * (1 - p_t)."""

    def __init__(self, num_classes, poly_epsilon=1.0, **kwargs):
        super().__init__()
        self.epsilon = SEEN["poly_epsilon"] = poly_epsilon

    def forward(self, logits, target):
        ce = F.cross_entropy(logits, target, reduction="none")
        return (ce + self.epsilon * (1 - torch.exp(-ce))).mean()


class TinyNet(nn.Module):
    def __init__(self, num_classes, width):
        super().__init__()
        self.conv = nn.Conv2d(3, width, 3, stride=2)
        self.fc = nn.Linear(width, num_classes)

    def get_classifier(self):
        return self.fc

    def forward(self, x):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def tiny_net(num_classes, pretrained=False, tiny_width=4, **kwargs):
    SEEN["tiny_width"] = tiny_width
    return TinyNet(num_classes, tiny_width)


def JitterTest(resize, mean, std, jitter_strength=0.1, **kwargs):
    SEEN["jitter_strength"] = jitter_strength
    return A.Compose([A.Resize(*resize), A.RandomBrightnessContrast(jitter_strength, 0, p=1), *to_tensor(mean, std)])


PLUGINS = ((CRITERIONS, "poly1_test", Poly1Loss, {"options": {"poly_epsilon": "weight of the poly-1 term"}}),
           (MODELS, "TinyNetTest", tiny_net, {"input_size": (64, 48),
                                               "options": {"tiny_width": "channels of the only conv"}}),
           (AUGMENTATIONS, "JitterTest", JitterTest,
            {"options": {"jitter_strength": Option("brightness jitter", type=float)}}))


@pytest.fixture(scope="module", autouse=True)
def plugins():
    """The three plug-ins registered for this module's tests only, as a user's edit of loss.py,
    model.py and augmentation.py would register them; removed afterwards, so no other test sees
    them whatever the collection order."""
    for registry, name, entry, meta in PLUGINS:
        registry.register(name, **meta)(entry)
    yield
    for registry, name, _, _ in PLUGINS:
        registry.unregister(name)


def test_plugins_are_gone_outside_their_tests():
    CRITERIONS.register("poly1_scratch")(Poly1Loss)
    CRITERIONS.unregister("poly1_scratch")
    assert "poly1_scratch" not in CRITERIONS and "poly1_test" in CRITERIONS


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_plugins_with_their_own_flags_train_and_infer(work, tmp_path):
    help_text = train.get_args_parser().format_help()
    for flag in ("--poly_epsilon", "--tiny_width", "--jitter_strength"):
        assert flag in help_text
    args = [*FAST, "--epochs", "1", "--model", "TinyNetTest", "--tiny_width", "6", "--criterion", "poly1_test",
            "--poly-epsilon", "2.5", "--augmentation", "JitterTest", "--jitter_strength", "0.3",
            "--name", "plugins", "--model_dir", str(tmp_path / "runs"), "--data_dir", str(work / "data" / "train")]
    SEEN.clear()
    run_dir = run(train.main, train.get_args_parser, args)
    assert SEEN == {"poly_epsilon": 2.5, "tiny_width": 6, "jitter_strength": 0.3}  # each got its flag
    config = json.loads(open(f"{run_dir}/config.json").read())
    assert (config["poly_epsilon"], config["tiny_width"], config["jitter_strength"]) == (2.5, 6, 0.3)
    assert torch.load(f"{run_dir}/best.pth", weights_only=True)["model"]["conv.weight"].shape[0] == 6

    # inference: nothing repeated; the model comes back with its width from config.json (the
    # default width 4 would not fit the saved weights)
    SEEN.clear()
    out = tmp_path / "sub.csv"
    run(inference.main, inference.get_args_parser, ["--model_dir", run_dir, "--data_dir", str(work / "data" / "eval"),
                                                     "--output", str(out), "--num_workers", "0"])
    assert SEEN == {"tiny_width": 6}
    assert len(pd.read_csv(out)) == len(pd.read_csv(work / "data" / "eval" / "info.csv"))


def test_a_run_from_before_an_option_existed_gets_its_default():
    model = build_from_config({"model": "TinyNetTest", "num_classes": 3})
    assert model.conv.out_channels == 4


def test_options_declared_badly_fail_at_registration_or_parser_build():
    things = Registry("thing")
    with pytest.raises(TypeError, match="no default"):
        things.register("a", options={"size": "a size"})(lambda num_classes, size, **kw: None)
    things.register("b", options={"depth": "layers"})(lambda num_classes, depth=2, **kw: None)
    things.register("c", options={"depth": "layers"})(lambda num_classes, depth=3, **kw: None)
    with pytest.raises(ValueError, match="one option, one default"):
        things.all_options()

    clash = Registry("thing")
    clash.register("d", options={"epochs": "clashes with train.py's own flag"})(lambda num_classes, epochs=1, **kw: 0)
    parser = argparse.ArgumentParser()
    parser.add_argument("--epochs")
    with pytest.raises(ValueError, match="clashes"):
        clash.add_arguments(parser)


def test_bool_option_parses_like_every_flag():
    things = Registry("thing")
    things.register("e", options={"fancy": "be fancy"})(lambda num_classes, fancy=False, **kw: fancy)
    parser = argparse.ArgumentParser()
    things.add_arguments(parser)
    assert parser.parse_args(["--fancy", "no"]).fancy is False and parser.parse_args(["--fancy"]).fancy is True
    assert things.values_for("e", {"fancy": True}) == {"fancy": True}
    with pytest.raises(UserError):
        things.get("f")
