"""bench.py runs end to end and writes every figure it promises (no timing is asserted)."""
import json

from conftest import run_cli

KEYS = ["loader_vs_naive", "loader_cached_vs_naive", "train_vs_ceiling", "train_vs_fp32", "infer_vs_ceiling",
        "infer_vs_fp32", "detect_batched_vs_single"]


def test_bench_quick_prints_the_table_and_writes_the_json(sample_data, tmp_path):
    out = tmp_path / "bench.json"
    # the sample data is reused (bench.py only generates where --data has no train/); a tiny model and size
    result = run_cli("bench.py", "--quick", "--data", sample_data, "--json", out, "--model", "BaseModel",
                     "--resize", "64,48", "--batch_size", "8", "--num_workers", "2")
    figures = json.loads(out.read_text())
    for key in KEYS:
        assert figures[key] > 0, key
    for name in ("loader", "loader_cached", "naive", "train", "train_ceiling", "train_fp32", "infer",
                 "infer_ceiling", "infer_fp32", "detect_batched", "detect_single"):
        assert figures[f"{name}_imgs_per_s"] > 0 and figures[f"{name}_peak_rss_mb"] > 0, name
    assert figures["info"]["mode"] == "quick" and figures["info"]["faces_found"]
    lines = result.stdout.splitlines()
    assert any(line.startswith("loader, every image decoded") for line in lines)
    assert any(line.startswith("face detection, 16 vs 1") for line in lines)
    assert "model step, compiled" not in result.stdout  # compile only in full runs
