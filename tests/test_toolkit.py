"""The competition toolkit: k-fold, TTA, saved probabilities and ensembles, multi-task and
multi-sample-dropout heads, the weighted sampler, age bins, extra data, relabelling,
pseudo-labels and the per-task report."""
import json
import os
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from augmentation import parse_tta, tta_logits
from conftest import FAST
from dataset import DATASETS, Sample
import dataset
from loss import MultiTaskLoss, split_target
from maskcls.cli import UserError
from maskcls.images import EpochSampler
from maskcls.labels import MASK_CLASSES, age_band, decode_label, encode_label, training_label
from maskcls.metrics import task_f1
from model import FactorizedHead, MultiSampleDropout, create_model



# ---------------------------------------------------------------- k-fold
@pytest.mark.filterwarnings("ignore:The least populated class")  # 2 people in a cell, 3 folds: expected here
def test_folds_group_people_and_hold_out_each_image_once(sample_data):
    source = DATASETS.build("datasetSplitByClasses", str(sample_data / "train"), seed=1)
    folds = source.folds(3)
    held_out = [i for _, val in folds for i in val]
    assert sorted(held_out) == list(range(len(source.samples)))  # exactly once each
    people = [{source.samples[i].person for i in val} for _, val in folds]
    assert not (people[0] & people[1] or people[0] & people[2] or people[1] & people[2])
    for train, val in folds:
        assert not {source.samples[i].person for i in train} & {source.samples[i].person for i in val}
    assert source.folds(3) == folds  # seeded


@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_kfold_run_oof_and_fold_ensemble(work, tmp_path, run_here):
    extra = tmp_path / "extra" / "5"
    extra.mkdir(parents=True)
    for src in list((work / "data" / "eval" / "images").iterdir())[:3]:
        shutil.copy(src, extra / src.name)
    run_here("train.py", *FAST, "--epochs", "1", "--kfold", "3", "--name", "kf", "--extra_data", extra.parent,
             cwd=work)
    parent = work / "runs" / "kf"
    for fold in ("fold1", "fold2", "fold3"):
        assert (parent / fold / "best.pth").is_file() and (parent / fold / "config.json").is_file()
        split = pd.read_csv(parent / fold / "split.csv", keep_default_na=False)
        extra_rows = split[split["person"] == "extra:"]
        assert len(extra_rows) == 3 and (extra_rows["side"] == "train").all()  # never held out
    oof = pd.read_csv(parent / "oof.csv", dtype={"person": str})
    assert list(oof.columns) == ["path", "person", "fold", "label", "pred", *MASK_CLASSES]
    train_images = 7 * len(pd.read_csv(work / "data" / "train" / "train.csv"))
    assert len(oof) == train_images and oof["path"].is_unique  # every training image exactly once
    assert (oof.groupby("person")["fold"].nunique() == 1).all()  # no person in two held-out folds
    assert np.allclose(oof[MASK_CLASSES].sum(axis=1), 1, atol=1e-3)
    assert (oof["pred"] == oof[MASK_CLASSES].to_numpy().argmax(1)).all()
    summary = json.loads((parent / "kfold.json").read_text())
    assert len(summary["fold_f1"]) == 3 and 0 <= summary["oof_f1"] <= 1
    for fold, f1 in enumerate(summary["fold_f1"], start=1):
        metrics = pd.read_csv(parent / f"fold{fold}" / "metrics.csv")
        assert f1 == pytest.approx(metrics["val_f1"].max(), abs=1e-5)
    result = run_here("inference.py", "--model_dir", parent, "--output", work / "kf.csv", cwd=work)
    assert "fold1" in result.stdout and "fold3" in result.stdout
    assert len(pd.read_csv(work / "kf.csv")) == len(pd.read_csv(work / "data" / "eval" / "info.csv"))


# ---------------------------------------------------------------- TTA
def test_tta_averages_softmax_over_views():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 4 * 6, 5)).eval()
    x = torch.randn(2, 3, 4, 6)
    logits, logp = tta_logits(model, x, parse_tta("hflip"))
    expected = (F.softmax(model(x), 1) + F.softmax(model(x.flip(-1)), 1)) / 2
    assert torch.allclose(logp.exp(), expected, atol=1e-6)
    assert torch.equal(logits, model(x))
    _, plain = tta_logits(model, x, parse_tta("none"))
    assert torch.allclose(plain.exp(), F.softmax(model(x), 1))
    assert len(parse_tta("hflip,zoom")) == 2
    with pytest.raises(UserError, match="hflip"):
        parse_tta("hflipp")


def test_tta_at_several_scales_with_a_weight_for_the_original():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 20 * 16, 5)).eval()
    x = torch.rand(2, 3, 20, 16)
    views = parse_tta("scale0.8,scale1.25_hflip", [2, 1, 1])
    assert views.weights == [0.5, 0.25, 0.25]
    small, big = views[0](x), views[1](x)
    assert small.shape == big.shape == x.shape
    # 0.8: the image shrunk to 16x13 sits in the middle, its border reflected outward
    shrunk = F.interpolate(x, size=(16, 13), mode="bilinear", align_corners=False, antialias=True)
    assert torch.allclose(small[..., 2:18, 1:14], shrunk)
    assert torch.allclose(small[..., 1, 1:14], shrunk[..., 1, :])  # reflection, not black
    # 1.25 + hflip: the centre of the enlarged image, mirrored
    enlarged = F.interpolate(x, scale_factor=1.25, mode="bilinear", align_corners=False)
    assert torch.allclose(big, enlarged[..., 2:22, 2:18].flip(-1))
    _, logp = tta_logits(model, x, views)
    expected = 0.5 * F.softmax(model(x), 1) + 0.25 * F.softmax(model(small), 1) + 0.25 * F.softmax(model(big), 1)
    assert torch.allclose(logp.exp(), expected, atol=1e-6)
    _, only = tta_logits(model, x, parse_tta("scale1.1", [1, 0]))  # a zero weight drops a view
    assert torch.allclose(only.exp(), F.softmax(model(x), 1), atol=1e-6)
    assert torch.allclose(parse_tta("scale1.1")[0](x), parse_tta("zoom")[0](x))  # zoom is scale1.1
    for text, weights, needle in (("scale3", None, "scale from 0.5 to 2"), ("scale1.1", [1], "2 weights"),
                                  ("hflip", [1, -1], "finite weights >= 0"), ("hflip", [0, 0], "not all 0"),
                                  ("hflip", [1, float("nan")], "finite")):
        with pytest.raises(UserError, match=needle):
            parse_tta(text, weights)


# ---------------------------------------------------------------- heads and losses
def test_factorized_head_is_the_product_of_task_softmaxes():
    torch.manual_seed(0)
    head = FactorizedHead(7, (3, 2, 3))
    features = torch.randn(4, 7)
    joint = head(features).softmax(1)
    mask, gender, age = (p.softmax(1) for p in torch.split(head.fc(features), (3, 2, 3), dim=1))
    for label in range(18):
        m, g, a = decode_label(label)
        assert torch.allclose(joint[:, label], mask[:, m] * gender[:, g] * age[:, a], atol=1e-6)


def test_multitask_loss_is_the_weighted_sum_of_head_losses():
    torch.manual_seed(0)
    head = FactorizedHead(7, (3, 2, 3))
    features, target = torch.randn(6, 7), torch.randint(0, 18, (6,))
    parts = torch.split(head.fc(features), (3, 2, 3), dim=1)
    per_head = [F.cross_entropy(p, t) for p, t in zip(parts, split_target(target, (3, 2, 3)))]
    loss = MultiTaskLoss("cross_entropy", 18, (3, 2, 3), task_weights=[1.0, 0.5, 2.0])
    assert torch.allclose(loss(head(features), target), per_head[0] + 0.5 * per_head[1] + 2.0 * per_head[2])
    assert [t.tolist() for t in split_target(torch.tensor([13]), (3, 2, 3))] == [[2], [0], [1]]
    with pytest.raises(UserError, match="task_weights"):
        MultiTaskLoss("cross_entropy", 18, (3, 2, 3), task_weights=[1, 1])


def test_multi_sample_dropout_averages_in_training_only():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 3)
    msd = MultiSampleDropout(linear, samples=5, p=0.5)
    x = torch.randn(4, 8)
    msd.eval()
    assert torch.equal(msd(x), linear(x))  # one plain pass at eval
    msd.train()
    torch.manual_seed(1)
    out = msd(x)
    torch.manual_seed(1)
    dropout = torch.nn.Dropout(0.5)
    expected = torch.stack([linear(dropout(x)) for _ in range(5)]).mean(0)
    assert torch.allclose(out, expected)
    model = create_model("resnet18", 18, head="multitask", tasks=(3, 2, 3), msd=3)
    assert model.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 18)


# ---------------------------------------------------------------- sampler, age bins
def test_weighted_sampler_balances_classes():
    labels = [0] * 900 + [1] * 90 + [2] * 10
    counts = np.bincount(labels)
    sampler = EpochSampler(len(labels), seed=0, weights=[1.0 / counts[label] for label in labels])
    drawn = np.bincount([labels[i] for i, _ in sampler], minlength=3)
    assert len(labels) == drawn.sum()
    assert all(250 < n < 420 for n in drawn), drawn


def test_epoch_sampler_is_a_function_of_seed_and_epoch():
    sampler = EpochSampler(10, seed=3)
    sampler.set_epoch(2)
    epoch2 = list(sampler)
    assert sorted(i for i, _ in epoch2) == list(range(10))  # a permutation
    sampler.set_epoch(3)
    assert list(sampler) != epoch2
    again = EpochSampler(10, seed=3)
    again.set_epoch(2)
    assert list(again) == epoch2  # a fresh sampler (a resumed run) replays the epoch exactly
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert sum(map(len, shards)) == 12 and {i for s in shards for i, _ in s} == set(range(10))


def test_age_bins_change_training_labels_only():
    sample = Sample("images/p/mask1.jpg", encode_label(0, 1, age_band(58)), "p", 58)
    assert decode_label(training_label(sample))[2] == 1
    assert decode_label(training_label(sample, [30, 58]))[2] == 2
    assert training_label(Sample("x.jpg", 4, "pseudo:"), [30, 58]) == 4  # no age known: unchanged


# ---------------------------------------------------------------- relabel
def _meta(train_dir):
    return pd.read_csv(train_dir / "train.csv", dtype=str, keep_default_na=False)


def test_relabel_by_folder_id_and_image(sample_data, tmp_path, capsys):
    meta = _meta(sample_data / "train")
    person = meta.iloc[0]
    by_image = meta.iloc[1]["path"]
    normal = next(f for f in os.listdir(sample_data / "train" / "images" / by_image) if f.startswith("normal"))
    by_id = next(i for i in range(2, len(meta)) if (meta["id"] == meta["id"][i]).sum() == 1)
    other_gender = "male" if person["gender"] == "female" else "female"
    fixes = pd.DataFrame({"path": [person["path"], f"{by_image}/{normal}", ""],
                          "id": ["", "", meta["id"][by_id]],
                          "gender": [other_gender, "", ""], "age": ["", "", "75"], "mask": ["", "incorrect", ""]})
    fixes.to_csv(tmp_path / "fix.csv", index=False)
    _, before = dataset.read_mask_train(str(sample_data / "train"))
    _, after = dataset.read_mask_train(str(sample_data / "train"), relabel=str(tmp_path / "fix.csv"))
    changed = [(b, a) for b, a in zip(before, after) if b != a]
    assert len(changed) == 7 + 1 + 7  # a person's gender, one photo's mask, a person's age
    assert "relabel: 15 image label(s) changed" in capsys.readouterr().out
    for b, a in changed:
        if b.person == person["path"]:
            assert decode_label(a.label)[1] != decode_label(b.label)[1]
        elif b.person == by_image:
            assert b.path.endswith(normal) and decode_label(a.label)[0] == 1
        else:
            assert b.person == meta["path"][by_id] and decode_label(a.label)[2] == 2 and a.age == 75


def test_relabel_refuses_an_ambiguous_id(sample_data, tmp_path):
    meta = _meta(sample_data / "train")
    shared = meta["id"][meta["id"].duplicated()].iloc[0]  # the generator's two-people id
    pd.DataFrame({"id": [shared], "age": ["40"]}).to_csv(tmp_path / "fix.csv", index=False)
    with pytest.raises(UserError, match="names 2 people"):
        dataset.read_mask_train(str(sample_data / "train"), relabel=str(tmp_path / "fix.csv"))
    pd.DataFrame({"path": ["nobody_male_Asian_20"], "age": ["40"]}).to_csv(tmp_path / "fix.csv", index=False)
    with pytest.raises(UserError, match="nobody"):
        dataset.read_mask_train(str(sample_data / "train"), relabel=str(tmp_path / "fix.csv"))


# ---------------------------------------------------------------- per-task report
def test_task_f1_decomposes_the_18_classes():
    labels = [0, 17, 5, 9]
    preds = [0, 17, 4, 9]  # one age mistake (5 -> 4: female <30+1 band)
    scores = task_f1(labels, preds)
    assert scores["mask"] == 1.0 and scores["gender"] == 1.0 and scores["age"] < 1.0


# ---------------------------------------------------------------- all of it, end to end
@pytest.mark.slow  # an end-to-end run of a minute or so: `pytest -m 'not slow'` skips it
def test_toolkit_flags_end_to_end(work, tmp_path, run_here):
    """Save probabilities, ensemble them, then train with pseudo-labels, extra data, relabel,
    age bins, the weighted sampler, a multi-task MSD head and validation TTA."""
    base = ["--epochs", "1", *FAST]
    run_here("train.py", *base, "--name", "plain", cwd=work)
    probs = tmp_path / "a.csv"
    run_here("inference.py", "--model_dir", work / "runs" / "plain", "--output", probs, "--save_probs",
             "--tta", "hflip,zoom", cwd=work)
    saved = pd.read_csv(tmp_path / "a_probs.csv")
    assert list(saved.columns) == ["ImageID", *MASK_CLASSES]
    assert np.allclose(saved[MASK_CLASSES].sum(axis=1), 1, atol=1e-3)
    info = pd.read_csv(work / "data" / "eval" / "info.csv")
    assert saved["ImageID"].tolist() == info["ImageID"].tolist()
    # a confident pseudo-label file: the first three eval images at p = 0.95
    pseudo = saved.copy()
    pseudo[MASK_CLASSES] = 1.0 / 18
    pseudo.loc[:2, MASK_CLASSES] = 0.05 / 17
    pseudo.loc[:2, MASK_CLASSES[4]] = 0.95
    pseudo.to_csv(tmp_path / "pseudo_probs.csv", index=False)
    run_here("ensemble.py", tmp_path / "a_probs.csv", tmp_path / "pseudo_probs.csv", "--output",
             tmp_path / "ens.csv", "--info", work / "data" / "eval" / "info.csv", cwd=work)
    assert pd.read_csv(tmp_path / "ens.csv")["ImageID"].tolist() == info["ImageID"].tolist()

    extra = tmp_path / "extra"
    for i in (0, 7):
        os.makedirs(extra / str(i))
        for src in list((work / "data" / "eval" / "images").iterdir())[:2]:
            shutil.copy(src, extra / str(i) / src.name)
    person = _meta(work / "data" / "train").iloc[0]["path"]
    pd.DataFrame({"path": [person], "age": ["61"]}).to_csv(tmp_path / "fix.csv", index=False)
    result = run_here("train.py", *base, "--name", "kitchen", "--pseudo_labels", tmp_path / "pseudo_probs.csv",
                      "--pseudo_data_dir", work / "data" / "eval", "--extra_data", extra,
                      "--relabel", tmp_path / "fix.csv", "--age_bins", "30,58", "--sampler", "weighted",
                      "--head", "multitask", "--task_weights", "1,0.5,2", "--msd", "2", "--val_tta", "hflip",
                      cwd=work)
    assert "pseudo labels: 3 eval images" in result.stdout and "extra data: 4 training images" in result.stdout
    assert "relabel: 7 image label(s) changed" in result.stdout
    run_dir = work / "runs" / "kitchen"
    split = pd.read_csv(run_dir / "split.csv", keep_default_na=False)
    added = split[split["person"].str.startswith(("extra:", "pseudo:"))]
    assert len(added) == 7 and (added["side"] == "train").all()  # training side only
    plain_split = pd.read_csv(work / "runs" / "plain" / "split.csv")
    assert (split["side"] == "val").sum() == (plain_split["side"] == "val").sum()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    for column in ("val_f1_mask", "val_f1_gender", "val_f1_age"):
        assert metrics[column].between(0, 1).all()
    config = json.loads((run_dir / "config.json").read_text())
    assert config["head"] == "multitask" and config["msd"] == 2 and config["age_bins"] == [30, 58]
    # inference rebuilds the multi-task MSD model from config.json alone
    run_here("inference.py", "--model_dir", run_dir, "--output", tmp_path / "mt.csv", cwd=work)
    assert pd.read_csv(tmp_path / "mt.csv")["ans"].between(0, 17).all()


# ---------------------------------------------------------------- face crop
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_pipeline_cropping_in_photo_pixels_gets_full_size_photos(work, tmp_path, capsys, monkeypatch):
    """A registered pipeline that starts with CenterCrop(300, 240) (the photos are 384x512) cannot
    work on prepared (64x48 -> 72x54) images: training hands it the full-size photos instead,
    says so, and still caches and prepares the validation side."""
    import albumentations as A

    import augmentation
    import train
    sizes = []

    @augmentation.AUGMENTATIONS.register()  # for this test only: unregistered below
    def CenterCropFirst(resize, mean, std, **kwargs):
        def note(image, **params):
            sizes.append(image.shape[:2])
            return image
        return A.Compose([A.Lambda(image=note), A.CenterCrop(300, 240), A.Resize(*resize),
                          *augmentation.to_tensor(mean, std)])

    try:
        args = train.get_args_parser().parse_args([*FAST, "--epochs", "1", "--augmentation", "CenterCropFirst",
                                                   "--cache", "ram", "--data_dir", str(work / "data" / "train"),
                                                   "--model_dir", str(tmp_path), "--name", "crop"])
        run_dir = train.main(args)
    finally:
        augmentation.AUGMENTATIONS.unregister("CenterCropFirst")
    out = capsys.readouterr().out
    assert "does not start with a resize: training gets full-size photos" in out and "cache: " in out
    assert sizes and all(size == (512, 384) for size in sizes)
    assert len(pd.read_csv(os.path.join(run_dir, "metrics.csv"))) == 1


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_facecrop_training_reuses_the_cache_and_inference_crops_too(work, tmp_path, run_here):
    import facecrop
    import train
    data = work / "data_face"
    shutil.copytree(work / "data", data)
    args = train.get_args_parser().parse_args([*FAST, "--epochs", "1", "--facecrop", "True",
                                               "--data_dir", str(data / "train"), "--model_dir", str(tmp_path),
                                               "--name", "face"])
    from maskcls.data import TrainingData
    before = facecrop.DETECTOR.images
    first = TrainingData.load(args, (64, 48))
    detected = facecrop.DETECTOR.images - before
    assert detected == len(first.source.samples)  # the first run detects every image once
    run_dir = train.main(args)  # the second read: all from the cache
    assert facecrop.DETECTOR.images - before == detected
    assert TrainingData.load(args, (64, 48)).regions == first.regions  # the same crops
    assert (data / "train" / ".face_boxes.csv").is_file()
    config = json.loads(open(os.path.join(run_dir, "config.json")).read())
    assert config["facecrop"] is True and config["face_margin"] == 0.3
    result = run_here("inference.py", "--model_dir", run_dir, "--data_dir", data / "eval",
                      "--output", tmp_path / "face.csv", cwd=work)
    assert "face boxes:" in result.stdout  # inference applied the run's face crop
    assert (data / "eval" / "images" / ".face_boxes.csv").is_file()
