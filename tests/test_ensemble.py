"""ensemble.py: the voting maths called directly, the CLI as a real subprocess on small files."""
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from ensemble import combine, read_probs
from maskcls import cli

SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "ensemble.py")
CLASSES = ["wear/M/<30", "wear/M/30-59", "wear/M/60+"]
IDS = ["cbc5c6e168e63498590db46022617123f1fe1268.jpg", "0e72482bf56b3581c081f7da2a6180b8792c7089.jpg",
       "000600-1.png", "NA"]  # a pandas NA-like id must stay a string


def write_probs(path, probs, ids=None, classes=None):
    ids = IDS[:len(probs)] if ids is None else ids
    frame = pd.DataFrame(np.asarray(probs, dtype=float), columns=classes or CLASSES)
    frame.insert(0, "ImageID", ids)
    frame.to_csv(path, index=False)
    return str(path)


def run(*args, cwd):
    return subprocess.run([sys.executable, SCRIPT, *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def read_output(path):
    return pd.read_csv(path, dtype=str, keep_default_na=False)


# The maths ----------------------------------------------------------------------------------

def test_soft_is_argmax_of_mean_and_differs_from_majority():
    a, b, c = [[0.9, 0.1, 0.0]], [[0.4, 0.6, 0.0]], [[0.4, 0.6, 0.0]]
    pred, combined = combine([a, b, c])
    np.testing.assert_allclose(combined, [[1.7 / 3, 1.3 / 3, 0.0]])
    assert pred.tolist() == [0]  # the confident model outweighs two lukewarm ones
    assert combine([a, b, c], "hard")[0].tolist() == [1]  # majority says 1


def test_weights_flip_the_answer():
    a, b = [[0.6, 0.4, 0.0]], [[0.3, 0.7, 0.0]]
    assert combine([a, b])[0].tolist() == [1]
    pred, combined = combine([a, b], "weighted", [3, 1])
    np.testing.assert_allclose(combined, [[0.525, 0.475, 0.0]])
    assert pred.tolist() == [0]
    assert combine([a, b], "soft", [3, 1])[0].tolist() == [0]  # weights turn soft into weighted


def test_weight_misuse_is_a_user_error():
    a = [[0.6, 0.4, 0.0]]
    for method, weights in (("weighted", None), ("weighted", [1]), ("weighted", [1, 0]), ("hard", [1, 1])):
        with pytest.raises(cli.UserError):
            combine([a, a], method, weights)


def test_hard_majority_and_vote_shares():
    files = [[[0.2, 0.7, 0.1], [0.8, 0.1, 0.1]],
             [[0.1, 0.5, 0.4], [0.1, 0.1, 0.8]],
             [[0.9, 0.05, 0.05], [0.1, 0.1, 0.8]]]
    pred, shares = combine(files, "hard")
    assert pred.tolist() == [1, 2]
    np.testing.assert_allclose(shares, [[1 / 3, 2 / 3, 0], [1 / 3, 0, 2 / 3]])


def test_hard_tie_broken_by_summed_probability_of_the_tied_classes():
    # votes: class 0 twice, class 1 twice, class 2 never; sums 0.9, 1.5, 1.6.
    files = [[[0.40, 0.25, 0.35]], [[0.40, 0.25, 0.35]], [[0.05, 0.50, 0.45]], [[0.05, 0.50, 0.45]]]
    assert combine(files, "hard")[0].tolist() == [1]  # not 0 (lowest index), not 2 (no votes)
    assert combine(files, "soft")[0].tolist() == [2]


def test_hard_full_tie_goes_to_the_lowest_index():
    files = [[[0.0, 0.6, 0.4]], [[0.0, 0.4, 0.6]]]  # one vote each, both sums 1.0
    assert combine(files, "hard")[0].tolist() == [1]


def test_read_probs_round_trip(tmp_path):
    probs = np.array([[0.2, 0.3, 0.5], [1.0, 0.0, 0.0], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4]])
    ids, classes, read = read_probs(write_probs(tmp_path / "a.csv", probs))
    assert ids == IDS and classes == CLASSES
    np.testing.assert_allclose(read, probs)


# The CLI --------------------------------------------------------------------------------------

@pytest.fixture
def two_files(tmp_path):
    a = write_probs(tmp_path / "a_probs.csv", [[0.9, 0.1, 0.0], [0.2, 0.5, 0.3], [0.1, 0.1, 0.8], [0.6, 0.3, 0.1]])
    b = write_probs(tmp_path / "b_probs.csv", [[0.3, 0.7, 0.0], [0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.2, 0.7, 0.1]])
    return a, b


def test_cli_soft_without_info_and_save_probs(tmp_path, two_files):
    out = tmp_path / "out" / "ens.csv"
    result = run(*two_files, "--output", out, "--save-probs", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frame = read_output(out)
    assert list(frame.columns) == ["ImageID", "ans"] and frame["ImageID"].tolist() == IDS
    assert frame["ans"].tolist() == ["0", "2", "2", "1"]
    ids, classes, probs = read_probs(str(tmp_path / "out" / "ens_probs.csv"))
    assert ids == IDS and classes == CLASSES
    np.testing.assert_allclose(probs[0], [0.6, 0.4, 0.0])
    assert "ensembled 2 files (soft) over 4 rows: 2 differ" in result.stdout
    assert not [n for n in os.listdir(tmp_path / "out") if ".tmp" in n]


def test_cli_weighted_and_hard(tmp_path, two_files):
    result = run(*two_files, "--weights", "1,3", "--output", tmp_path / "w.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_output(tmp_path / "w.csv")["ans"].tolist() == ["1", "2", "2", "1"]
    result = run(*two_files, "--method", "hard", "--output", tmp_path / "h.csv", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_output(tmp_path / "h.csv")["ans"].tolist() == ["0", "2", "2", "1"]


def test_cli_info_keeps_rows_order_and_columns(tmp_path, two_files):
    info = tmp_path / "info.csv"
    pd.DataFrame({"ImageID": IDS, "ans": [0] * 4, "note": ["x", "", "y", "z"]}).to_csv(info, index=False)
    out = tmp_path / "submission.csv"
    result = run(*two_files, "--info", info, "--output", out, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    frame = read_output(out)
    assert list(frame.columns) == ["ImageID", "ans", "note"]
    assert frame["ImageID"].tolist() == IDS and frame["note"].tolist() == ["x", "", "y", "z"]
    assert frame["ans"].tolist() == ["0", "2", "2", "1"]


def _refused(result, *paths):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ensemble.py: error:"), result.stderr
    for path in paths:
        assert not os.path.exists(path), path
    return lines[0]


def _bad_cases(tmp_path, a):
    rows = [[0.5, 0.5, 0.0]] * 4
    return {
        "another order": [write_probs(tmp_path / "order.csv", rows, ids=IDS[::-1])],
        "other id": [write_probs(tmp_path / "other.csv", rows, ids=IDS[:3] + ["zzz.jpg"])],
        "fewer rows": [write_probs(tmp_path / "short.csv", rows[:3])],
        "other classes": [write_probs(tmp_path / "cls.csv", rows, classes=["a", "b", "c"])],
        "classes reordered": [write_probs(tmp_path / "swap.csv", rows, classes=CLASSES[::-1])],
        "missing file": [str(tmp_path / "nope.csv")],
        "nan": [write_probs(tmp_path / "nan.csv", [[0.5, 0.5, 0.0]] * 3 + [[np.nan, 0.5, 0.5]])],
        "text": [str(tmp_path / "text.csv")],
        "no ImageID": [str(tmp_path / "noid.csv")],
        "logits": [write_probs(tmp_path / "logits.csv", [[2.0, -1.0, 0.5]] * 4)],
        "one file": [],
        "weight count": [a, "--weights", "1,2,3"],
        "weights with hard": [a, "--weights", "1,2", "--method", "hard"],
        "weighted without weights": [a, "--method", "weighted"],
    }


@pytest.mark.parametrize("case", ["another order", "other id", "fewer rows", "other classes", "classes reordered",
                                  "missing file", "nan", "text", "no ImageID", "logits", "one file",
                                  "weight count", "weights with hard", "weighted without weights"])
def test_cli_refusals_write_nothing(tmp_path, two_files, case):
    a, _ = two_files
    pd.DataFrame({"ImageID": IDS, **{c: ["0.5", "0.5", "abc", "0"] for c in CLASSES}}).to_csv(
        tmp_path / "text.csv", index=False)
    pd.DataFrame({"id": IDS, **{c: [1 / 3] * 4 for c in CLASSES}}).to_csv(tmp_path / "noid.csv", index=False)
    out = tmp_path / "out.csv"
    line = _refused(run(a, *_bad_cases(tmp_path, a)[case], "--output", out, "--save_probs", cwd=tmp_path),
                    out, tmp_path / "out_probs.csv")
    if case in ("another order", "other id"):
        assert "row 1" in line or "row 4" in line, line
    if case == "another order":
        assert "another order" in line


def test_cli_refuses_info_with_other_ids(tmp_path, two_files):
    info = tmp_path / "info.csv"
    pd.DataFrame({"ImageID": IDS[:3] + ["other.jpg"], "ans": [0] * 4}).to_csv(info, index=False)
    line = _refused(run(*two_files, "--info", info, "--output", tmp_path / "s.csv", cwd=tmp_path),
                    tmp_path / "s.csv")
    assert "row 4" in line and "other.jpg" in line


def test_cli_existing_output_needs_overwrite(tmp_path, two_files):
    out = tmp_path / "ens.csv"
    out.write_text("keep me\n")
    _refused(run(*two_files, "--output", out, cwd=tmp_path))
    assert out.read_text() == "keep me\n"
    result = run(*two_files, "--output", out, "--overwrite", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert read_output(out)["ans"].tolist() == ["0", "2", "2", "1"]


def test_cli_never_writes_over_an_input(tmp_path, two_files):
    a, b = two_files
    before = open(a).read()
    _refused(run(a, b, "--output", tmp_path / "a.csv", "--save_probs", "--overwrite", cwd=tmp_path))
    assert open(a).read() == before
