"""The committed small toy model (v1): the papers' reconstruction ordering on a trained model, and a benchmark
subset. (The default v2 model's measurements are the benchmarks' business: `benchmarks/results/pie_toy_v2`.)"""

import dataclasses
import math

import pytest
import torch

from toy_world import evaluate


@pytest.fixture(scope="module")
def toy_pipe():
    torch.manual_seed(0)
    return evaluate.load_pipeline(evaluate.SMALL_MODEL_DIR)


@pytest.fixture(scope="module")
def pairs():
    return evaluate.make_pairs(2, seed=3, res=evaluate.SMALL_MODEL_RES)


def test_npi_reconstruction_beats_ddim_cfg_by_a_clear_margin(toy_pipe, pairs):
    images = [pair.source_image for pair in pairs]
    inversion = toy_pipe.invert(images, [pair.source_caption for pair in pairs], num_inference_steps=10)
    npi = toy_pipe(inversion=inversion, output_type="pt").images
    ddim_cfg = toy_pipe(inversion=dataclasses.replace(inversion, method="ddim"), output_type="pt").images
    for image, a, b in zip(images, npi, ddim_cfg):
        assert evaluate.psnr(a, image) > evaluate.psnr(b, image) + 6.0


def test_nti_tracks_the_trajectory_at_least_as_well_as_npi(toy_pipe, pairs):
    pair = pairs[0]
    steps = 10
    track = {}
    for method in ("npi", "nti"):
        inversion = toy_pipe.invert(pair.source_image, pair.source_caption, num_inference_steps=steps,
                                    inversion_method=method, null_text_init="null")
        seen = []

        def capture(pipe, i, t, tensors):
            seen.append(float((tensors["latents"] - inversion.latents[:, steps - i - 1]).pow(2).mean()))
            return tensors

        toy_pipe(inversion=inversion, output_type="latent", callback_on_step_end=capture)
        track[method] = sum(seen)
    assert track["nti"] <= track["npi"], track


def test_benchmark_subset_runs_and_reports(toy_pipe, pairs, tmp_path):
    methods = ["ddim+cfg", "npi", "npi+p2p", "proxnpi+p2p", "masactrl"]
    result = evaluate.evaluate(toy_pipe, pairs, methods, steps=6, batch_size=2)
    summary = evaluate.summarise(result)
    assert set(summary["methods"]) == set(methods)
    for entry in summary["methods"].values():
        assert math.isfinite(entry["edit_psnr"]) and 0 <= entry["attribute_accuracy"] <= 1
    assert summary["reconstruction_psnr"]["npi"] > summary["reconstruction_psnr"]["ddim+cfg"]
    table = evaluate.markdown_table(summary)
    assert table.count("\n| ") >= len(methods) + 2
    grid = evaluate.example_grid(pairs, result)
    assert grid.size == ((2 + len(methods)) * 128, 12 + 2 * 128)
