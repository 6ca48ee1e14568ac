"""Procedurally rendered, captioned 64x64 scenes with exact ground-truth edits.

Why: real-image editing methods (negative-prompt inversion, prompt-to-prompt) are
hard to evaluate on natural photos because nobody knows what the "correct" edited
image is. In this toy world every image is rendered from an attribute spec, so an
edit that changes one attribute has a pixel-exact ground truth and a known edit
region, and a tiny text-to-image model can be trained on it in minutes.

A scene is one to three objects on a coloured, textured background::

    "a red circle and a striped blue square on a white background"

* captioned attributes: shape (circle, square, triangle, star), colour (8 named
  palette colours, all distinct within a scene, background included) and an
  optional pattern adjective (striped, dotted; ~25% of objects);
* uncaptioned attributes: size (14-22 px), position (objects kept apart),
  background texture (smooth low-frequency colour noise + fine luminance grain).

Shapes are rendered from signed-distance functions with a 1 px anti-aliased edge
and alpha-composited over the background in caption order. Because compositing
``img * (1 - a) + colour * a`` is an exact identity wherever ``a == 0``, an edit
changes pixels only where the edited object's old or new coverage is non-zero
(and a background edit only where the background is visible), bit for bit.

Resolution: scene geometry lives in "scene units", the 64-px frame. ``render``, ``make_edit`` and
``render_batch`` take ``res`` (default 64, the v1 world, bit-identical to before ``res`` existed); toy world
v2 renders the same scenes at ``RES_V2`` = 128 px, where objects are 28-44 px across. Only the anti-aliased
edge and the background grain are per output pixel.

Public API (all deterministic given a seed / generator; pure torch + numpy):

* ``sample_scene(seed) -> Scene``; ``Scene.caption``
* ``render(scene) -> dict(image, caption, alphas, masks, background_mask, ...)``,
  image float32 [3, 64, 64] in [0, 1]
* ``make_edit(scene, kind, seed) -> Edit`` for kind in ``EDIT_KINDS``
* ``render_batch(n, generator, device, return_captions=False, res=64, return_regions=False)
  -> (images [n,3,64,64] float in [0, 1], token_ids [n,77] long[, regions, token_slots][, captions])``,
  fully vectorised for on-GPU training data
* ``parse_caption(caption) -> (objects, background)``, ``tokenize(captions)``
* lower level: ``sample_specs`` (attribute tensors), ``render_specs``,
  ``spec_token_ids``, ``spec_token_slots`` and ``scene_regions`` (which region each word names: the
  training's token grounding), ``shape_alpha``
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from . import tokenizer as _tok
from .vocabulary import COLOURS, FILLER_WORDS, PATTERNS, SHAPES, WORDS  # noqa: F401  (the caption words)


H = W = 64  # v1 image size, and the frame of scene units at every resolution
RES_V2 = 128  # toy world v2 renders the same scenes at 128 px (32 x 32 latent at VAE factor 4)
MAX_OBJECTS = 3

PALETTE = torch.tensor(
    [
        [0.90, 0.12, 0.12],  # red
        [0.15, 0.72, 0.20],  # green
        [0.15, 0.25, 0.90],  # blue
        [0.95, 0.88, 0.15],  # yellow
        [0.58, 0.20, 0.78],  # purple
        [1.00, 0.55, 0.05],  # orange
        [0.95, 0.95, 0.95],  # white
        [0.08, 0.08, 0.08],  # black
    ]
)
# Pattern ink: a lighter tint for most colours, a darker shade for the light ones,
# chosen so that no tint is confusable with another palette colour (see judge.py).
PATTERN_SHADE = torch.tensor(
    [
        [0.98, 0.60, 0.60],  # red -> pink
        [0.60, 0.92, 0.62],  # green -> mint
        [0.60, 0.68, 1.00],  # blue -> light blue
        [0.60, 0.50, 0.02],  # yellow -> olive
        [0.85, 0.65, 0.95],  # purple -> lilac
        [0.62, 0.30, 0.02],  # orange -> brown
        [0.62, 0.62, 0.62],  # white -> grey
        [0.40, 0.40, 0.40],  # black -> dark grey
    ]
)

SIZE_RANGE = (14.0, 22.0)  # object size s (px); shapes below are scaled by s
EXTENT = 0.62  # every shape fits in a disc of radius ~EXTENT * s
PATTERN_PROB = 0.25
NUM_OBJECT_PROBS = (0.25, 0.35, 0.40)  # P(1), P(2), P(3) objects
TEXTURE_LOWFREQ_AMP = 0.05  # std of the smooth per-channel background noise
TEXTURE_LOWFREQ_GRID = 5  # control points per side of that noise
TEXTURE_GRAIN_AMP = 0.012  # std of the per-pixel luminance grain
STRIPE_PERIOD = 6.0  # px, diagonal stripes of half-period width
DOT_SPACING, DOT_RADIUS = 6.0, 1.7
PLACEMENT_CANDIDATES = 256

EDIT_KINDS = ("colour", "shape", "background", "pattern")


# ----------------------------------------------------------------------------- spec


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    pattern: str  # "" (plain), "striped" or "dotted"
    cx: float  # centre, pixel units (pixel i covers [i, i + 1))
    cy: float
    size: float

    @property
    def words(self) -> list[str]:
        return ["a"] + ([self.pattern] if self.pattern else []) + [self.colour, self.shape]


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]
    background: str
    texture_seed: int

    @property
    def caption(self) -> str:
        return " ".join(self.words)

    @property
    def words(self) -> list[str]:
        out: list[str] = []
        for i, o in enumerate(self.objects):
            out += (["and"] if i else []) + o.words
        return out + ["on", "a", self.background, "background"]

    def word_positions(self) -> tuple[list[dict], int]:
        """Index in ``caption.split()`` of each object's pattern/colour/shape word,
        and of the background colour word. Token index = word index + 1 (BOS)."""
        pos, objs = 0, []
        for i, o in enumerate(self.objects):
            pos += 1 if i else 0  # "and"
            p = {"pattern": pos + 1 if o.pattern else None}
            pos += 2 if o.pattern else 1
            p["colour"], p["shape"] = pos, pos + 1
            pos += 2
            objs.append(p)
        return objs, pos + 2


def parse_caption(caption: str) -> tuple[list[tuple[str, str, str]], str]:
    """Inverse of ``Scene.caption``: ``([(pattern, colour, shape), ...], background)``."""
    words = caption.split()
    if len(words) < 7 or words[-4:-2] != ["on", "a"] or words[-1] != "background":
        raise ValueError(f"not a toy-world caption: {caption!r}")
    background, objects = words[-2], []
    chunk: list[str] = []
    for w in words[:-4] + ["and"]:
        if w != "and":
            chunk.append(w)
            continue
        if not (3 <= len(chunk) <= 4 and chunk[0] == "a"):
            raise ValueError(f"bad object phrase {chunk} in {caption!r}")
        pattern = chunk[1] if len(chunk) == 4 else ""
        colour, shape = chunk[-2], chunk[-1]
        if pattern not in PATTERNS or colour not in COLOURS or shape not in SHAPES:
            raise ValueError(f"unknown word in {chunk} of {caption!r}")
        objects.append((pattern, colour, shape))
        chunk = []
    if background not in COLOURS:
        raise ValueError(f"unknown background colour in {caption!r}")
    return objects, background


# ------------------------------------------------------------------- batched sampling


def _generator(generator, device) -> torch.Generator:
    if generator is None:
        generator = torch.Generator(device=device)
        generator.seed()
    return generator


def sample_specs(n: int, generator: torch.Generator, device="cpu") -> dict:
    """Sample attribute tensors for ``n`` scenes (three object slots each)."""
    g, dev, K = generator, torch.device(device), MAX_OBJECTS
    u = torch.rand(n, generator=g, device=dev)
    p1, p2 = NUM_OBJECT_PROBS[0], NUM_OBJECT_PROBS[0] + NUM_OBJECT_PROBS[1]
    num = 1 + (u >= p1).long() + (u >= p2).long()
    present = torch.arange(K, device=dev)[None] < num[:, None]
    # A random permutation per scene keeps all colours (background too) distinct.
    perm = torch.rand(n, len(COLOURS), generator=g, device=dev).argsort(dim=1)
    background, colour = perm[:, 0], perm[:, 1 : 1 + K]
    shape = torch.randint(0, len(SHAPES), (n, K), generator=g, device=dev)
    patterned = torch.rand(n, K, generator=g, device=dev) < PATTERN_PROB
    pattern = torch.where(patterned, 1 + torch.randint(0, 2, (n, K), generator=g, device=dev), 0)
    lo_s, hi_s = SIZE_RANGE
    size = lo_s + (hi_s - lo_s) * torch.rand(n, K, generator=g, device=dev)
    centre = _place(size, present, g)
    return dict(
        present=present, shape=shape, colour=colour, pattern=pattern, size=size, centre=centre, background=background
    )


def _place(size, present, g):
    """Rejection-sample non-overlapping centres, vectorised: draw T candidate layouts
    per scene and keep the first one whose discs (radius EXTENT * size) are disjoint,
    or the least-overlapping one if none is (rare)."""
    n, K = size.shape
    T = PLACEMENT_CANDIDATES
    r = EXTENT * size  # [n, K]
    lo = r + 1.0
    u = torch.rand(n, T, K, 2, generator=g, device=size.device)
    cand = lo[:, None, :, None] + u * (W - 2 * lo)[:, None, :, None]
    slack = torch.full((n, T), float("inf"), device=size.device)
    for i in range(K):
        for j in range(i + 1, K):
            d = (cand[:, :, i] - cand[:, :, j]).norm(dim=-1) - (r[:, i] + r[:, j])[:, None]
            both = (present[:, i] & present[:, j])[:, None]
            slack = torch.minimum(slack, torch.where(both, d, torch.inf))
    best = slack.clamp(max=0.0).argmax(dim=1)  # first valid candidate
    return cand[torch.arange(n, device=size.device), best]  # [n, K, 2]


def _texture(n: int, generator: torch.Generator, device="cpu", res: int = H) -> torch.Tensor:
    """Additive background texture [n, 3, res, res]: smooth colour noise + luminance grain
    (the grain is per output pixel, so it is as fine at every resolution)."""
    G = TEXTURE_LOWFREQ_GRID
    low = torch.randn(n, 3, G, G, generator=generator, device=device) * TEXTURE_LOWFREQ_AMP
    low = F.interpolate(low, size=(res, res), mode="bicubic", align_corners=True)
    grain = torch.randn(n, 1, res, res, generator=generator, device=device) * TEXTURE_GRAIN_AMP
    return low + grain


# ------------------------------------------------------------------------ rendering


def _polygon(n_points: int, outer: float, inner: float | None) -> list[tuple[float, float]]:
    """Upright regular polygon / star (unit size), shifted so its bbox is centred."""
    pts = []
    step = math.pi / n_points if inner is not None else 2 * math.pi / n_points
    for k in range(2 * n_points if inner is not None else n_points):
        rad = inner if (inner is not None and k % 2) else outer
        a = -math.pi / 2 + k * step
        pts.append((rad * math.cos(a), rad * math.sin(a)))
    ys = [p[1] for p in pts]
    dy = -(min(ys) + max(ys)) / 2
    return [(x, y + dy) for x, y in pts]


# Unit-size geometry (multiply by the object size s): circle radius 0.5, square
# half-side 0.44, triangle side 1.1, star outer radius 0.6 (roughly equal areas).
_TRIANGLE = _polygon(3, 1.1 / math.sqrt(3), None)
_STAR = _polygon(5, 0.6, 0.6 * 0.45)
_SQUARE_HALF = 0.44


def _polygon_sdf(px, py, verts):
    """Exact signed distance to a polygon (negative inside), after Inigo Quilez."""
    d2 = torch.full_like(px, float("inf"))
    inside = torch.zeros_like(px, dtype=torch.bool)
    for i in range(len(verts)):
        (xi, yi), (xj, yj) = verts[i], verts[i - 1]
        ex, ey, wx, wy = xj - xi, yj - yi, px - xi, py - yi
        t = ((wx * ex + wy * ey) / (ex * ex + ey * ey)).clamp(0.0, 1.0)
        d2 = torch.minimum(d2, (wx - ex * t) ** 2 + (wy - ey * t) ** 2)
        c1, c2, c3 = py >= yi, py < yj, ex * wy > ey * wx
        inside ^= (c1 & c2 & c3) | (~c1 & ~c2 & ~c3)
    return torch.where(inside, -1.0, 1.0) * d2.sqrt()


def _unit_sdf(shape: int, px, py):
    """Signed distance to unit-size shape ``SHAPES[shape]`` at local coords px, py."""
    if shape == 0:
        return torch.hypot(px, py) - 0.5
    if shape == 1:
        qx, qy = px.abs() - _SQUARE_HALF, py.abs() - _SQUARE_HALF
        return torch.hypot(qx.clamp(min=0), qy.clamp(min=0)) + torch.maximum(qx, qy).clamp(max=0)
    return _polygon_sdf(px, py, _TRIANGLE if shape == 2 else _STAR)


def _shape_sdfs(dx, dy, s):
    """Signed distances (px) of all shapes at local offsets dx, dy: [len(SHAPES), ...]."""
    px, py = dx / s, dy / s
    return torch.stack([_unit_sdf(k, px, py) for k in range(len(SHAPES))]) * s


def _pattern_cover(dx, dy, px_per_unit: float = 1.0):
    """Coverage of stripe and dot ink, anchored at the object centre so that a shape
    swap keeps the pattern in place: [2, ...] (striped, dotted). Offsets in scene
    units; the ink edge is anti-aliased over one output pixel."""
    u = (dx + dy) * (0.5**0.5)
    P = STRIPE_PERIOD
    stripe = (torch.remainder(u + P / 2, P) - P / 2).abs() - P / 4
    S = DOT_SPACING
    gx = torch.remainder(dx + S / 2, S) - S / 2
    gy = torch.remainder(dy + S / 2, S) - S / 2
    dot = torch.hypot(gx, gy) - DOT_RADIUS
    return (0.5 - torch.stack([stripe, dot]) * px_per_unit).clamp(0.0, 1.0)


def _coords(device, res: int = W):
    """Pixel-centre coordinates in scene units (the 64-px frame), for a res x res image."""
    c = torch.arange(res, device=device, dtype=torch.float32) + 0.5
    if res != W:
        c = c * (W / res)
    return c[None, :], c[:, None]  # xx [1, res], yy [res, 1]


def render_specs(specs: dict, texture: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Render attribute tensors at the texture's resolution. Returns image
    [n,3,res,res] in [0,1] and per-slot coverage alphas [n,K,res,res] (zero for
    absent slots).

    Geometry (centres, sizes, pattern periods) lives in scene units, the 64-px frame,
    so one scene renders at any resolution; only the anti-aliased edge is 1 output
    pixel wide (distances are converted to output pixels by ``px_per_unit``)."""
    dev = texture.device
    res = texture.shape[-1]
    px_per_unit = res / W
    palette, shades = PALETTE.to(dev), PATTERN_SHADE.to(dev)
    xx, yy = _coords(dev, res)
    img = (palette[specs["background"]][:, :, None, None] + texture).clamp(0.0, 1.0)
    alphas = []
    for k in range(specs["shape"].shape[1]):
        cx, cy = specs["centre"][:, k, 0, None, None], specs["centre"][:, k, 1, None, None]
        s = specs["size"][:, k, None, None]
        dx, dy = torch.broadcast_tensors(xx - cx, yy - cy)  # [n, H, W]
        sdf = _shape_sdfs(dx, dy, s).gather(0, specs["shape"][None, :, k, None, None].expand(1, *dx.shape))[0]
        if res != W:
            sdf = sdf * px_per_unit
        a = (0.5 - sdf).clamp(0.0, 1.0) * specs["present"][:, k, None, None]
        pat = specs["pattern"][:, k]
        cover = _pattern_cover(dx, dy, px_per_unit).gather(
            0, (pat - 1).clamp(min=0)[None, :, None, None].expand(1, *dx.shape)
        )[0]
        cover = cover * (pat > 0)[:, None, None]
        base, ink = palette[specs["colour"][:, k]], shades[specs["colour"][:, k]]
        col = base[:, :, None, None] + (ink - base)[:, :, None, None] * cover[:, None]
        a4 = a[:, None]
        img = img * (1 - a4) + col * a4  # exact no-op where a == 0 (edits rely on it)
        alphas.append(a)
    return img, torch.stack(alphas, 1)


def _specs_from_scene(scene: Scene) -> dict:
    objs = scene.objects
    t = lambda v, dt: torch.tensor(v, dtype=dt)[None]  # noqa: E731
    return dict(
        present=t([True] * len(objs), torch.bool),
        shape=t([SHAPES.index(o.shape) for o in objs], torch.long),
        colour=t([COLOURS.index(o.colour) for o in objs], torch.long),
        pattern=t([PATTERNS.index(o.pattern) for o in objs], torch.long),
        size=t([o.size for o in objs], torch.float32),
        centre=t([[o.cx, o.cy] for o in objs], torch.float32),
        background=t(COLOURS.index(scene.background), torch.long),
    )


def _scene_from_specs(specs: dict, i: int, texture_seed: int = -1) -> Scene:
    objs = []
    for k in range(specs["shape"].shape[1]):
        if not bool(specs["present"][i, k]):
            continue
        cx, cy = (float(v) for v in specs["centre"][i, k].cpu())
        objs.append(
            Obj(
                SHAPES[int(specs["shape"][i, k])],
                COLOURS[int(specs["colour"][i, k])],
                PATTERNS[int(specs["pattern"][i, k])],
                cx,
                cy,
                float(specs["size"][i, k]),
            )
        )
    return Scene(tuple(objs), COLOURS[int(specs["background"][i])], texture_seed)


def sample_scene(seed: int) -> Scene:
    """Draw one scene spec from the same distribution as ``render_batch``."""
    g = torch.Generator().manual_seed(int(seed))
    specs = sample_specs(1, g)
    texture_seed = int(torch.randint(0, 2**31 - 1, (1,), generator=g))
    return _scene_from_specs(specs, 0, texture_seed)


def render(scene: Scene, res: int = H) -> dict:
    """Render a scene on the CPU at ``res`` x ``res`` pixels (64: the v1 world;
    toy world v2 uses ``RES_V2``). Returns ``image`` float32 [3,res,res] in [0,1],
    ``caption``, per-object coverage ``alphas`` [k,H,W] (float, 1 px soft edge) and
    ``masks`` [k,H,W] (bool, coverage > 0), ``background_alpha`` [H,W] (visible
    fraction of the background) and ``background_mask`` (bool, visible at all)."""
    texture = _texture(1, torch.Generator().manual_seed(scene.texture_seed), res=res)
    img, alphas = render_specs(_specs_from_scene(scene), texture)
    alphas = alphas[0]
    bg_alpha = scene_regions(alphas[None])[0, -1]
    return dict(
        image=img[0],
        caption=scene.caption,
        alphas=alphas,
        masks=alphas > 0,
        background_alpha=bg_alpha,
        background_mask=bg_alpha > 0,
    )


def shape_alpha(shape: str, size: float, cx: float = W / 2, cy: float = H / 2) -> torch.Tensor:
    """Coverage [H,W] of a single shape (used by the judge to calibrate itself)."""
    xx, yy = _coords("cpu")
    dx, dy = torch.broadcast_tensors(xx - cx, yy - cy)
    sdf = _unit_sdf(SHAPES.index(shape), dx / size, dy / size) * size
    return (0.5 - sdf).clamp(0.0, 1.0)


# ----------------------------------------------------------------------------- edits


@dataclass
class Edit:
    kind: str
    object_index: int | None  # None for background edits
    source_scene: Scene
    target_scene: Scene
    source_caption: str
    target_caption: str
    source_image: torch.Tensor  # [3,H,W] in [0,1]
    target_image: torch.Tensor  # ground truth of the edit
    mask: torch.Tensor  # bool [H,W]: the only pixels allowed to change
    source_words: tuple[str, ...]  # words replaced/removed (prompt-to-prompt blend words)
    target_words: tuple[str, ...]  # words inserted
    source_positions: tuple[int, ...]  # their indices in source_caption.split()
    target_positions: tuple[int, ...]  # ... and in target_caption.split()


def make_edit(scene: Scene, kind: str, seed: int, res: int = H) -> Edit:
    """Change exactly one attribute of ``scene`` (everything else, texture included,
    stays fixed) and render the ground truth.

    kinds: ``colour`` (one object gets a colour unused in the scene), ``shape`` (one
    object becomes another shape, same centre and size), ``background`` (new unused
    colour, same texture), ``pattern`` (a plain object gets "striped"/"dotted": one
    word added; if every object is already patterned, one pattern word is removed).
    """
    rng = np.random.default_rng(seed)
    objs = list(scene.objects)
    used = {o.colour for o in objs} | {scene.background}
    unused = [c for c in COLOURS if c not in used]
    src_pos, src_bg_pos = scene.word_positions()
    k = None
    if kind == "background":
        target = dataclasses.replace(scene, background=str(rng.choice(unused)))
        src_w, tgt_w = (scene.background,), (target.background,)
        sp = tp = (src_bg_pos,)
    elif kind in ("colour", "shape"):
        k = int(rng.integers(len(objs)))
        old = getattr(objs[k], kind)
        choices = unused if kind == "colour" else [s for s in SHAPES if s != old]
        objs[k] = dataclasses.replace(objs[k], **{kind: str(rng.choice(choices))})
        target = dataclasses.replace(scene, objects=tuple(objs))
        src_w, tgt_w = (old,), (getattr(objs[k], kind),)
        sp = tp = (src_pos[k][kind],)
    elif kind == "pattern":
        plain = [i for i, o in enumerate(objs) if not o.pattern]
        add = bool(plain)
        k = int(rng.choice(plain)) if add else int(rng.integers(len(objs)))
        new = str(rng.choice(PATTERNS[1:])) if add else ""
        old = objs[k].pattern
        objs[k] = dataclasses.replace(objs[k], pattern=new)
        target = dataclasses.replace(scene, objects=tuple(objs))
        tgt_pos, _ = target.word_positions()
        src_w, tgt_w = ((), (new,)) if add else ((old,), ())
        sp, tp = ((), (tgt_pos[k]["pattern"],)) if add else ((src_pos[k]["pattern"],), ())
    else:
        raise ValueError(f"unknown edit kind {kind!r}; expected one of {EDIT_KINDS}")
    src, tgt = render(scene, res), render(target, res)
    mask = src["background_mask"] if k is None else (src["masks"][k] | tgt["masks"][k])
    return Edit(
        kind, k, scene, target, scene.caption, target.caption, src["image"], tgt["image"], mask, src_w, tgt_w, sp, tp
    )


# ------------------------------------------------------------------- training batches


def _token_tables(device):
    ids, (bos, eos) = _tok.word_ids(), _tok.special_ids()
    lut = lambda names: torch.tensor([ids[w] if w else -1 for w in names], device=device)  # noqa: E731
    return dict(
        colour=lut(COLOURS),
        shape=lut(SHAPES),
        pattern=lut(PATTERNS),
        **{w: ids[w] for w in FILLER_WORDS},
        bos=bos,
        eos=eos,
    )


def _caption_columns(specs: dict, t: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Every possible word of the specs' captions, in caption order: ``words`` (ids) [n, C], ``keep`` [n, C] (the word
    is in this caption) and ``slots`` [n, C]: the region a word names (object slot k for its pattern, colour and
    shape words; ``MAX_OBJECTS`` for the background's colour word and "background"; -1 for grammar words)."""
    dev = specs["shape"].device
    n, K = specs["shape"].shape
    full = lambda v: torch.full((n,), v, device=dev)  # noqa: E731
    cols, keep, slots = [], [], []
    for k in range(K):
        p = specs["present"][:, k]
        cols += [
            full(t["and"]),
            full(t["a"]),
            t["pattern"][specs["pattern"][:, k]],
            t["colour"][specs["colour"][:, k]],
            t["shape"][specs["shape"][:, k]],
        ]
        keep += [p & (k > 0), p, p & (specs["pattern"][:, k] > 0), p, p]
        slots += [full(-1), full(-1), full(k), full(k), full(k)]
    cols += [full(t["on"]), full(t["a"]), t["colour"][specs["background"]], full(t["background"])]
    keep += [torch.ones(n, dtype=torch.bool, device=dev)] * 4
    slots += [full(-1), full(-1), full(K), full(K)]
    return torch.stack(cols, 1), torch.stack(keep, 1), torch.stack(slots, 1)


def _left_align(values: torch.Tensor, keep: torch.Tensor, first: int, fill: int, max_length: int) -> torch.Tensor:
    """[n, max_length]: ``first``, then the kept values in order, then ``fill``. Dropped values are scattered into a
    spare last column."""
    pos = torch.where(keep, keep.long().cumsum(1), max_length)
    out = torch.full((len(values), max_length + 1), fill, dtype=torch.long, device=values.device)
    out[:, 0] = first
    out.scatter_(1, pos, values.long())
    return out[:, :max_length]


def spec_token_ids(specs: dict, max_length: int = _tok.MAX_LENGTH) -> torch.Tensor:
    """Token ids [n, max_length] of the specs' captions, straight from attribute
    indices (BOS, one id per word, EOS, EOS padding) -- identical to what the
    CLIPTokenizer written by ``tokenizer.save_tokenizer`` produces."""
    t = _token_tables(specs["shape"].device)
    words, keep, _ = _caption_columns(specs, t)
    return _left_align(words, keep, t["bos"], t["eos"], max_length)


def spec_token_slots(specs: dict, max_length: int = _tok.MAX_LENGTH) -> torch.Tensor:
    """For each token of ``spec_token_ids``, the index of the region it names in ``scene_regions``' output (object
    slot k for the object's pattern, colour and shape words; ``MAX_OBJECTS`` for the background's colour word and
    "background") or -1 (BOS, grammar words, EOS and padding). [n, max_length] long."""
    t = _token_tables(specs["shape"].device)
    _, keep, slots = _caption_columns(specs, t)
    return _left_align(slots, keep, -1, -1, max_length)


def scene_regions(alphas: torch.Tensor) -> torch.Tensor:
    """[n, MAX_OBJECTS + 1, H, W]: each object slot's coverage (objects never overlap), then the visible background."""
    return torch.cat([alphas, (1 - alphas).prod(1, keepdim=True)], 1)


def tokenize(captions, max_length: int = _tok.MAX_LENGTH) -> torch.Tensor:
    """Pure-Python equivalent of the CLIP tokenizer for grammar-word captions
    (e.g. ``tokenize([""])`` gives the unconditional ids). [n, max_length] long."""
    if isinstance(captions, str):
        captions = [captions]
    ids, (bos, eos) = _tok.word_ids(), _tok.special_ids()
    out = torch.full((len(captions), max_length), eos, dtype=torch.long)
    for i, c in enumerate(captions):
        row = [bos] + [ids[w] for w in c.lower().split()][: max_length - 2] + [eos]
        out[i, : len(row)] = torch.tensor(row)
    return out


def render_batch(
    n: int,
    generator: torch.Generator | None = None,
    device="cpu",
    return_captions: bool = False,
    res: int = H,
    return_regions: bool = False,
):
    """Sample and render ``n`` scenes with tensor ops on ``device``.

    Returns ``images`` float32 [n,3,res,res] in **[0, 1]** (map to [-1, 1] for the VAE)
    and ``token_ids`` long [n,77]; with ``return_regions`` also ``scene_regions`` [n,4,res,res] and
    ``spec_token_slots`` [n,77] (which region each token names), then with ``return_captions`` the caption strings.
    ``generator`` must live on ``device`` (a fresh randomly seeded one if None); the scenes do not depend on what
    is returned.
    """
    g = _generator(generator, device)
    specs = sample_specs(n, g, device)
    images, alphas = render_specs(specs, _texture(n, g, device, res))
    out = [images, spec_token_ids(specs)]
    if return_regions:
        out += [scene_regions(alphas), spec_token_slots(specs)]
    if return_captions:
        out.append([_scene_from_specs(specs, i).caption for i in range(n)])
    return tuple(out)
