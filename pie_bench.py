"""PIE-Bench manifests and metrics: read a PIE-Bench folder (or a JSONL / CSV manifest), decode its masks, and score
edits as PnPInversion's ``evaluation/`` does.

PIE-Bench (Ju et al. 2024, "PnP Inversion"; cure-lab/PnPInversion) is a folder::

    annotation_images/<type>_<name>/<id>.jpg   the source images (512 x 512)
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
decoder then sets the 1-px image border to 1 (edited), "to avoid annotation errors in boundary". So the border never
counts as background in the reference metrics; ``decode_mask(..., border=False)`` gives the annotation as written.

Background ("unedited part") PSNR / MSE / SSIM follow the reference exactly: both images are quantised to 8 bits
(the reference reads them from image files), multiplied by (1 - mask), and the metric is taken over the **whole**
product images. The masked pixels are zero in both, so they add no error but do count in the mean: the reference's
background PSNR is higher than a PSNR over background pixels alone by 10·log10(1 / background fraction).

Learned metrics need weights, which this module never downloads. Each is computed only when its weights are already
on this machine, and otherwise skipped with a message saying what is missing:

* structure distance: MSE between the self-similarity (cosine) of the last-layer keys of DINO ViT-B/8 for source and
  edit, images resized to 224 on the short side (at most 480) and ImageNet-normalised; needs the torch hub checkout
  ``facebookresearch_dino_main`` and its checkpoint in ``torch.hub.get_dir()``;
* CLIP score (ViT-L/14) of the edit against the target prompt, whole image and image × mask: 100 · max(cos, 0);
  needs ``openai/clip-vit-large-patch14`` in the Hugging Face cache;
* LPIPS (SqueezeNet) on the background product images: needs torchmetrics and torchvision's SqueezeNet 1.1
  checkpoint in ``torch.hub.get_dir()/checkpoints``.
"""

from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .pipeline_negative_prompt_inversion import _image_to_tensor


# PIE-Bench's editing_type_id values (the folder-name prefixes of annotation_images/).
EDITING_TYPES = {
    "0": "random",
    "1": "change_object",
    "2": "add_object",
    "3": "delete_object",
    "4": "change_attribute_content",
    "5": "change_attribute_pose",
    "6": "change_attribute_color",
    "7": "change_attribute_material",
    "8": "change_background",
    "9": "change_style",
}


# --------------------------------------------------------------------------------------------------- masks


def encode_mask(mask) -> list[int]:
    """Run-length code of a boolean [H, W] mask: [start, length, ...] over the row-major flattening."""
    flat = np.asarray(mask, dtype=bool).reshape(-1)
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1])  # run starts and ends alternate
    starts, ends = edges[0::2], edges[1::2]
    return np.stack([starts, ends - starts], axis=1).reshape(-1).astype(int).tolist()


def decode_mask(encoded, shape=(512, 512), border: bool = True) -> np.ndarray:
    """Boolean [H, W] mask from PIE-Bench's run-length code (1 = edited). ``border=True`` reproduces PnPInversion's
    decoder, which marks the 1-px image border as edited."""
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


def strip_brackets(prompt: str) -> str:
    return prompt.replace("[", "").replace("]", "")


def bracketed(prompt: str) -> list[str]:
    """The [...] phrases of a PIE-Bench prompt, in order."""
    return re.findall(r"\[([^\]]*)\]", prompt)


# -------------------------------------------------------------------------------------------- manifests


@dataclass
class Item:
    """One manifest row: an image, its source prompt, its target prompt(s), optional blend words and mask."""

    id: str
    image: Path
    source_prompt: str
    target_prompts: list[str]
    blend: tuple[str, str] | None = None
    mask: list[int] | Path | None = None  # PIE-Bench run-length code, or a mask image file
    editing_type: str | None = None  # PIE-Bench's editing_type_id
    entry: dict = field(default_factory=dict)  # the raw row
    line: int = 0  # where the row starts in its manifest file


class ManifestError(ValueError):
    """A manifest that is not what it claims to be; the message starts with ``file:line:``."""


def read_manifest(path, images: str | None = None) -> list[Item]:
    """Items of a PIE-Bench ``mapping_file.json`` (images under ``annotation_images/`` beside it) or of a JSONL / CSV
    file (columns ``image, source_prompt, target_prompt`` or JSONL ``target_prompts`` (a list), optional ``id``,
    ``blend`` ("source_word target_word"), ``mask`` (an image file, white = edited) and ``editing_type_id``).
    Relative image and mask paths resolve against ``images`` (default: the manifest's folder).

    Raises `ManifestError`, naming the file and line, for anything that is not such a manifest: bad JSON, a row that
    is not an object, a missing or mistyped field, an empty file. Whether each image exists is the caller's business.
    """
    path = Path(path)
    if path.is_dir():
        inside = path / "mapping_file.json"
        hint = f"give {inside}" if inside.is_file() else "give its mapping_file.json or a JSONL / CSV manifest"
        raise ManifestError(f"{path}: a folder, not a manifest; {hint}")
    if not path.is_file():
        raise ManifestError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise ManifestError(f"{path}: not a UTF-8 text file (byte {error.start})") from None
    suffix = path.suffix.lower()
    if suffix == ".json":
        items = _pie_items(path, text, Path(images) if images else path.parent / "annotation_images")
    elif suffix in (".jsonl", ".csv"):
        rows = _jsonl_rows(path, text) if suffix == ".jsonl" else _csv_rows(path, text)
        root = Path(images) if images else path.parent
        items = [_row_item(path, line, index, row, root) for index, (line, row) in enumerate(rows)]
    else:
        raise ManifestError(f"{path}: a manifest is a PIE-Bench mapping_file.json, a .jsonl or a .csv file")
    if not items:
        raise ManifestError(f"{path}: no items")
    return items


def _pie_items(path: Path, text: str, root: Path) -> list[Item]:
    mapping = _json(path, text, 1)
    if not isinstance(mapping, dict):
        raise ManifestError(f"{path}:1: a PIE-Bench mapping file is a JSON object {{id: entry}}, got {_kind(mapping)}")
    items = []
    for key, entry in mapping.items():
        match = re.search(rf"{re.escape(json.dumps(key))}\s*:", text)
        line = text.count("\n", 0, match.start()) + 1 if match else 1
        where = f"{path}:{line}: entry {key!r}"
        if not isinstance(entry, dict):
            raise ManifestError(f"{where}: an entry is a JSON object, got {_kind(entry)}")
        _check_field_names(entry, PIE_FIELDS, where)
        words = (_field(entry, "blended_word", where, str, required=False) or "").split()
        mask = _field(entry, "mask", where, list, required=False)
        if mask is not None and (len(mask) % 2 or not all(_is_int(v) and v >= 0 for v in mask)):
            raise ManifestError(f"{where}: 'mask' must be a run-length code [start, length, ...] of whole numbers")
        items.append(
            Item(
                id=key,
                image=root / _field(entry, "image_path", where, str),
                source_prompt=strip_brackets(_field(entry, "original_prompt", where, str)),
                target_prompts=[strip_brackets(_field(entry, "editing_prompt", where, str))],
                blend=tuple(words) if len(words) == 2 else None,
                mask=mask,
                editing_type=_editing_type(entry, where),
                entry=entry,
                line=line,
            )
        )
    return items


def _jsonl_rows(path: Path, text: str):
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            yield number, _json(path, line, number)


def _csv_rows(path: Path, text: str):
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames or []
        missing = [name for name in ("image", "source_prompt", "target_prompt") if name not in header]
        if missing:
            raise ManifestError(
                f"{path}:1: the header has no column {', '.join(map(repr, missing))}"
                f" (its columns: {', '.join(map(repr, header)) or 'none'})"
            )
        start = reader.line_num + 1
        for row in reader:
            if None in row or None in row.values():
                more = "more" if None in row else "fewer"
                raise ManifestError(f"{path}:{start}: this row has {more} fields than the header's {len(header)}")
            yield start, row
            start = reader.line_num + 1
    except csv.Error as error:
        raise ManifestError(f"{path}:{reader.line_num}: not valid CSV ({error})") from None


def _row_item(path: Path, line: int, index: int, row, root: Path) -> Item:
    where = f"{path}:{line}"
    if not isinstance(row, dict):
        raise ManifestError(f"{where}: a row is a JSON object, got {_kind(row)}")
    _check_field_names(row, ROW_FIELDS, where)
    item_id = row.get("id")
    if item_id is None or item_id == "":
        item_id = f"{index:06d}"
    elif not (isinstance(item_id, str) or _is_int(item_id)):
        raise ManifestError(f"{where}: 'id' must be a string or an integer, got {item_id!r}")
    if row.get("target_prompt") not in (None, "") and row.get("target_prompts") is not None:
        raise ManifestError(f"{where}: give 'target_prompt' or 'target_prompts', not both")
    if row.get("target_prompts") is not None:
        targets = _field(row, "target_prompts", where, list)
        if not targets or not all(isinstance(t, str) for t in targets):
            raise ManifestError(f"{where}: 'target_prompts' must be a non-empty list of strings, got {targets!r}")
    else:
        targets = [_field(row, "target_prompt", where, str)]
    blend = row.get("blend") or None
    if blend is not None:
        words = blend.split() if isinstance(blend, str) else blend
        if not isinstance(words, list) or len(words) != 2 or not all(isinstance(w, str) and w for w in words):
            raise ManifestError(f"{where}: 'blend' must be 'source_word target_word', got {blend!r}")
        blend = tuple(words)
    mask = _field(row, "mask", where, str, required=False) or None
    return Item(
        str(item_id),
        root / _field(row, "image", where, str),
        _field(row, "source_prompt", where, str),
        list(targets),
        blend,
        root / mask if mask else None,
        _editing_type(row, where),
        row,
        line,
    )


def _json(path: Path, text: str, line: int):
    def unique(pairs):
        keys = [key for key, _ in pairs]
        repeated = sorted({key for key in keys if keys.count(key) > 1})
        if repeated:
            raise ValueError(f"key {repeated[0]!r} appears twice")
        return dict(pairs)

    try:
        return json.loads(text, object_pairs_hook=unique)
    except json.JSONDecodeError as error:
        raise ManifestError(
            f"{path}:{line + error.lineno - 1}: not valid JSON ({error.msg}, column {error.colno})"
        ) from None
    except ValueError as error:
        raise ManifestError(f"{path}:{line}: {error}") from None


PIE_FIELDS = (
    "image_path",
    "original_prompt",
    "editing_prompt",
    "editing_instruction",
    "editing_type_id",
    "blended_word",
    "mask",
)
ROW_FIELDS = ("id", "image", "source_prompt", "target_prompt", "target_prompts", "blend", "mask", "editing_type_id")


def _check_field_names(row: dict, known: tuple[str, ...], where: str) -> None:
    """Other fields are the user's own, but one that looks like a misspelt known field would be silently lost."""
    for name in row:
        close = difflib.get_close_matches(str(name), known, n=1, cutoff=0.8) if name not in known else None
        if close:
            raise ManifestError(f"{where}: unknown field {name!r}; did you mean {close[0]!r}?")


def _field(row: dict, name: str, where: str, kind: type, required: bool = True):
    """``row[name]`` if it is a ``kind`` (a non-blank one for strings); `None` for an absent optional field."""
    value = row.get(name)
    if value is None or value == "":
        if required:
            raise ManifestError(f"{where}: no {name!r}")
        return None
    if not isinstance(value, kind) or (kind is str and not value.strip()):
        what = {str: "a non-blank string", list: "a list"}[kind]
        raise ManifestError(f"{where}: {name!r} must be {what}, got {value!r}")
    return value


def _editing_type(row: dict, where: str) -> str | None:
    value = row.get("editing_type_id")
    if value is None or value == "":
        return None
    if str(value) not in EDITING_TYPES or isinstance(value, bool):
        raise ManifestError(f"{where}: 'editing_type_id' must be one of {', '.join(EDITING_TYPES)}, got {value!r}")
    return str(value)


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _kind(value) -> str:
    return {dict: "an object", list: "a list", str: "a string"}.get(type(value), type(value).__name__)


def load_image(path) -> torch.Tensor:
    """An image file as [3, H, W] float in [0, 1], decoded as the pipeline decodes it (EXIF orientation, 16 bits,
    transparency over white)."""
    return _image_to_tensor(path)[0]


def load_mask(item: Item, size: tuple[int, int]) -> torch.Tensor:
    """The edited region, bool [H, W] (PIE-Bench's decoder: the 1-px border counts as edited); all False without a
    mask."""
    if item.mask is None:
        return torch.zeros(size, dtype=torch.bool)
    if isinstance(item.mask, Path):
        if not item.mask.is_file():
            raise FileNotFoundError(f"no mask file {item.mask}")
        mask = np.array(Image.open(item.mask).convert("L")) > 127
        if mask.shape != size:
            raise ValueError(f"mask {item.mask} is {mask.shape[1]}x{mask.shape[0]}, the image {size[1]}x{size[0]}")
        return torch.from_numpy(mask)
    starts = np.asarray(item.mask, dtype=np.int64).reshape(-1, 2)[:, 0]
    if len(starts) and starts.max() >= size[0] * size[1]:
        raise ValueError(f"mask runs start past the end of the {size[1]}x{size[0]} image")
    return torch.from_numpy(decode_mask(item.mask, size))


# ---------------------------------------------------------------------------------------------- metrics


def quantise(image: torch.Tensor) -> torch.Tensor:
    """[3, H, W] in [0, 1] as an 8-bit image file stores it."""
    return (image.detach().float().cpu().clamp(0, 1) * 255).round() / 255


def psnr(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    """PSNR in dB of images in [0, 1]; over ``mask`` pixels only when given."""
    error = (a.float() - b.float()) ** 2
    if mask is not None:
        mask = mask.expand_as(error)
        if not mask.any():
            return float("nan")
        error = error[mask]
    return float(10 * torch.log10(1 / error.mean().clamp_min(1e-10)))


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Structural similarity (Wang et al. 2004) with an 11×11 Gaussian window (σ 1.5), averaged over channels."""
    coords = torch.arange(11, dtype=torch.float32) - 5
    g = torch.exp(-(coords**2) / (2 * 1.5**2))
    window = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 11, 11)
    a, b = a.float()[None], b.float()[None]
    blur = lambda x: F.conv2d(x, window, groups=3)  # noqa: E731
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2, blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    value = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(value.mean())


def background_metrics(source: torch.Tensor, edited: torch.Tensor, mask: torch.Tensor) -> dict:
    """PSNR (dB), MSE and SSIM of ``source`` × (1 − mask) against ``edited`` × (1 − mask), whole image, as the
    reference. ``mask`` bool [H, W], True = edited. NaN when nothing is background (the reference's "nan")."""
    keep = (~mask.bool()).float()[None]
    if keep.sum() == 0:
        return {"psnr": float("nan"), "mse": float("nan"), "ssim": float("nan")}
    a, b = quantise(source) * keep, quantise(edited) * keep
    mse = float((a - b).pow(2).mean())
    return {"psnr": 10 * math.log10(1 / mse) if mse > 0 else float("inf"), "mse": mse, "ssim": ssim(a, b)}


# ------------------------------------------------------------------------------------------ tables by edit kind


@dataclass(frozen=True)
class Column:
    """One column of a per-edit-kind table: the mean of ``key`` over a kind's edits, times ``scale``."""

    key: str
    header: str
    legend: str
    scale: float = 1.0
    digits: int = 2


BACKGROUND_COLUMNS = (
    Column("background_psnr", "bg PSNR", "PSNR (dB) of the unedited region against the source; higher = better kept"),
    Column(
        "background_mse", "bg MSE ×10⁴", "mean squared error of the unedited region, ×10⁴; lower = better kept", 1e4
    ),
    Column(
        "background_ssim",
        "bg SSIM ×10²",
        "structural similarity of the unedited region, ×10²; higher = better kept",
        100,
    ),
)
BACKGROUND_NOTE = (
    "The unedited region is the image outside the item's mask, as PnPInversion's evaluation computes it: both images"
    " 8-bit, the mask's pixels zeroed in both, averaged over the whole image (a higher PSNR than over the region's"
    " pixels alone); without a mask, the whole image."
)


def kind_table(rows: list[dict], columns, note: str = BACKGROUND_NOTE) -> tuple[str, dict]:
    """A markdown table of ``columns``' means per PIE-Bench edit kind (``row["kind"]``, an editing_type_id) and over
    all rows, with a legend under it; and the means as a dict {kind name: {"edits": n, key: mean}}."""
    groups = {}
    for row in rows:
        groups.setdefault(EDITING_TYPES.get(row.get("kind"), "unlabelled"), []).append(row)
    order = [name for name in [*EDITING_TYPES.values(), "unlabelled"] if name in groups]
    summary = {name: _means(groups[name], columns) for name in order}
    if len(order) != 1:
        summary["all"] = _means(rows, columns)
    lines = [
        "| edit kind | edits | " + " | ".join(c.header for c in columns) + " |",
        "|---|---:|" + "---:|" * len(columns),
    ]
    for name, means in summary.items():
        cells = [f"{means[c.key] * c.scale:.{c.digits}f}" for c in columns]
        lines.append(f"| {name} | {means['edits']} | " + " | ".join(cells) + " |")
    legend = ["", "edit kind: PIE-Bench's editing_type_id, by name; edits: edited images scored"]
    legend += [f"{c.header}: {c.legend}" for c in columns] + ([note] if note else [])
    return "\n".join(lines + legend), summary


def _means(rows: list[dict], columns) -> dict:
    """Means over rows, NaN values (nothing to measure) left out; booleans count as 0 / 1."""
    means = {"edits": len(rows)}
    for column in columns:
        values = [float(row[column.key]) for row in rows if not math.isnan(float(row[column.key]))]
        means[column.key] = sum(values) / len(values) if values else float("nan")
    return means


class LearnedMetrics:
    """The reference's learned metrics whose weights are already on this machine; ``skipped`` says why the others
    are not computed."""

    def __init__(self, device="cpu"):
        self.device, self.skipped, self.available = torch.device(device), {}, {}
        for name, loader in (("structure_distance", self._dino), ("clip", self._clip), ("lpips", self._lpips)):
            try:
                self.available[name] = loader()
            except Exception as error:  # any failure to load locally means: skip, never download
                self.skipped[name] = f"{name} skipped: {error}"

    def _dino(self):
        hub = Path(torch.hub.get_dir())
        repo = hub / "facebookresearch_dino_main"
        weights = hub / "checkpoints" / "dino_vitbase8_pretrain.pth"
        if not repo.is_dir() or not weights.is_file():
            raise FileNotFoundError(f"no DINO ViT-B/8 at {repo} + {weights}")
        return torch.hub.load(str(repo), "dino_vitb8", source="local").to(self.device).eval()

    def _clip(self):
        from transformers import CLIPModel, CLIPProcessor

        name = "openai/clip-vit-large-patch14"
        try:
            model = CLIPModel.from_pretrained(name, local_files_only=True)
            processor = CLIPProcessor.from_pretrained(name, local_files_only=True)
        except OSError as error:
            raise FileNotFoundError(f"{name} is not in the local Hugging Face cache") from error
        return model.to(self.device).eval(), processor

    def _lpips(self):
        from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity

        checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / "squeezenet1_1-b8a52dc0.pth"
        if not checkpoint.is_file():
            raise FileNotFoundError(f"no SqueezeNet 1.1 checkpoint at {checkpoint}")
        return LearnedPerceptualImagePatchSimilarity(net_type="squeeze").to(self.device)

    @torch.no_grad()
    def __call__(self, source, edited, mask, target_prompt) -> dict:
        out = {}
        src, edt = quantise(source).to(self.device), quantise(edited).to(self.device)
        if "structure_distance" in self.available:
            out["structure_distance"] = float(F.mse_loss(self._key_similarity(edt), self._key_similarity(src)))
        if "clip" in self.available:
            out["clip_whole"] = self._clip_score(edt, target_prompt)
            out["clip_edited"] = self._clip_score(edt * mask.to(self.device).float()[None], target_prompt)
        if "lpips" in self.available:
            keep = (~mask.bool()).to(self.device).float()[None]
            out["lpips"] = float(self.available["lpips"]((src * keep)[None] * 2 - 1, (edt * keep)[None] * 2 - 1))
        return out

    def _key_similarity(self, image):
        model = self.available["structure_distance"]
        h, w = image.shape[-2:]
        short = 224 if max(h, w) * 224 / min(h, w) <= 480 else int(480 * min(h, w) / max(h, w))
        size = (short, round(w * short / h)) if h <= w else (round(h * short / w), short)
        x = F.interpolate(image[None], size=size, mode="bilinear", antialias=True, align_corners=False)
        mean = torch.tensor([0.485, 0.456, 0.406], device=x.device)[:, None, None]
        std = torch.tensor([0.229, 0.224, 0.225], device=x.device)[:, None, None]
        captured = {}
        hook = model.blocks[-1].attn.qkv.register_forward_hook(lambda m, i, o: captured.setdefault("qkv", o))
        try:
            model((x - mean) / std)
        finally:
            hook.remove()
        qkv = captured["qkv"][0]  # [tokens, 3 * dim]
        dim = qkv.shape[1] // 3
        keys = F.normalize(qkv[:, dim : 2 * dim], dim=-1)  # heads concatenated, as the reference's reshape
        return keys @ keys.T

    def _clip_score(self, image, prompt) -> float:
        model, processor = self.available["clip"]
        pixels = (image * 255).round().byte().permute(1, 2, 0).cpu().numpy()
        inputs = processor(text=[prompt], images=[pixels], return_tensors="pt", padding=True).to(self.device)
        img = F.normalize(model.get_image_features(pixel_values=inputs["pixel_values"]), dim=-1)
        txt = F.normalize(
            model.get_text_features(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]), dim=-1
        )
        return float(100 * (img * txt).sum().clamp(min=0))
