"""CPU smoke test of benchmarks/batch.py: every row runs, and its UNet work is what the algorithm lays out.

Timings are only checked to be positive; their values belong to the benchmark's outputs, not to tests."""

import json

from benchmarks import batch


STEPS = 3


def test_quick_run_writes_one_row_per_mode_and_batch_size(tmp_path):
    assert batch.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--steps", str(STEPS),
                       "--modes", "eager", "cuda_graphs", "--batch-sizes", "1", "2"]) == 0
    result = json.loads((tmp_path / "batch.json").read_text())
    rows = {(row["mode"], row["batch_size"]): row for row in result["rows"]}
    assert sorted(rows) == [("cuda_graphs", 1), ("cuda_graphs", 2), ("eager", 1), ("eager", 2)]
    for (mode, b), row in rows.items():
        assert row["error"] is None, row.get("traceback")
        assert row["edits_per_s"] > 0 and row["aggregate_edits_per_s"] > 0
        # NPI inversion: one conditional pass on the source prompt per step, batch b.
        # P2P edit, one target per image: per image a source branch (its conditional row; NPI's unconditional
        # embedding is the source prompt, so that row serves both) and a target branch (conditional row + an
        # unconditional row on the source prompt, since the target prompt differs): 3 rows per image, batch 3b.
        assert row["samples_per_call"] == {str(b): STEPS, str(3 * b): STEPS}, (mode, b)
        assert row["unet_calls"] == 2 * STEPS
    assert "Batch-editing throughput on CPU" in (tmp_path / "batch.md").read_text()
