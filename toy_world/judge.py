"""Deterministic attribute checker for toy-world images (generated or edited).

Why: to score a text-to-image model or an edit without a learned classifier, we
check each captioned object directly in pixel space. This works because colours
are unique within a scene (object colours and background are all distinct):

1. every pixel is assigned to the nearest palette prototype (the 8 base colours
   and the pattern inks of the captioned objects' colours, mapped back to names);
2. for each object, the 8-connected components of its colour are found (label
   propagation with max-pooling; no scipy needed): the largest is the object,
   any other with at least MIN_CORE px left after a 1-px erosion a duplicate
   (anti-aliased rims, which can take a neighbour's colour, have none left);
   with a ``Scene``, the largest's centroid must lie within MAX_OFFSET sizes of
   the object's centre;
3. its shape is the one whose template (rendered at the component's centroid and
   scaled to its area) overlaps it best, if that IoU is at least MIN_IOU (so
   shapeless blobs are rejected);
4. its pattern is read from the ink pixels inside the component eroded by 1 px
   (the erosion drops anti-aliased rims that can look like ink): too few -> plain,
   ink that continues along the stripe direction -> striped, else dotted.

``judge(image, spec)`` accepts an image ([3,H,W] float in [0,1], [H,W,3] uint8
array or PIL image) and a ``Scene`` or caption; ``evaluate(images, specs)`` gives
accuracies over many. Captions with repeated colours
are not supported (the generator never produces them).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import scenes as S
from .scenes import H, W


MIN_AREA = 30  # px; smaller components count as "object missing"
MIN_CORE = 15  # px after a 1-px erosion: a duplicate (the smallest object keeps 36, a rim none)
MAX_OFFSET = 0.5  # sizes; an object whose centroid moved further is not where the scene has it
MIN_IOU = 0.7  # template IoU below this = no recognisable shape (clean renders >= 0.88)
MIN_BACKGROUND_FRAC = 0.3
INK_MIN_FRAC = 0.05  # interior ink fraction below which an object is plain
STRIPE_CONTINUITY = 0.6  # clean renders: dots <= 0.4, stripes ~1.0


@dataclass
class ObjectVerdict:
    colour: str
    shape: str
    pattern: str
    found: bool  # a component of the right colour with >= MIN_AREA px
    duplicates: int  # further components of that colour with >= MIN_CORE px after a 1-px erosion
    in_place: bool | None  # the component's centroid within MAX_OFFSET sizes of the centre (None: a caption)
    predicted_shape: str | None  # None: not found, or no template fits (IoU < MIN_IOU)
    iou: float  # template IoU of the predicted shape
    predicted_pattern: str | None
    area: int
    shape_ok: bool
    pattern_ok: bool
    ok: bool  # found and shape_ok (and pattern_ok if checked)


@dataclass
class Verdict:
    objects: list[ObjectVerdict]
    background_ok: bool
    background_frac: float
    ok: bool  # all objects ok and background ok


def _as_image(image) -> torch.Tensor:
    if not isinstance(image, torch.Tensor):
        arr = np.asarray(image)
        image = torch.from_numpy(arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 1.0))
        image = image.permute(2, 0, 1)
    if image.dim() == 4:  # a batch of one
        image = image[0]
    return image.detach().float().cpu().clamp(0, 1)[:3]


def classify_pixels(image: torch.Tensor, ink_colours=range(len(S.COLOURS))) -> tuple[torch.Tensor, torch.Tensor]:
    """Nearest prototype per pixel among the 8 base colours and the pattern inks of
    ``ink_colours`` (indices): returns (colour index [H,W], is_ink [H,W])."""
    ink_colours = torch.as_tensor(list(ink_colours), dtype=torch.long)
    protos = torch.cat([S.PALETTE, S.PATTERN_SHADE[ink_colours]])
    d = ((image[None] - protos[:, :, None, None]) ** 2).sum(1)  # [P, H, W]
    idx = d.argmin(0)
    n = len(S.COLOURS)
    colour = torch.where(idx < n, idx, ink_colours[(idx - n).clamp(min=0)])
    return colour, idx >= n


def components(mask: torch.Tensor) -> list[torch.Tensor]:
    """The 8-connected components of a bool mask [H,W], largest first."""
    if not mask.any():
        return []
    m = mask.float()[None, None]
    labels = torch.arange(1, mask.numel() + 1, dtype=torch.float32).reshape(m.shape) * m
    while True:  # every pixel converges to the max label of its component
        new = F.max_pool2d(labels, 3, 1, 1) * m
        if torch.equal(new, labels):
            break
        labels = new
    ids, counts = labels[m > 0].unique(return_counts=True)
    return [(labels == ids[k])[0, 0] for k in counts.argsort(descending=True, stable=True)]


def largest_component(mask: torch.Tensor) -> torch.Tensor:
    """Largest 8-connected component of a bool mask [H,W] (empty if mask is empty)."""
    parts = components(mask)
    return parts[0] if parts else mask


@functools.lru_cache(maxsize=None)
def _shape_calibration() -> dict[str, tuple[float, float, float]]:
    """Per shape: area of the (coverage > 0.5) mask per unit size^2 and the centroid
    offset from the shape centre per unit size (triangles and stars are bbox-centred)."""
    out, size = {}, 40.0
    for shape in S.SHAPES:
        m = S.shape_alpha(shape, size) > 0.5
        ys, xs = torch.nonzero(m, as_tuple=True)
        out[shape] = (
            m.sum().item() / size**2,
            (xs.float().mean().item() + 0.5 - W / 2) / size,
            (ys.float().mean().item() + 0.5 - H / 2) / size,
        )
    return out


def shape_scores(mask: torch.Tensor) -> dict[str, float]:
    """IoU of the component with each shape's template, placed at the component's
    centroid and scaled to its area (best over three scales). Template IoU is far
    more robust to ragged, noisy edges than bounding-box statistics."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    area, my, mx = float(len(ys)), ys.float().mean().item() + 0.5, xs.float().mean().item() + 0.5
    scores = {}
    for shape, (unit_area, ox, oy) in _shape_calibration().items():
        best = 0.0
        for scale in (0.92, 1.0, 1.08):
            s = scale * (area / unit_area) ** 0.5
            t = S.shape_alpha(shape, s, mx - ox * s, my - oy * s) > 0.5
            best = max(best, (t & mask).sum().item() / (t | mask).sum().item())
        scores[shape] = best
    return scores


def classify_shape(mask: torch.Tensor) -> tuple[str | None, float]:
    """Best-fitting shape and its IoU; None if even the best fit is poor (a blob)."""
    scores = shape_scores(mask)
    best = max(scores, key=scores.get)
    return (best if scores[best] >= MIN_IOU else None), scores[best]


def _erode(mask: torch.Tensor) -> torch.Tensor:
    """The mask eroded by 1 px (8-neighbourhood)."""
    return -F.max_pool2d(-mask.float()[None, None], 3, 1, 1)[0, 0] > 0


def _classify_pattern(component: torch.Tensor, ink: torch.Tensor) -> str | None:
    """Plain if the eroded interior has (almost) no ink; otherwise striped if ink
    continues along the stripe direction (dx, dy) = (+2, -2), which isolated dots
    (diameter ~3.4 px) rarely do."""
    inner = _erode(component)
    if inner.sum() < 8:
        return None
    a = ink & inner
    if a[inner].float().mean().item() < INK_MIN_FRAC:
        return ""
    pair_inside = inner[2:, :-2] & inner[:-2, 2:]
    start, end = a[2:, :-2] & pair_inside, a[:-2, 2:]
    if start.sum() < 4:
        return "striped" if a[inner].float().mean().item() > 0.4 else "dotted"
    continuity = (start & end).sum().item() / start.sum().item()
    return "striped" if continuity >= STRIPE_CONTINUITY else "dotted"


def _offset(component: torch.Tensor, centre: tuple[float, float]) -> float:
    """Distance (px) of the component's centroid from ``centre`` (pixel i covers [i, i + 1))."""
    ys, xs = torch.nonzero(component, as_tuple=True)
    return math.hypot(xs.float().mean().item() + 0.5 - centre[0], ys.float().mean().item() + 0.5 - centre[1])


def judge(image, spec, check_pattern: bool = False) -> Verdict:
    """Check that every object of ``spec`` (a ``Scene`` or caption) is present with
    the right colour and shape (and pattern if ``check_pattern``), and that the
    background has the right colour."""
    if isinstance(spec, S.Scene):
        objects = [(o.pattern, o.colour, o.shape) for o in spec.objects]
        places = [(o.cx, o.cy, o.size) for o in spec.objects]
        background = spec.background
    else:
        objects, background = S.parse_caption(spec)
        places = [None] * len(objects)
    # Only the inks of the captioned objects compete: the pastel/grey inks of all
    # eight colours would crowd the colour space and swallow anti-aliased blends.
    colour_idx, ink = classify_pixels(_as_image(image), [S.COLOURS.index(c) for _, c, _ in objects])
    verdicts = []
    for (pattern, colour, shape), place in zip(objects, places):
        parts = components(colour_idx == S.COLOURS.index(colour))
        comp = parts[0] if parts else colour_idx < 0
        area = int(comp.sum())
        found = area >= MIN_AREA
        duplicates = sum(int(_erode(part).sum()) >= MIN_CORE for part in parts[1:])
        in_place = None if place is None else found and _offset(comp, place[:2]) <= MAX_OFFSET * place[2]
        pred_shape, iou = classify_shape(comp) if found else (None, 0.0)
        pred_pattern = _classify_pattern(comp, ink) if found else None
        shape_ok, pattern_ok = pred_shape == shape, pred_pattern == pattern
        ok = found and shape_ok and (pattern_ok or not check_pattern)
        verdicts.append(
            ObjectVerdict(
                colour,
                shape,
                pattern,
                found,
                duplicates,
                in_place,
                pred_shape,
                iou,
                pred_pattern,
                area,
                shape_ok,
                pattern_ok,
                ok,
            )
        )
    bg_frac = (colour_idx == S.COLOURS.index(background)).float().mean().item()
    bg_ok = bg_frac >= MIN_BACKGROUND_FRAC
    return Verdict(verdicts, bg_ok, bg_frac, bg_ok and all(v.ok for v in verdicts))


def evaluate(images, specs, check_pattern: bool = False) -> dict:
    """Judge many images: scene / object / background accuracies and the verdicts."""
    verdicts = [judge(im, sp, check_pattern) for im, sp in zip(images, specs)]
    objs = [o for v in verdicts for o in v.objects]
    return dict(
        scene_accuracy=sum(v.ok for v in verdicts) / max(1, len(verdicts)),
        object_accuracy=sum(o.ok for o in objs) / max(1, len(objs)),
        background_accuracy=sum(v.background_ok for v in verdicts) / max(1, len(verdicts)),
        verdicts=verdicts,
    )
