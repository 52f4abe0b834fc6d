"""bench.py runs end to end and reports what README quotes: its rows in the table and the JSON,
the quality section's rows for every recipe. Small sizes: what is checked is that each section
measures and reports, never a speed."""
import json

import pytest

from conftest import run_cli


@pytest.mark.slow  # starts the benchmark's processes (a minute): `pytest -m 'not slow'` skips it
def test_loader_and_infer_sections_report_every_row(sample_data, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench.py", "--quick", "--sections", "loader,infer", "--data", sample_data, "--json", out,
                     "--resize", "64,64", "--batch_size", "8", "--num_workers", "2")
    figures = json.loads(out.read_text())
    for key in ("loader_vs_naive", "loader_cached_vs_naive", "loader_second_run_vs_naive", "infer_vs_ceiling",
                "infer_warm_vs_ceiling", "infer_vs_fp32"):
        assert figures[key] > 0, key
    for name in ("naive", "loader", "loader_cached", "loader_stored", "infer", "infer_warm", "infer_ceiling"):
        assert figures[f"{name}_imgs_per_s"] > 0 and figures[f"{name}_peak_rss_mb"] > 0, name
    for row in ("loader, every image decoded", "loader, ImageCache(ram)", "loader, a later run's 1st epoch",
                "predict (cold) vs model-only", "predict (warm) vs model-only"):
        assert row in result.stdout, row


@pytest.mark.slow  # trains resnet18 alone, beside a busy loop and on batches in memory (about a minute)
def test_train_and_small_sections_report_every_row(sample_data, tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli("bench.py", "--quick", "--sections", "train,contended_small", "--data", sample_data, "--json",
                     out, "--resize", "64,64", "--batch_size", "8", "--num_workers", "2")
    figures = json.loads(out.read_text())
    for key in ("train_vs_ceiling", "contended_small_slowdown", "train_small_vs_ceiling"):
        assert figures[key] > 0, key
    for name in ("train", "train_ceiling", "train_quiet_small", "train_hog_small", "train_ceiling_small"):
        assert figures[f"{name}_imgs_per_s"] > 0, name
    for row in ("train step vs model-only", "the same at 32x32", "train step vs model-only, 32x32"):
        assert row in result.stdout, row


@pytest.mark.slow  # trains resnet18 five ways on digits (about two minutes)
def test_quality_section_runs_every_recipe(tmp_path):
    out = tmp_path / "quality.json"
    result = run_cli("bench.py", "--sections", "quality", "--quick", "--epochs", "1", "--seeds", "0",
                     "--quality_data", "digits", "--json", out)
    figures = json.loads(out.read_text())
    for recipe in ("ours_defaults", "ours", "refit", "competent", "competent_batch", "defaults"):
        runs = figures[f"quality_digits_{recipe}"]
        assert len(runs["accuracy"]) == 1 and 0 <= runs["accuracy"][0] <= 1 and runs["seconds"][0] > 0, recipe
    assert "digits       project defaults" in result.stdout and "refit / timm competent" in result.stdout
    assert "lfw_subset" not in result.stdout and not any(key.startswith("quality_lfw") for key in figures)
