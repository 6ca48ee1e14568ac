"""CPU smoke test of benchmarks/batch.py: every row runs, and its UNet work is what the algorithm lays out.

Timings are only checked to be positive and consistent with each other; their values belong to the benchmark's
outputs, not to tests."""

import json

import pytest
import torch

from benchmarks import batch
from benchmarks.utilisation import unet_work


STEPS = 3


def test_quick_run_writes_one_row_per_mode_and_batch_size(tmp_path):
    assert (
        batch.main(
            [
                "--quick",
                "--device",
                "cpu",
                "--out",
                str(tmp_path),
                "--steps",
                str(STEPS),
                "--modes",
                "eager",
                "cuda_graphs",
                "--batch-sizes",
                "1",
                "2",
            ]
        )
        == 0
    )
    result = json.loads((tmp_path / "batch.json").read_text())
    rows = {(row["mode"], row["batch_size"]): row for row in result["rows"]}
    assert sorted(rows) == [("cuda_graphs", 1), ("cuda_graphs", 2), ("eager", 1), ("eager", 2)]
    flops_per_sample = result["metadata"]["unet_gflop_per_sample"] * 1e9
    for (mode, b), row in rows.items():
        assert row["error"] is None, row.get("traceback")
        assert row["edits_per_s"] > 0 and row["aggregate_edits_per_s"] > 0
        # NPI inversion: one conditional pass on the source prompt per step, batch b.
        # P2P edit, one target per image: per image a source branch (its conditional row; NPI's unconditional
        # embedding is the source prompt, so that row serves both) and a target branch (conditional row + an
        # unconditional row on the source prompt, since the target prompt differs): 3 rows per image, batch 3b.
        assert row["samples_per_call"] == {str(b): STEPS, str(3 * b): STEPS}, (mode, b)
        assert row["unet_calls"] == 2 * STEPS
        # Utilisation: the FLOPs are the algorithm's 4b samples per step, and the timed components fit in the run.
        assert row["unet_tflop"] == pytest.approx(flops_per_sample * 4 * b * STEPS / 1e12, rel=1e-12)
        assert row["unet_tflops"] == pytest.approx(row["unet_tflop"] / row["median_s"], rel=1e-12)
        assert 0 < row["peak_fraction"] and 0 < row["attention_s"]
        parts = row["breakdown"]
        assert parts["wall_s"] == row["median_s"]
        assert min(parts["unet_s"], parts["vae_s"], parts["text_encoders_s"]) > 0
        assert parts["unet_s"] + parts["vae_s"] + parts["text_encoders_s"] <= parts["wall_s"]
    table = (tmp_path / "batch.md").read_text()
    assert "Batch-editing throughput on CPU" in table and "UNet TFLOP/s" in table


@torch.no_grad()
def test_unet_flops_are_counted_per_sample(pipe):
    """A UNet forward's work is linear in its batch: the count per sample, and every attention call, do not depend
    on the batch it was counted at (the benchmarks scale one count by each row's samples)."""
    one, two = (unet_work(pipe, 32, torch.device("cpu"), torch.float32, batch=batch) for batch in (1, 2))
    assert one["flops_per_sample"] == two["flops_per_sample"] > 0
    assert one["attention_calls"] == two["attention_calls"] and len(one["attention_calls"]) > 0
