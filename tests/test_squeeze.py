"""The tools that squeeze macro F1 out of held-out predictions: --difficulty real sample data,
per-class bias tuning, and inference applying the bias."""
import csv
import json
import re
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import f1_score

from conftest import FAST, one_line_error
from dataset import DATASETS
import dataset
import ensemble
import make_sample_data as msd
from maskcls.heldout import apply_bias, read_heldout
from maskcls.images import ImageDataset
from maskcls.labels import MASK_CLASSES, decode_label, encode_label, task_marginals
from maskcls.metrics import macro_f1
import persons as persons_mod
import tune_bias


# ---------------------------------------------------------------- --difficulty real
@pytest.fixture(scope="module")
def real_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    msd.generate(out, persons=200, eval_persons=10, seed=3, difficulty="real")
    return out


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_real_difficulty_plants_about_one_percent_wrong_labels(real_data):
    train = real_data / "train"
    rows = list(csv.DictReader(open(train / "train.csv")))
    noise = pd.read_csv(train / "label_noise.csv")
    assert 0.005 <= len(noise) / (7 * len(rows)) <= 0.02
    assert (noise["label"] != noise["true_label"]).all()
    paths = {r["path"] for r in rows}
    for path, written in zip(noise["path"], noise["label"]):
        folder, name = path.split("/")
        assert folder in paths and (train / "images" / path).is_file()
        gender, age = folder.split("_")[1], int(folder.split("_")[3])
        assert written == msd.label(msd.PHOTOS[[s for s, _ in msd.PHOTOS].index(name.split(".")[0])][1],
                                    gender, age), "label column is what the folder and file name say"
    kinds = Counter()
    for written, true in zip(noise["label"], noise["true_label"]):
        (wm, wg, wa), (tm, tg, ta) = decode_label(written), decode_label(true)
        kinds.update(["mask"] * (wm != tm) + ["gender"] * (wg != tg) + ["age"] * (wa != ta))
    assert kinds["mask"] and kinds["gender"], kinds
    answers = pd.read_csv(real_data / "eval" / "answers.csv")
    assert len(answers) == 70 and not (real_data / "eval" / "label_noise.csv").exists()


def test_real_difficulty_age_cue_is_continuous():
    """Hair brightness follows age year by year with a per-person spread: 59 and 60 overlap, 20 and 60 don't."""
    def hair(age, seed):
        return np.mean(msd.sample_real_look(np.random.default_rng(seed), "female", age)["hair"])
    at = {age: np.array([hair(age, s) for s in range(60)]) for age in (20, 45, 59, 60)}
    assert at[20].mean() < at[45].mean() < at[59].mean() <= at[60].mean() + 10
    assert at[20].max() < at[60].min()
    assert (at[60] < at[59].max()).mean() > 0.1, "some 60+ people look no older than a 59-year-old"


def test_easy_stays_the_default_and_bad_difficulty_is_refused(tmp_path, run_here):
    result = run_here("make_sample_data.py", "--out", tmp_path / "d", "--difficulty", "hard", check=False)
    assert result.returncode == 2 and "difficulty" in result.stderr and not (tmp_path / "d").exists()


# ---------------------------------------------------------------- tune_bias.py
def _write_heldout(run_dir, labels, probs, persons, classes, name="oof.csv"):
    run_dir.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame(probs.round(6), columns=classes)
    frame.insert(0, "pred", probs.argmax(1))
    frame.insert(0, "label", labels)
    frame.insert(0, "person", persons)
    frame.insert(0, "path", [f"img{i:05d}.jpg" for i in range(len(labels))])
    frame.to_csv(run_dir / name, index=False)
    if not (run_dir / "config.json").exists():  # the classes the readers check the file against
        (run_dir / "config.json").write_text(json.dumps({"classes": list(classes), "fold_dirs": ["fold1"]}))


def _biased_model(n_persons=400, shift=1.6, seed=0):
    """Held-out predictions of a model that under-predicts the 60+ band by `shift` logits."""
    rng = np.random.default_rng(seed)
    person_label = rng.choice(18, size=n_persons, p=np.r_[np.tile([0.45, 0.45, 0.1], 6)] / 6)
    labels = np.repeat(person_label, 7)
    persons = np.repeat([f"p{i}" for i in range(n_persons)], 7)
    logits = rng.normal(0, 1.0, (len(labels), 18))
    logits[np.arange(len(labels)), labels] += 2.5
    logits[:, [decode_label(c)[2] == 2 for c in range(18)]] -= shift
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return labels, probs, persons


def test_fit_bias_recovers_a_known_bias():
    labels, probs, _ = _biased_model()
    log_probs = np.log(probs)
    grid = tune_bias.offset_grid(2.0, 0.1)
    basis = tune_bias.bias_basis(MASK_CLASSES, "factor")
    bias, f1 = tune_bias.fit_bias(log_probs, labels, grid, basis=basis)
    before = macro_f1(labels, log_probs.argmax(1), 18)
    assert f1 > before + 0.03
    old = [decode_label(c)[2] == 2 for c in range(18)]
    assert bias[old].mean() - bias[np.logical_not(old)].mean() > 0.7, bias  # pushed towards 60+
    assert before == pytest.approx(f1_score(labels, log_probs.argmax(1), average="macro", labels=list(range(18)),
                                            zero_division=0))


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_tune_bias_cli_cross_fits_and_saves(tmp_path, run_here):
    labels, probs, persons = _biased_model()
    run = tmp_path / "kf"
    _write_heldout(run, labels, probs, persons, MASK_CLASSES)
    result = run_here("tune_bias.py", run)
    saved = json.loads((run / "bias.json").read_text())
    assert saved["classes"] == MASK_CLASSES and saved["per"] == "factor" and len(saved["bias"]) == 18
    assert saved["f1_cross_fitted"] > saved["f1_before"] + 0.02, saved
    assert saved["f1_in_sample"] >= saved["f1_cross_fitted"] - 0.01
    assert "(gain +" in result.stdout and "wrote" in result.stdout
    # nothing to gain (every held-out prediction right): nothing saved, and an earlier bias.json goes
    perfect = tmp_path / "perfect"
    probs = np.full((len(labels), 18), 0.01)
    probs[np.arange(len(labels)), labels] = 0.83
    _write_heldout(perfect, labels, probs, persons, MASK_CLASSES, name="val_predictions.csv")
    (perfect / "bias.json").write_text((run / "bias.json").read_text())
    result = run_here("tune_bias.py", perfect, "--per", "class")
    assert "not saved" in result.stdout and "removed the earlier" in result.stdout
    assert not (perfect / "bias.json").exists()


def test_tune_bias_refuses_a_folder_without_heldout_predictions(tmp_path, run_here):
    one_line_error(run_here("tune_bias.py", tmp_path, check=False), "oof.csv")


def test_apply_bias_moves_the_argmax_and_keeps_rows_summing_to_one():
    probs = np.array([[0.6, 0.3, 0.1], [0.2, 0.5, 0.3]])
    out = apply_bias(probs, [0.0, 0.0, 2.0])
    assert np.allclose(out.sum(1), 1) and (out.argmax(1) == [2, 2]).all()
    assert np.allclose(apply_bias(probs, [0, 0, 0]), probs)


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_inference_bias_person_pool_and_recipe(work, tmp_path, run_here):
    run_here("train.py", *FAST, "--epochs", "1", "--name", "biased", "--model_dir", tmp_path, cwd=work)
    run = tmp_path / "biased"
    held = read_heldout(run)  # single runs write val_predictions.csv
    assert held.source.endswith("val_predictions.csv") and len(held.labels) > 0
    bias = np.zeros(18)
    bias[5] = 50.0  # every image to class 5
    (run / "bias.json").write_text(json.dumps({"classes": MASK_CLASSES, "bias": bias.tolist(),
                                               "f1_before": 0.1, "f1_cross_fitted": 0.2, "fitted_on": "x"}))
    result = run_here("inference.py", "--model_dir", run, "--output", tmp_path / "b.csv", cwd=work)
    assert "applying the per-class bias" in result.stdout
    assert (pd.read_csv(tmp_path / "b.csv")["ans"] == 5).all()
    result = run_here("inference.py", "--model_dir", run, "--output", tmp_path / "n.csv", "--no_bias", cwd=work)
    assert "not applied (--no_bias)" in result.stdout
    assert not (pd.read_csv(tmp_path / "n.csv")["ans"] == 5).all()
    # --person_pool: groups of 7 from the photos' content; gender and age agree within a group
    result = run_here("inference.py", "--model_dir", run, "--output", tmp_path / "p.csv", "--person_pool", "--no_bias",
                      "--answers", work / "data" / "eval" / "answers.csv", cwd=work)
    assert re.search(r"person pool: 70 photos, \d+ groups of one person's 7 mask states pooled", result.stdout)
    # a fitted recipe (here two members: the run and itself) is followed by inference --recipe
    recipe = tmp_path / "recipe.json"
    result = run_here("ensemble.py", "--fit", run, run, "--recipe", recipe, cwd=work)
    saved = json.loads(recipe.read_text())
    assert saved["members"] and abs(sum(saved["weights"]) - 1) < 1e-6 and "cross-fitted" in result.stdout
    result = run_here("inference.py", "--recipe", recipe, "--output", tmp_path / "r.csv", "--save_probs", "--no_bias",
                      cwd=work)
    run_here("inference.py", "--model_dir", run, "--output", tmp_path / "s.csv", "--save_probs", "--no_bias",
                    cwd=work)
    assert np.allclose(pd.read_csv(tmp_path / "r_probs.csv").iloc[:, 1:], pd.read_csv(tmp_path / "s_probs.csv").iloc[:, 1:],
                       atol=1e-5)
    (run / "bias.json").write_text(json.dumps({"classes": ["a", "b"], "bias": [0, 1]}))
    result = run_here("inference.py", "--model_dir", run, "--output", tmp_path / "x.csv", cwd=work, check=False)
    assert result.returncode != 0 and "rerun tune_bias.py" in result.stderr and not (tmp_path / "x.csv").exists()


def test_ensemble_fit_refuses_runs_that_do_not_align(tmp_path, run_here):
    labels, probs, persons = _biased_model(n_persons=20)
    _write_heldout(tmp_path / "a", labels, probs, persons, MASK_CLASSES)
    _write_heldout(tmp_path / "b", labels[:-7], probs[:-7], persons[:-7], MASK_CLASSES)
    result = run_here("ensemble.py", "--fit", tmp_path / "a", tmp_path / "b", "--recipe", tmp_path / "r.json",
                      check=False)
    one_line_error(result, "same images")
    assert not (tmp_path / "r.json").exists()


# ---------------------------------------------------------------- audit.py
def _oof_from_truth(labels, rng, sharpness=4.0):
    """Held-out probabilities of a fair model: peaked on each image's TRUE label, with noise."""
    logits = rng.normal(0, 1.0, (len(labels), 18))
    logits[np.arange(len(labels)), labels] += sharpness
    return labels, np.exp(logits) / np.exp(logits).sum(1, keepdims=True)


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_audit_finds_planted_label_errors_among_its_top_suspects(sample_data, tmp_path, run_here):
    source = DATASETS.build("MaskBaseDataset", str(sample_data / "train"))
    written = np.array([s.label for s in source.samples])  # what train.csv says
    true = written.copy()  # what the photos show: three persons' labels are wrong in the data
    persons = np.array([s.person for s in source.samples])
    people = sorted(set(persons))
    gender_flip, age_flip, swapped = people[3], people[11], people[20]
    for i, person in enumerate(persons):
        m, g, a = decode_label(written[i])
        if person == gender_flip:
            true[i] = encode_label(m, 1 - g, a)
        elif person == age_flip:
            true[i] = encode_label(m, g, (a + 1) % 3)
        elif person == swapped and m > 0:
            true[i] = encode_label(3 - m, g, a)
    probs = _oof_from_truth(true, np.random.default_rng(0))[1]
    run = tmp_path / "run"
    frame = pd.DataFrame(probs.round(6), columns=MASK_CLASSES)
    frame.insert(0, "pred", probs.argmax(1))
    frame.insert(0, "label", written)
    frame.insert(0, "fold", 1)
    frame.insert(0, "person", persons)
    frame.insert(0, "path", [s.path for s in source.samples])
    run.mkdir()
    frame.to_csv(run / "oof.csv", index=False)
    (run / "config.json").write_text(json.dumps({"data_dir": str(sample_data / "train"), "classes": MASK_CLASSES,
                                                 "fold_dirs": ["fold1"]}))
    result = run_here("audit.py", run, "--top", "8")
    suspects = pd.read_csv(run / "audit" / "suspects.csv", keep_default_na=False)
    top = suspects.head(8)
    found = {(k, p) for k, p in zip(top["kind"], top["path"])}
    assert ("gender", gender_flip) in found and ("age", age_flip) in found, top
    swapped_paths = {s.path for s, w, t in zip(source.samples, written, true) if s.person == swapped and w != t}
    assert len(swapped_paths) == 2 and swapped_paths <= {p for k, p in found if k == "mask"}, top
    fixes = pd.read_csv(run / "audit" / "fixes.csv", dtype=str, keep_default_na=False)
    flip = fixes[fixes["path"] == gender_flip]
    true_gender = "female" if decode_label(true[list(persons).index(gender_flip)])[1] else "male"
    assert list(flip["gender"]) == [true_gender]
    assert (run / "audit" / "suspects.png").stat().st_size > 10_000
    assert "draft fixes" in result.stdout
    # the draft is --relabel's format: the data reader takes it and changes exactly the planted labels
    relabelled = DATASETS.build("MaskBaseDataset", str(sample_data / "train"), relabel=str(run / "audit" / "fixes.csv"))
    fixed = {s.path: s.label for s in relabelled.samples}
    planted = [(s.path, t) for s, w, t in zip(source.samples, written, true) if w != t]
    assert len(planted) == 16  # 7 + 7 + 2
    for path, t in planted:
        assert fixed[path] == t, path
    again = run_here("audit.py", run, check=False)
    assert again.returncode != 0 and "--overwrite" in again.stderr


# ---------------------------------------------------------------- persons.py
@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_person_grouping_purity_on_generated_eval_data(real_data):
    owners = pd.read_csv(real_data / "eval" / "persons.csv")
    paths = [str(real_data / "eval" / "images" / i) for i in owners["ImageID"]]
    groups = persons_mod.group_photos(paths)
    assert groups.max() + 1 == 10
    assert persons_mod.purity(groups, owners["person"].to_numpy()) >= 0.9


def test_pool_shares_gender_and_age_in_a_group_and_keeps_each_mask():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(18), size=14)
    groups = np.repeat([0, 1], 7)
    pooled = persons_mod.pool(probs, groups)
    assert np.allclose(pooled.sum(1), 1)
    before, after = task_marginals(probs), task_marginals(pooled)
    assert np.allclose(before[0], after[0])  # mask: per image
    for task in (1, 2):
        assert np.allclose(after[task][:7], after[task][0]) and np.allclose(after[task][7:], after[task][7])
        assert np.allclose(after[task][0], before[task][:7].mean(0))


def test_only_groups_holding_one_persons_mask_states_are_pooled():
    probs = np.full((15, 18), 1e-3)
    masks = [0, 0, 0, 0, 0, 1, 2] + [0, 0, 0, 0, 1, 1, 2] + [0]  # a person; a merged group; a stray photo
    for i, m in enumerate(masks):
        probs[i, encode_label(m, i % 2, 0)] = 1.0
    groups = persons_mod.complete_groups(np.array([0] * 7 + [1] * 7 + [2]), probs)
    assert len(set(groups[:7])) == 1 and len(set(groups[7:])) == 8
    assert persons_mod.pooled_groups(groups) == 1


# ---------------------------------------------------------------- ensemble.py --fit
def test_greedy_fit_keeps_the_useful_members_and_drops_noise():
    labels, good, _ = _biased_model(n_persons=200, shift=0.0, seed=4)
    rng = np.random.default_rng(9)
    other = good * 0.5 + rng.dirichlet(np.ones(18), len(labels)) * 0.5
    noise = rng.dirichlet(np.ones(18), len(labels))
    counts = ensemble.greedy_fit([noise, good, other], labels, steps=10)
    assert counts[1] >= 1 and counts[0] == 0, counts


# ---------------------------------------------------------------- --pseudo_soft
def test_soft_pseudo_labels_are_drawn_from_their_probabilities(work):
    eval_dir = work / "data" / "eval"
    info = pd.read_csv(eval_dir / "info.csv")
    probs = np.full((len(info), 18), 0.0)
    probs[:, 4], probs[:, 10], probs[:, 0] = 0.7, 0.3, 0.0
    frame = pd.DataFrame(probs, columns=MASK_CLASSES)
    frame.insert(0, "ImageID", info["ImageID"])
    path = work / "soft_probs.csv"
    frame.to_csv(path, index=False)
    hard = dataset.read_pseudo_labels(str(path), str(eval_dir), 0.6, MASK_CLASSES)
    soft = dataset.read_pseudo_labels(str(path), str(eval_dir), 0.6, MASK_CLASSES, soft=True)
    assert [s.label for s in hard] == [s.label for s in soft] == [4] * len(info) and hard[0].soft is None
    assert soft[0].soft[4] == pytest.approx(0.7) and soft[0].soft[10] == pytest.approx(0.3)
    ds = ImageDataset([s.path for s in soft[:1]], [4], lambda image: {"image": 0}, soft=[soft[0].soft])
    draws = [ds[(0, seed)][1] for seed in range(400)]
    assert set(draws) == {4, 10} and 0.6 < draws.count(4) / 400 < 0.8
    assert draws == [ds[(0, seed)][1] for seed in range(400)], "a pure function of the seed"
    assert ds[0][1] == 4, "no seed (validation, previews): the argmax"


@pytest.mark.slow  # trains or starts a CLI (seconds): `pytest -m 'not slow'` skips it
def test_pseudo_soft_trains_and_needs_pseudo_labels(work, tmp_path, run_here):
    result = run_here("train.py", *FAST, "--epochs", "1", "--pseudo_soft", "--model_dir", tmp_path, cwd=work,
                      check=False)
    assert result.returncode == 2 and "--pseudo_soft needs --pseudo_labels" in result.stderr
    assert not any(tmp_path.iterdir())
    result = run_here("train.py", *FAST, "--epochs", "1", "--model_dir", tmp_path, "--pseudo_labels",
                      work / "soft_probs.csv", "--pseudo_threshold", "0.6", "--pseudo_soft", cwd=work)
    assert "pseudo labels: 70 eval images at top probability >= 0.6, soft" in result.stdout
