"""Every model entry, timm pass-through, weight loading and checkpoint safety."""
import os

import pytest
import torch

from maskcls.cli import UserError
from model import (MODELS, PRESETS, check_model_name, create_model, input_size_of, load_weights, read_checkpoint,
                   save_checkpoint)

NUM_CLASSES = 18


@pytest.mark.parametrize("name", MODELS.names())
def test_every_model_builds_runs_and_backpropagates(name):
    torch.manual_seed(0)
    model = create_model(name, NUM_CLASSES)
    size = 96 if name != "imgInceptionV3" else 107  # inception's stem needs >= 75 pixels
    out = model(torch.randn(2, 3, size, size))
    assert out.shape == (2, NUM_CLASSES)  # the head is sized to the classes, never 1000
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    h, w = input_size_of(name)
    assert h >= 64 and w >= 64


def test_inception_preset_is_299_with_an_18_way_head():
    model = create_model("imgInceptionV3", NUM_CLASSES)
    assert input_size_of("imgInceptionV3") == (299, 299)
    assert model.get_classifier().out_features == NUM_CLASSES


def test_presets_map_to_timm():
    assert PRESETS["efficientNet_b3"][0] == "efficientnet_b3"
    assert {f"efficientNet_b{i}" for i in range(8)} <= set(MODELS.names())


def test_any_timm_name_passes_through():
    model = create_model("resnet10t", 5)
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)
    assert input_size_of("resnet10t") == (176, 176)  # from timm's own config


def test_unknown_model_lists_names_and_closest_match():
    with pytest.raises(UserError) as err:
        check_model_name("resnet-18")
    message = str(err.value)
    assert "did you mean" in message and "imgInceptionV3" in message and "timm" in message


def test_weights_round_trip(tmp_path):
    model = create_model("BaseModel", NUM_CLASSES)
    save_checkpoint({"model": model.state_dict(), "epoch": 3}, str(tmp_path / "best.pth"))
    assert not [p for p in os.listdir(tmp_path) if "tmp" in p]  # the temporary file was renamed
    other = create_model("BaseModel", NUM_CLASSES)
    load_weights(other, str(tmp_path / "best.pth"))
    x = torch.randn(2, 3, 64, 48)
    assert torch.equal(model.eval()(x), other.eval()(x))


def test_timm_style_checkpoint_and_prefixes(tmp_path):
    model = create_model("resnet18", NUM_CLASSES)
    state = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from a DDP wrapper
    torch.save({"state_dict": state, "epoch": 1}, tmp_path / "timm.pth.tar")
    fresh = create_model("resnet18", NUM_CLASSES)
    load_weights(fresh, str(tmp_path / "timm.pth.tar"))
    assert torch.equal(fresh.fc.weight, model.fc.weight)


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file
    model = create_model("resnet18", NUM_CLASSES)
    save_file(model.state_dict(), str(tmp_path / "w.safetensors"))
    fresh = load_weights(create_model("resnet18", NUM_CLASSES), str(tmp_path / "w.safetensors"))
    assert torch.equal(fresh.conv1.weight, model.conv1.weight)


def test_mismatched_class_count_is_named(tmp_path):
    torch.save(create_model("BaseModel", 1000).state_dict(), tmp_path / "imagenet.pth")
    with pytest.raises(UserError, match="head has 1000 outputs.*BaseModel with 18 classes"):
        load_weights(create_model("BaseModel", NUM_CLASSES), str(tmp_path / "imagenet.pth"), "BaseModel")
    # fine-tuning from it (--weights): the backbone loads, the head starts fresh
    source = torch.load(tmp_path / "imagenet.pth", weights_only=True)
    model = load_weights(create_model("BaseModel", NUM_CLASSES), str(tmp_path / "imagenet.pth"),
                         "BaseModel", allow_new_head=True)
    assert torch.equal(model.features[0].weight, source["features.0.weight"])
    assert model.fc.out_features == NUM_CLASSES


def test_checkpoint_of_another_model_is_named(tmp_path):
    torch.save(create_model("resnet18", NUM_CLASSES).state_dict(), tmp_path / "r18.pth")
    with pytest.raises(UserError, match="does not fit model BaseModel"):
        load_weights(create_model("BaseModel", NUM_CLASSES), str(tmp_path / "r18.pth"), "BaseModel",
                     allow_new_head=True)


class _Payload:
    """Unpickling this would create a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_checkpoint_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"model": _Payload(str(marker))}, tmp_path / "evil.pth")
    assert not marker.exists()
    with pytest.raises(UserError, match="refusing to load"):
        read_checkpoint(str(tmp_path / "evil.pth"))
    assert not marker.exists()


def test_missing_and_garbage_checkpoints(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_checkpoint(str(tmp_path / "nope.pth"))
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="junk.pth"):
        read_checkpoint(str(tmp_path / "junk.pth"))


def test_global_pool_flag_reaches_base_model_and_timm():
    from model import BaseModel
    base = create_model("BaseModel", NUM_CLASSES)  # its own: average and maximum side by side
    assert base.fc.in_features == 2 * 128
    x = torch.randn(2, 3, 64, 48)
    features = base.features(x)
    pooled = torch.cat([features.mean((2, 3)), features.amax((2, 3))], 1)
    assert torch.allclose(base.pool(features), pooled)
    assert create_model("BaseModel", NUM_CLASSES, gp="avg").fc.in_features == 128
    assert isinstance(base, BaseModel) and base(x).shape == (2, NUM_CLASSES)
    assert create_model("resnet18", NUM_CLASSES, gp="catavgmax").fc.in_features == 2 * 512
    assert create_model("resnet18", NUM_CLASSES).fc.in_features == 512  # timm's own (avg) without it
    for name, bad in (("BaseModel", "median"), ("resnet18", "median"), ("vit_tiny_patch16_224", "catavgmax")):
        with pytest.raises(UserError, match="--gp"):
            create_model(name, NUM_CLASSES, gp=bad)


def test_a_run_from_before_gp_rebuilds_with_its_average_pool(tmp_path):
    from model import build_from_config
    old = build_from_config({"model": "BaseModel", "num_classes": NUM_CLASSES})  # config.json without "gp"
    assert old.fc.in_features == 128
    new = build_from_config({"model": "BaseModel", "num_classes": NUM_CLASSES, "gp": None})
    assert new.fc.in_features == 256
    assert build_from_config({"model": "resnet18", "num_classes": NUM_CLASSES}).fc.in_features == 512
