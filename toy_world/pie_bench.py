"""PIE-Bench folders: write the toy world's edit pairs as one, and read any.

PIE-Bench (Ju et al., "Direct Inversion"; cure-lab/PnPInversion) is a folder::

    annotation_images/<type>_<name>/<id>.jpg   the source images (512 x 512 there; any square size here)
    mapping_file.json                          {id: entry}, id a 12-digit string

with one entry per edit::

    image_path           relative to annotation_images/
    original_prompt      the source caption; "[...]" marks the words the edit changes
    editing_prompt       the target caption, "[...]" marking the new words (brackets are stripped before use)
    editing_instruction  the edit as an instruction
    editing_type_id      "0".."9" (EDITING_TYPES)
    blended_word         "source_word target_word" (prompt-to-prompt's local-blend words)
    mask                 the edited region, run-length encoded: flat list [start, length, start, length, ...]
                         over the row-major flattened H x W image, 1 = edited

Mask convention, as PnPInversion's ``mask_decode``: a run's length is clipped at the end of the image, and the
decoder then sets the 1-px image border to 1 (edited), "to avoid annotation errors in boundary". So the
border never counts as background in the reference metrics; ``decode_mask(..., border=False)`` gives the
annotation as written. ``encode_mask`` writes the runs of exactly the given mask (border included as is).

The toy world's folder is a valid PIE-Bench folder (PNG images: lossless, and the format does not fix the
extension). Its exact ground truth goes beside, in files PIE-Bench readers ignore: ``toy_world_truth.json``
(the ``make_pairs`` arguments, each id's pair index and kind) and ``toy_world_truth/<id>.png`` (the true
edited image).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from . import scenes

# PIE-Bench's editing_type_id values (the folder-name prefixes of annotation_images/).
EDITING_TYPES = {
    "0": "random", "1": "change_object", "2": "add_object", "3": "delete_object", "4": "change_attribute_content",
    "5": "change_attribute_pose", "6": "change_attribute_color", "7": "change_attribute_material",
    "8": "change_background", "9": "change_style",
}
# Toy edit kind -> PIE-Bench type. A shape swap changes what the object is; stripes and dots are its material.
TOY_EDIT_TYPES = {"colour": "6", "shape": "1", "pattern": "7", "background": "8"}


# --------------------------------------------------------------------------------------------------- masks


def encode_mask(mask) -> list[int]:
    """Run-length code of a boolean [H, W] mask: [start, length, ...] over the row-major flattening."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # run starts and ends alternate
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).reshape(-1).astype(int).tolist()


def decode_mask(encoded, shape=(512, 512), border: bool = True) -> np.ndarray:
    """Boolean [H, W] mask from PIE-Bench's run-length code (1 = edited). ``border=True`` reproduces
    PnPInversion's decoder, which marks the 1-px image border as edited."""
    height, width = shape
    flat = np.zeros(height * width, dtype=bool)
    runs = np.asarray(encoded, dtype=np.int64).reshape(-1, 2)
    for start, length in runs:
        flat[start : min(start + length, flat.size)] = True  # runs past the end are clipped
    mask = flat.reshape(height, width)
    if border:
        mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True
    return mask


# ---------------------------------------------------------------------------------------------- prompts


def bracket(caption: str, positions) -> str:
    """``caption`` with the words at ``positions`` (indices in ``caption.split()``) wrapped in [...]."""
    words = caption.split()
    for p in positions:
        words[p] = f"[{words[p]}]"
    return " ".join(words)


def strip_brackets(prompt: str) -> str:
    return prompt.replace("[", "").replace("]", "")


def bracketed(prompt: str) -> list[str]:
    """The [...] phrases of a PIE-Bench prompt, in order."""
    return re.findall(r"\[([^\]]*)\]", prompt)


def instruction(edit: scenes.Edit) -> str:
    if edit.kind == "background":
        return f"Make the background {edit.target_words[0]}"
    obj = edit.source_scene.objects[edit.object_index]
    name = " ".join(w for w in obj.words[1:])  # "striped red circle"
    if edit.kind == "pattern":
        new = edit.target_scene.objects[edit.object_index]
        return f"Make the {name} {new.pattern}" if new.pattern else f"Make the {name} plain"
    return f"Change the {name} to {edit.target_words[0]}" if edit.kind == "colour" else \
        f"Turn the {name} into a {edit.target_words[0]}"


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
    """One PIE-Bench edit, prompts without brackets; ``truth`` only for toy-world folders."""

    id: str
    image: torch.Tensor            # [3, H, W] float in [0, 1]
    source_prompt: str
    target_prompt: str
    instruction: str
    editing_type_id: str
    blended_word: tuple[str, str]
    mask: torch.Tensor             # bool [H, W], decoded as the reference (border marked edited)
    entry: dict                    # the raw mapping entry
    truth: dict | None = None      # toy world: {"edit": scenes.Edit, "target_image": tensor}


def read_pie_bench(folder, types=None, limit: int | None = None) -> list[PieItem]:
    """Load a PIE-Bench folder (the real one or a toy-world one), in the mapping file's order.
    ``types``: keep only these editing_type_id values."""
    folder = Path(folder)
    mapping = json.loads((folder / "mapping_file.json").read_text())
    truth_file = folder / "toy_world_truth.json"
    truth = json.loads(truth_file.read_text()) if truth_file.exists() else None
    edits = None
    if truth is not None:
        from .evaluate import make_pairs

        edits = make_pairs(truth["count"], truth["seed"], res=truth["res"])
    items = []
    for key, entry in mapping.items():
        if types is not None and entry["editing_type_id"] not in types:
            continue
        if limit is not None and len(items) >= limit:
            break
        image = load_image(folder / "annotation_images" / entry["image_path"])
        source_word, target_word = entry["blended_word"].split(" ") if entry.get("blended_word") else ("", "")
        item = PieItem(
            id=key, image=image, source_prompt=strip_brackets(entry["original_prompt"]),
            target_prompt=strip_brackets(entry["editing_prompt"]), instruction=entry.get("editing_instruction", ""),
            editing_type_id=entry["editing_type_id"], blended_word=(source_word, target_word),
            mask=torch.from_numpy(decode_mask(entry["mask"], tuple(image.shape[-2:]))), entry=entry,
        )
        if truth is not None and key in truth["pairs"]:
            item.truth = {"edit": edits[truth["pairs"][key]["index"]],
                          "target_image": load_image(folder / "toy_world_truth" / f"{key}.png")}
        items.append(item)
    return items


def load_image(path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255
