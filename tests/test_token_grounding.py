"""Token grounding for toy-world training (``toy_world.grounding``): which region each caption word names, the
TokenCompose token loss, and the attention processor that computes it without changing the UNet's output."""

import pytest
import torch
from diffusers import UNet2DConditionModel

from toy_world import scenes
from toy_world.grounding import GroundingAttnProcessor, pixel_loss, token_loss
from toy_world.train import Batches, EncodedBatches


EPS = torch.finfo(torch.float32).eps


def test_token_slots_name_each_objects_words_and_the_background():
    specs = scenes.sample_specs(64, torch.Generator().manual_seed(0))
    slots = scenes.spec_token_slots(specs)
    for i in range(64):
        scene = scenes._scene_from_specs(specs, i)
        objects, background_word = scene.word_positions()
        want = torch.full((77,), -1)
        for k, positions in enumerate(objects):  # token index = word index + 1 (BOS)
            for word in ("pattern", "colour", "shape"):
                if positions[word] is not None:
                    want[positions[word] + 1] = k
        want[background_word + 1] = want[background_word + 2] = scenes.MAX_OBJECTS  # "<colour> background"
        assert torch.equal(slots[i], want), scene.caption
        assert scene.words[background_word + 1] == "background"


def test_regions_partition_the_image_and_do_not_change_the_scenes():
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    images, ids, regions, slots = scenes.render_batch(16, g(), res=64, return_regions=True)
    plain = scenes.render_batch(16, g(), res=64)
    assert torch.equal(images, plain[0]) and torch.equal(ids, plain[1])
    assert regions.shape == (16, scenes.MAX_OBJECTS + 1, 64, 64) and slots.shape == (16, 77)
    # objects never overlap, so the background is exactly what they leave
    torch.testing.assert_close(regions.sum(1), torch.ones(16, 64, 64), atol=4 * EPS, rtol=0)


def test_token_loss_is_the_squared_share_of_attention_outside_the_region():
    regions = torch.zeros(1, 2, 8, 8)
    regions[0, 0, :, :4] = 1  # region 0: the left half; region 1: the whole image
    regions[0, 1] = 1
    slots = torch.tensor([[0, 1, -1]])  # the third token is ungrounded: its attention never counts
    left = torch.zeros(4, 4)
    left[:, :2] = 1 / 8
    probs = torch.stack([left.flatten(), torch.full((16,), 1 / 16), torch.eye(16)[5]], -1)[None]  # [1, 16, 3]
    assert token_loss(probs, regions, slots) == 0
    probs[0, :, 0] = left.flip(-1).flatten()  # all of token 0 on the right half: share outside 1
    assert token_loss(probs, regions, slots) == 0.5  # (1² + 0²) / 2 grounded tokens
    probs[0, :, 0] = 1 / 16  # uniform: half outside
    assert token_loss(probs, regions, slots) == 0.125
    assert token_loss(probs, regions, torch.full_like(slots, -1)) == 0  # nothing grounded


def test_pixel_loss_is_the_cross_entropy_of_each_cell_against_the_region():
    regions = torch.zeros(1, 1, 8, 8)
    regions[0, 0, :, :4] = 1  # the left half
    slots = torch.tensor([[0, -1]])  # the second token is ungrounded
    left = torch.zeros(4, 4)
    left[:, :2] = 1
    probs = torch.stack([left.flatten(), 1 - left.flatten()], -1)[None]  # [1, 16, 2]: token 0 holds its region
    assert pixel_loss(probs, regions, slots) < 2 * EPS  # −log(1 − ε) per cell, from the clamp
    probs[0, :, 0] = 0.5  # half of every cell: −log ½ whatever the mask
    torch.testing.assert_close(pixel_loss(probs, regions, slots), torch.tensor(0.6931472), atol=4 * EPS, rtol=0)
    probs[0, :, 0] = left.flip(-1).flatten()  # all on the wrong half: the clamp's −log ε per cell
    torch.testing.assert_close(pixel_loss(probs, regions, slots), -torch.tensor(EPS).log(), rtol=4 * EPS, atol=0)
    assert pixel_loss(probs, regions, torch.full_like(slots, -1)) == 0  # nothing grounded


def tiny_unet():
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(32, 32, 64, 64),
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        attention_head_dim=(2, 2, 4, 4),
        cross_attention_dim=32,
        norm_num_groups=16,
    ).eval()


def test_grounding_processor_keeps_the_output_and_grounds_every_cross_attention_layer():
    unet = tiny_unet()
    g = torch.Generator().manual_seed(1)
    latents, text = torch.randn(2, 4, 16, 16, generator=g), torch.randn(2, 77, 32, generator=g).requires_grad_()
    t = torch.tensor([10, 700])
    with torch.no_grad():
        fused = unet(latents, t, text).sample
    unet.set_attn_processor(GroundingAttnProcessor())
    with torch.no_grad():
        assert torch.equal(unet(latents, t, text).sample, fused)  # no grounding: diffusers' attention itself
    _, _, regions, slots = scenes.render_batch(2, torch.Generator().manual_seed(2), res=64, return_regions=True)
    grounding = dict(regions=regions, slots=slots, losses=[], pixel_losses=[])
    explicit = unet(latents, t, text, cross_attention_kwargs=dict(grounding=grounding)).sample
    # explicit softmax(QKᵀ/√d)V against the fused kernel: rounding only, a few eps of the output's scale per layer
    scale = fused.abs().max()
    torch.testing.assert_close(explicit, fused, atol=1e3 * EPS * scale, rtol=0)
    cross_layers = [name for name, _ in unet.attn_processors.items() if name.endswith("attn2.processor")]
    assert len(grounding["losses"]) == len(grounding["pixel_losses"]) == len(cross_layers) == 10  # 3 down, mid, 3 up
    loss = torch.stack(grounding["losses"]).mean()
    assert 0 < loss < 1 and torch.stack(grounding["pixel_losses"]).min() > 0
    loss.backward()
    assert text.grad.abs().sum() > 0  # the text side learns where its words attend


def test_encoded_batches_carry_each_scenes_regions_and_slots():
    def batches():
        return Batches(4, "cpu", torch.Generator().manual_seed(0), chunk=2, res=64, region_size=16)

    source = batches()
    rendered = [source.next(), source.next()]
    fingerprint = lambda images: images.mean(dim=(2, 3))  # noqa: E731  (stands in for the VAE)
    truth = {
        tuple(f.tolist()): (i, r, s)
        for images, ids, regions, slots in rendered
        for f, i, r, s in zip(fingerprint(images), ids, regions, slots)
    }
    assert rendered[0][2].shape == (4, scenes.MAX_OBJECTS + 1, 16, 16)
    data = EncodedBatches(batches(), fingerprint, reuse=2)
    for _ in range(4):
        z, ids, regions, slots = data.next()
        for row in range(4):
            want_ids, want_regions, want_slots = truth[tuple(z[row].tolist())]
            assert torch.equal(ids[row], want_ids) and torch.equal(slots[row], want_slots)
            assert torch.equal(regions[row], want_regions)


def test_token_loss_needs_square_maps():
    with pytest.raises(ValueError, match="square maps"):
        token_loss(torch.rand(1, 15, 3), torch.ones(1, 1, 8, 8), torch.zeros(1, 3, dtype=torch.long))


def test_training_with_token_grounding_runs_and_logs_both_losses(toy_model_dir, tmp_path, monkeypatch):
    import json
    import time

    from toy_world import train

    monkeypatch.setattr(train, "_T0", time.time())  # --minutes counts from process start: here, from now
    out = tmp_path / "grounded"
    train.main(
        [
            "--resume",
            str(toy_model_dir),
            "--out",
            str(out),
            "--device",
            "cpu",
            "--minutes",
            "2",
            "--max-steps",
            "2",
            "--batch-size",
            "2",
            "--eval-samples",
            "0",
            "--vae-eval-images",
            "2",
            "--grounding-weight",
            "0.5",
            "--pixel-grounding-weight",
            "0.01",
            "--log-seconds",
            "0",
        ]
    )
    unet = json.loads((out / "training_log.json").read_text())["unet"]
    assert unet["steps"] == 2 and 0 < unet["final_grounding_loss"] < 1 and unet["final_loss"] > 0
    assert unet["final_pixel_grounding_loss"] > 0
    for flag in ("--grounding-weight", "--pixel-grounding-weight"):
        with pytest.raises(SystemExit):
            train.parse_args(["--out", "x", flag, "-1"])
