"""The toy-world harness end to end: the papers' reconstruction orderings on the trained embedded model (v2, 128 px;
``slow``: they need trained weights), and a benchmark subset on a tiny random-weight toy model folder (conftest
``tiny_toy_model``): every method runs and reports. (The v2 model's measurements are the benchmarks' business:
`benchmarks/results/pie_toy_v2`.)"""

import dataclasses
import json
import math

import PIL.Image
import pytest
import torch
from safetensors import safe_open

from negative_prompt_inversion import NegativePromptInversionPipeline
from toy_world import evaluate


@pytest.fixture(scope="module")
def trained_pipe():
    torch.manual_seed(0)
    return evaluate.load_pipeline(evaluate.MODEL_DIR)


@pytest.fixture(scope="module")
def trained_pairs():
    return evaluate.make_pairs(2, seed=3, res=evaluate.MODEL_RES)


@pytest.mark.slow
def test_npi_reconstruction_beats_ddim_cfg_by_a_clear_margin(trained_pipe, trained_pairs):
    pipe, pairs = trained_pipe, trained_pairs
    images = [pair.source_image for pair in pairs]
    inversion = pipe.invert(images, [pair.source_caption for pair in pairs], num_inference_steps=10)
    npi = pipe(inversion=inversion, output_type="pt").images
    ddim_cfg = pipe(inversion=dataclasses.replace(inversion, method="ddim"), output_type="pt").images
    for image, a, b in zip(images, npi, ddim_cfg):
        assert evaluate.psnr(a, image) > evaluate.psnr(b, image) + 6.0


@pytest.mark.slow
def test_nti_tracks_the_trajectory_at_least_as_well_as_npi(trained_pipe, trained_pairs):
    pipe, pair = trained_pipe, trained_pairs[0]
    steps = 10
    track = {}
    for method in ("npi", "nti"):
        inversion = pipe.invert(
            pair.source_image,
            pair.source_caption,
            num_inference_steps=steps,
            inversion_method=method,
            null_text_init="null",
        )
        seen = []

        def capture(pipe, i, t, tensors):
            seen.append(float((tensors["latents"] - inversion.latents[:, steps - i - 1]).pow(2).mean()))
            return tensors

        pipe(inversion=inversion, output_type="latent", callback_on_step_end=capture)
        track[method] = sum(seen)
    assert track["nti"] <= track["npi"], track


def test_benchmark_subset_runs_and_reports(toy_model_dir):
    """Every method runs and reports, and each reconstruction row is that inversion's reconstruction (the orderings
    between them need trained weights: the slow tests above)."""
    pipe = evaluate.load_pipeline(toy_model_dir)
    pairs = evaluate.make_pairs(2, seed=3, res=64)  # the tiny toy model's geometry (toy world v1's): 16² latents
    methods = ["ddim+cfg", "npi", "npi+p2p", "proxnpi+p2p", "masactrl"]
    steps = 6  # MasaCtrl starts at step 4
    result = evaluate.evaluate(pipe, pairs, methods, steps=steps, batch_size=2)
    summary = evaluate.summarise(result)
    assert set(summary["methods"]) == set(methods)
    for entry in summary["methods"].values():
        assert math.isfinite(entry["edit_psnr"]) and 0 <= entry["attribute_accuracy"] <= 1
    images = [pair.source_image for pair in pairs]
    inversion = pipe.invert(
        images, [pair.source_caption for pair in pairs], num_inference_steps=steps, inversion_method="npi"
    )
    for name, method in (("npi", "npi"), ("ddim+cfg", "ddim")):
        out = pipe(inversion=dataclasses.replace(inversion, method=method), output_type="pt").images
        assert result["reconstruction_psnr"][name] == [evaluate.psnr(o, image) for o, image in zip(out, images)]
    table = evaluate.markdown_table(summary)
    assert table.count("\n| ") >= len(methods) + 2
    grid = evaluate.example_grid(pairs, result)
    width, height = grid.size  # 64 px cells at scale 2, whatever the image size, under one line of column titles
    assert width == (2 + len(methods)) * 128 and 2 * 128 < height <= 2 * 128 + 32


def test_a_float16_model_folder_loads_in_float32_by_default(toy_model_dir):
    """``toy_world.train`` stores weights in float16 (as the embedded model's); a plain ``from_pretrained`` upcasts."""
    for module in ("unet", "vae", "text_encoder"):
        for path in (toy_model_dir / module).glob("*.safetensors"):
            with safe_open(path, framework="pt") as tensors:
                assert {tensors.get_slice(key).get_dtype() for key in tensors.keys()} == {"F16"}, path
    pipe = NegativePromptInversionPipeline.from_pretrained(toy_model_dir)
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        assert {p.dtype for p in module.parameters()} == {torch.float32}, type(module).__name__


def test_demo_writes_a_labelled_grid_and_a_verdict_per_edit_kind(toy_model_dir, tmp_path, capsys):
    from toy_world import demo, scenes

    out = tmp_path / "demo.png"
    demo.main(["--model", str(toy_model_dir), "--steps", "3", "--out", str(out), "--device", "cpu"])
    verdicts = json.loads(out.with_suffix(".json").read_text())
    assert list(verdicts) == list(scenes.EDIT_KINDS)
    for verdict in verdicts.values():
        assert set(verdict) == {"attribute_ok", "objects_kept", "unedited_psnr"}
    width, height = PIL.Image.open(out).size
    assert width == 3 * 192 and height > len(scenes.EDIT_KINDS) * 192  # three 192 px columns, rows under labels
    printed = capsys.readouterr().out
    assert printed.count(" -> ") >= len(scenes.EDIT_KINDS) and "wrote" in printed
