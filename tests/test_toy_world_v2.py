"""Toy world v2: scenes at any resolution, the v2 model's geometry, the PIE-Bench folder format and its
metrics, and the pipeline's prompt-to-prompt against the independent reference in ``p2p_reference.py``."""

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from negative_prompt_inversion import pie_bench as pie_format
from negative_prompt_inversion.pipeline_negative_prompt_inversion import LocalBlend, PromptToPrompt
from toy_world import evaluate, pie_bench, scenes
from toy_world.p2p_reference import ReferenceP2P


ROOT = Path(__file__).resolve().parents[1]
U8 = 1 / 255  # one 8-bit step: the resolution of every image file in a PIE-Bench folder


@pytest.fixture(autouse=True)
def one_thread():
    """Small tensors: on a machine shared with other jobs, two threads on busy cores run these up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ----------------------------------------------------------------------------------------- scenes at 128 px


@pytest.mark.parametrize("kind", scenes.EDIT_KINDS)
def test_edits_at_128px_change_only_the_mask(kind):
    edit = scenes.make_edit(scenes.sample_scene(3), kind, 5, res=scenes.RES_V2)
    assert edit.source_image.shape == (3, 128, 128) and edit.mask.shape == (128, 128)
    outside = ~edit.mask
    assert torch.equal(edit.source_image[:, outside], edit.target_image[:, outside])  # bit for bit
    assert not torch.equal(edit.source_image, edit.target_image)


def test_128px_render_is_the_64px_scene_upsampled():
    """Same scene, same geometry: the 128 px render area-downsampled is the 64 px render except at
    anti-aliased edges and the per-pixel grain (std 0.012, averaged over 4 pixels in the downsample)."""
    scene = scenes.sample_scene(11)
    small = scenes.render(scene)
    large = scenes.render(scene, scenes.RES_V2)
    down = F.interpolate(large["image"][None], size=(64, 64), mode="area")[0]
    edge = ((small["alphas"] > 0) & (small["alphas"] < 1)).any(0).float()
    interior = F.max_pool2d(edge[None, None], 5, 1, 2)[0, 0] == 0  # 2 px away from every object edge
    assert (down - small["image"])[:, interior].abs().mean() < 0.03
    # object coverage scales with the area: each object covers 4x as many pixels (edges aside)
    for a64, a128 in zip(small["alphas"], large["alphas"]):
        assert a128.sum() / a64.sum() == pytest.approx(4.0, rel=0.05)


def test_make_pairs_same_scenes_at_every_resolution():
    small, large = evaluate.make_pairs(4, seed=2, res=64), evaluate.make_pairs(4, seed=2, res=128)  # each kind
    for a, b in zip(small, large):
        assert (a.kind, a.source_caption, a.target_caption) == (b.kind, b.source_caption, b.target_caption)


def test_objects_kept_leaves_the_edited_attribute_to_attribute_ok():
    """An edit that changes nothing misses its target but keeps every object, whatever the kind (a colour swap that
    missed used to count as a lost object too); an edit that repaints the edited object in a third colour, or moves
    everything, does not."""
    for edit in evaluate.make_pairs(8, seed=3, res=128):  # each kind twice
        assert evaluate.objects_kept(edit.source_image, edit), edit.kind
        assert evaluate.objects_kept(edit.target_image, edit), edit.kind
        moved = torch.roll(edit.target_image, shifts=(40, 40), dims=(1, 2))
        assert not evaluate.objects_kept(moved, edit), edit.kind
        if edit.object_index is None:
            continue
        scenes_ = (edit.source_scene, edit.target_scene)
        used = {o.colour for scene in scenes_ for o in scene.objects} | {edit.source_scene.background}
        objects = list(edit.target_scene.objects)
        third = next(c for c in scenes.COLOURS if c not in used)
        objects[edit.object_index] = dataclasses.replace(objects[edit.object_index], colour=third)
        repainted = scenes.render(dataclasses.replace(edit.target_scene, objects=tuple(objects)), 128)["image"]
        assert not evaluate.objects_kept(repainted, edit), edit.kind


def test_judge_accepts_128px_renders():
    for edit in evaluate.make_pairs(4, seed=4, res=128):  # one of each kind
        assert evaluate.attribute_ok(edit.target_image, edit)
        assert evaluate.objects_kept(edit.target_image, edit)


# ------------------------------------------------------------------------------------------- v2 geometry


def test_v2_model_geometry_is_sd_like():
    from diffusers import UNet2DConditionModel

    from toy_world import train

    cfg = train.UNET_CONFIG_V2
    assert cfg["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)  # SD 1.5's
    assert cfg["up_block_types"] == ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    vae_factor = 2 ** (len(train.VAE_CONFIG_V2["block_out_channels"]) - 1)
    assert scenes.RES_V2 // vae_factor == cfg["sample_size"] >= 32
    smallest_object = scenes.SIZE_RANGE[0] * scenes.RES_V2 / scenes.W / vae_factor  # latent cells across
    assert smallest_object >= 6
    unet = UNet2DConditionModel(**cfg)
    params = sum(p.numel() for p in unet.parameters())
    assert params * 2 < 32e6  # fp16 UNet; with VAE (4.3 MB) and text encoder (3.8 MB) under 40 MB


# ----------------------------------------------------------------------------------------- run-length masks


def test_rle_round_trip_and_known_code():
    mask = np.zeros((3, 4), dtype=bool)
    mask[0, 1:3] = True  # flat 1, 2
    mask[1, 3] = mask[2, 0] = True  # flat 7, 8: one run across the row end
    assert pie_format.encode_mask(mask) == [1, 2, 7, 2]
    rng = np.random.default_rng(0)
    for _ in range(20):
        m = rng.random((17, 23)) < rng.random()
        code = pie_format.encode_mask(m)
        assert all(length > 0 for length in code[1::2])
        assert np.array_equal(pie_format.decode_mask(code, m.shape, border=False), m)


def test_decode_marks_the_border_and_clips_long_runs():
    empty = pie_format.decode_mask([], (6, 5))
    assert empty[0].all() and empty[-1].all() and empty[:, 0].all() and empty[:, -1].all()
    assert not empty[1:-1, 1:-1].any()
    clipped = pie_format.decode_mask([28, 100], (6, 5), border=False)  # 2 pixels left from 28
    assert clipped.sum() == 2 and clipped.reshape(-1)[28:].all()


# --------------------------------------------------------------------------------------------- the folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("pie")
    mapping = pie_bench.write_pie_bench(path, 4, seed=1, res=64)  # one pair of each kind
    return path, mapping


def test_mapping_file_has_pie_bench_schema(folder):
    path, mapping = folder
    assert json.loads((path / "mapping_file.json").read_text()) == mapping
    fields = {
        "image_path",
        "original_prompt",
        "editing_prompt",
        "editing_instruction",
        "editing_type_id",
        "blended_word",
        "mask",
    }
    pairs = evaluate.make_pairs(4, seed=1, res=64)
    for (key, entry), edit in zip(mapping.items(), pairs):
        assert set(entry) == fields
        assert len(key) == 12 and key.isdigit() and key[0] == entry["editing_type_id"]
        assert entry["editing_type_id"] in pie_format.EDITING_TYPES
        assert entry["image_path"].startswith(f"{entry['editing_type_id']}_")
        assert (path / "annotation_images" / entry["image_path"]).is_file()
        assert pie_format.strip_brackets(entry["original_prompt"]) == edit.source_caption
        assert pie_format.strip_brackets(entry["editing_prompt"]) == edit.target_caption
        assert pie_format.bracketed(entry["original_prompt"]) == list(edit.source_words)
        assert pie_format.bracketed(entry["editing_prompt"]) == list(edit.target_words)
        source_word, target_word = entry["blended_word"].split(" ")
        assert source_word in edit.source_caption.split() and target_word in edit.target_caption.split()
        assert isinstance(entry["mask"], list) and all(isinstance(v, int) for v in entry["mask"])
        assert np.array_equal(pie_format.decode_mask(entry["mask"], (64, 64), border=False), edit.mask.numpy())


def test_reader_loads_the_toy_folder(folder):
    path, _ = folder
    items = pie_bench.read_pie_bench(path)
    pairs = evaluate.make_pairs(4, seed=1, res=64)
    assert len(items) == 4
    for item, edit in zip(items, pairs):
        assert "[" not in item.source_prompt + item.target_prompt
        assert (item.image - edit.source_image).abs().max() <= U8 / 2 + 1e-6  # PNG rounding only
        border = torch.from_numpy(pie_format.decode_mask([], (64, 64)))
        assert torch.equal(item.mask, edit.mask | border)  # the reference's border quirk
        assert item.truth["edit"].target_caption == edit.target_caption
        assert (item.truth["target_image"] - edit.target_image).abs().max() <= U8 / 2 + 1e-6
    assert [i.editing_type_id for i in pie_bench.read_pie_bench(path, types=["6", "8"])] == ["6", "8"]


# ------------------------------------------------------------------------------------------------ metrics


def _image(seed, size=32):
    return torch.rand(3, size, size, generator=torch.Generator().manual_seed(seed))


def test_compact_json_keeps_six_significant_digits_at_every_depth():
    import json
    import math

    value = {
        "psnr": 29.673115558624268,
        "mse": 0.0011149876,
        "rows": [{"ok": True, "n": 3, "x": (1 / 3,)}],
        "nan": float("nan"),
        "kind": "colour",
    }
    back = json.loads(evaluate.compact_json(value))
    assert back["psnr"] == 29.6731 and back["mse"] == 0.00111499
    assert back["rows"] == [{"ok": True, "n": 3, "x": [0.333333]}]
    assert math.isnan(back["nan"]) and back["kind"] == "colour"
    assert "\n" not in evaluate.compact_json(value)


def test_background_metrics_of_identical_images():
    image = _image(0)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[8:16, 8:20] = True
    m = pie_format.background_metrics(image, image, mask)
    assert m["psnr"] == math.inf and m["mse"] == 0.0
    assert m["ssim"] == pytest.approx(1.0, abs=1e-5)  # float32 sums of 121-pixel windows


def test_edits_inside_the_mask_do_not_change_background_metrics():
    source, other = _image(0), _image(1)
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[4:20, 6:30] = True
    edited = source * 0.9 + 0.05  # a background change
    inside = torch.where(mask, other, edited)
    assert pie_format.background_metrics(source, edited, mask) == pie_format.background_metrics(source, inside, mask)


def test_background_psnr_is_the_reference_whole_image_kind():
    """Reference PSNR (masked pixels zeroed, whole-image mean) = background-only PSNR + 10 log10(1/fraction)."""
    source = _image(2)
    edited = (source + 3 * U8 * torch.sign(torch.randn(3, 32, 32, generator=torch.Generator().manual_seed(3)))).clamp(
        0, 1
    )
    mask = torch.zeros(32, 32, dtype=torch.bool)
    mask[:12] = True
    m = pie_format.background_metrics(source, edited, mask)
    q_src, q_edt = pie_format.quantise(source), pie_format.quantise(edited)
    only = evaluate.psnr(q_edt, q_src, ~mask[None])
    fraction = (~mask).float().mean().item()
    assert m["psnr"] == pytest.approx(only + 10 * math.log10(1 / fraction), abs=1e-3)
    assert m["mse"] == pytest.approx(10 ** (-m["psnr"] / 10), rel=1e-5)


def test_learned_metrics_are_skipped_without_local_weights(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    learned = pie_format.LearnedMetrics("cpu")
    assert "structure_distance" in learned.skipped and str(tmp_path) in learned.skipped["structure_distance"]
    assert "lpips" in learned.skipped
    out = learned(_image(0), _image(1), torch.zeros(32, 32, dtype=torch.bool), "a red circle")
    assert not ({"structure_distance", "lpips"} & set(out))


def test_toy_metrics_of_the_true_edit_are_perfect():
    edit = evaluate.make_pairs(2, seed=5)[1]
    truth = {"edit": edit, "target_image": pie_format.quantise(edit.target_image)}
    m = pie_bench.toy_metrics(edit.target_image, truth)
    assert m["edit_psnr"] == pytest.approx(10 * math.log10(1 / 1e-10))  # evaluate.psnr's clamp: identical
    # only 8-bit rounding outside the mask, at most half a step per value: PSNR ≥ 20 log10(2 · 255) = 54.2 dB
    assert m["unedited_psnr_exact"] >= 20 * math.log10(2 * 255) - 1e-3
    assert m["attribute_ok"] and m["objects_kept"]


# ------------------------------------------------------------------------ the pipeline vs the reference P2P


def test_pipeline_p2p_matches_the_independent_reference(toy_model_dir):
    """Word swap with cross/self replacement and local blend, NPI, on a toy-world model folder (conftest
    ``tiny_toy_model``: the toy tokenizer, 64 px, 16² latents, random weights): same image."""
    pipe = evaluate.load_pipeline(toy_model_dir)
    edit = scenes.make_edit(scenes.sample_scene(7_000_000), "colour", 0, res=64)
    words = (edit.source_words[0], edit.target_words[0])
    steps = 5
    threshold = 0.8  # above the default 0.3, so that this model's blend mask is partial and its shape is tested
    inv = pipe.invert(edit.source_image[None], edit.source_caption, num_inference_steps=steps, inversion_method="npi")
    with torch.no_grad():
        p2p = PromptToPrompt(0.4, 0.6, local_blend=LocalBlend(words, threshold=threshold))
        out = pipe(
            prompt=edit.target_caption,
            inversion=inv,
            num_inference_steps=steps,
            attention_control=p2p,
            return_attention_maps=True,
            output_type="latent",
        )
        ref = ReferenceP2P(pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler)
        level = out.attention_maps[0].shape[:2]
        r = ref.edit(
            pipe.encode_images(edit.source_image[None] * 2 - 1),
            edit.source_caption,
            edit.target_caption,
            words,
            steps=steps,
            blend_size=level,
            blend_threshold=threshold,
        )
    # Same arithmetic in another order (fused vs explicit attention): float32 rounding, amplified by the
    # 2·steps UNet passes; latents have unit scale.
    assert (out.images[0] - r.latents[1]).abs().max() < 1e-3
    assert r.masks.any() and not r.masks.all()  # the blend restricted the edit: its mask was compared too
