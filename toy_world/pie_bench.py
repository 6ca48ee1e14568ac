"""The toy world as PIE-Bench: write its edit pairs as a PIE-Bench folder, read one back with its exact ground truth,
and score edits against that truth.

The format itself (manifests, masks, the reference's metrics) is the product's ``negative_prompt_inversion.pie_bench``.
The toy world's folder is a valid PIE-Bench folder (PNG images: lossless, and the format does not fix the extension).
Its exact ground truth goes beside, in files PIE-Bench readers ignore: ``toy_world_truth.json`` (the ``make_pairs``
arguments, each id's pair index and kind) and ``toy_world_truth/<id>.png`` (the true edited image).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from negative_prompt_inversion.pie_bench import (
    EDITING_TYPES,
    encode_mask,
    load_image,
    load_mask,
    psnr,
    quantise,
    read_manifest,
)

from . import scenes


# Toy edit kind -> PIE-Bench type. A shape swap changes what the object is; stripes and dots are its material.
TOY_EDIT_TYPES = {"colour": "6", "shape": "1", "pattern": "7", "background": "8"}


# ---------------------------------------------------------------------------------------------- prompts


def bracket(caption: str, positions) -> str:
    """``caption`` with the words at ``positions`` (indices in ``caption.split()``) wrapped in [...]."""
    words = caption.split()
    for p in positions:
        words[p] = f"[{words[p]}]"
    return " ".join(words)


def instruction(edit: scenes.Edit) -> str:
    if edit.kind == "background":
        return f"Make the background {edit.target_words[0]}"
    obj = edit.source_scene.objects[edit.object_index]
    name = " ".join(w for w in obj.words[1:])  # "striped red circle"
    if edit.kind == "pattern":
        new = edit.target_scene.objects[edit.object_index]
        return f"Make the {name} {new.pattern}" if new.pattern else f"Make the {name} plain"
    return (
        f"Change the {name} to {edit.target_words[0]}"
        if edit.kind == "colour"
        else f"Turn the {name} into a {edit.target_words[0]}"
    )


# -------------------------------------------------------------------------------------------- the folder


def write_pie_bench(folder, count: int, seed: int = 0, res: int | None = None) -> dict:
    """Write ``evaluate.make_pairs(count, seed)`` rendered at ``res`` px (default: the default model's) as a
    PIE-Bench folder; returns the mapping. Ids are ``<type><11-digit pair index>``, as PIE-Bench's start with the
    type digit."""
    from .evaluate import MODEL_RES, blend_words, make_pairs

    res = MODEL_RES if res is None else res
    folder = Path(folder)
    (folder / "toy_world_truth").mkdir(parents=True, exist_ok=True)
    mapping, truth = {}, {"count": count, "seed": seed, "res": res, "pairs": {}}
    for index, edit in enumerate(make_pairs(count, seed, res=res)):
        type_id = TOY_EDIT_TYPES[edit.kind]
        key = f"{type_id}{index:011d}"
        image_path = f"{type_id}_{EDITING_TYPES[type_id]}/{key}.png"
        _save(edit.source_image, folder / "annotation_images" / image_path)
        _save(edit.target_image, folder / "toy_world_truth" / f"{key}.png")
        source_words, target_words = blend_words(edit)
        mapping[key] = {
            "image_path": image_path,
            "original_prompt": bracket(edit.source_caption, edit.source_positions),
            "editing_prompt": bracket(edit.target_caption, edit.target_positions),
            "editing_instruction": instruction(edit),
            "editing_type_id": type_id,
            "blended_word": f"{_one(source_words)} {_one(target_words)}",
            "mask": encode_mask(edit.mask.numpy()),
        }
        truth["pairs"][key] = {"index": index, "kind": edit.kind}
    (folder / "mapping_file.json").write_text(json.dumps(mapping, indent=1))
    (folder / "toy_world_truth.json").write_text(json.dumps(truth, indent=1))
    return mapping


def _one(words) -> str:
    """PIE-Bench's blended_word holds one word per side."""
    if len(words) != 1:
        raise ValueError(f"blended_word needs one word per side, got {words!r}")
    return words[0]


def _save(image: torch.Tensor, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(to_uint8(image)).save(path)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """[3, H, W] float in [0, 1] -> [H, W, 3] uint8, rounded (what a PNG stores)."""
    return (image.detach().float().cpu().clamp(0, 1).permute(1, 2, 0) * 255).round().byte().numpy()


@dataclass
class PieItem:
    """One PIE-Bench edit, loaded: the manifest item, its image and mask; ``truth`` only for toy-world folders."""

    item: object  # negative_prompt_inversion.pie_bench.Item
    image: torch.Tensor  # [3, H, W] float in [0, 1]
    mask: torch.Tensor  # bool [H, W], decoded as the reference (border marked edited)
    truth: dict | None = None  # toy world: {"edit": scenes.Edit, "target_image": tensor}

    @property
    def id(self) -> str:
        return self.item.id

    @property
    def source_prompt(self) -> str:
        return self.item.source_prompt

    @property
    def target_prompt(self) -> str:
        return self.item.target_prompts[0]

    @property
    def editing_type_id(self) -> str:
        return self.item.editing_type

    @property
    def blended_word(self) -> tuple[str, str]:
        return self.item.blend or ("", "")

    @property
    def entry(self) -> dict:
        return self.item.entry


def read_truth(folder) -> dict:
    """A toy-world PIE-Bench folder's ground truth by id: ``{"edit": scenes.Edit, "target_image": tensor}``; empty
    for any other folder."""
    folder = Path(folder)
    truth_file = folder / "toy_world_truth.json"
    if not truth_file.exists():
        return {}
    from .evaluate import make_pairs

    truth = json.loads(truth_file.read_text())
    edits = make_pairs(truth["count"], truth["seed"], res=truth["res"])
    return {
        key: {"edit": edits[pair["index"]], "target_image": load_image(folder / "toy_world_truth" / f"{key}.png")}
        for key, pair in truth["pairs"].items()
    }


def read_pie_bench(folder, types=None, limit: int | None = None) -> list[PieItem]:
    """Load a PIE-Bench folder (the real one or a toy-world one), in the mapping file's order, with the toy world's
    ground truth where the folder has it. ``types``: keep only these editing_type_id values."""
    folder = Path(folder)
    items = [
        item for item in read_manifest(folder / "mapping_file.json") if types is None or item.editing_type in types
    ][:limit]
    truth = read_truth(folder)
    loaded = []
    for item in items:
        image = load_image(item.image)
        loaded.append(PieItem(item, image, load_mask(item, tuple(image.shape[-2:])), truth.get(item.id)))
    return loaded


def toy_metrics(edited: torch.Tensor, truth: dict) -> dict:
    """Exact metrics against the toy world's ground truth: edit PSNR against the true edited image, unedited PSNR
    over background pixels only (exact mask), attribute accuracy and objects kept (the judge)."""
    from . import evaluate

    edit = truth["edit"]
    image = quantise(edited)
    return {
        "edit_psnr": psnr(image, truth["target_image"]),
        "unedited_psnr_exact": psnr(image, edit.source_image, ~edit.mask[None]),
        "attribute_ok": evaluate.attribute_ok(image, edit),
        "objects_kept": evaluate.objects_kept(image, edit),
    }
