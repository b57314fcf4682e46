"""Procedural grayscale retinal-fundus phantoms for the five diabetic-retinopathy grades.

A phantom is drawn at ``SUPERSAMPLE`` times the output size and box-averaged down, so features
smaller than an output pixel (microaneurysms, fine new vessels) survive as intensity. Anatomy is
random per image (which eye, disc position, vessel angles and branching); the lesions follow the
grade, loosely after the international clinical DR scale:

- No_DR: no lesions.
- Mild: a few microaneurysms (tiny dark dots).
- Moderate: more microaneurysms, blot and flame haemorrhages, clusters of hard exudates (bright).
- Severe: many haemorrhages in all four quadrants, venous beading, cotton-wool spots.
- Proliferate_DR: neovascular tufts at the disc (and sometimes elsewhere), a boat-shaped
  preretinal haemorrhage, plus background haemorrhages.

Gray levels stand for the red-free channel: blood is dark, exudates and the disc are bright.
A ``ScannerStyle`` (brightness, contrast, vignetting, sensor noise) shifts the look per site.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from fedgen.config import DR_GRADES

__all__ = [
    "SUPERSAMPLE",
    "ScannerStyle",
    "draw_scanner_style",
    "render_phantom",
]

SUPERSAMPLE = 4  # internal resolution = SUPERSAMPLE x output size

# Geometry, as fractions of the fundus radius R unless named otherwise.
FUNDUS_RADIUS = 0.47  # of the canvas side
DISC_OFFSET = (0.30, 0.45)  # horizontal distance of the disc from the centre
DISC_VERTICAL_JITTER = 0.10
DISC_RADIUS = (0.11, 0.14)
FOVEA_DISTANCE = (4.0, 5.0)  # in disc radii, temporal from the disc
LESION_FIELD = 0.88  # lesions lie within this radius
LESION_DISC_CLEARANCE = 1.5  # in disc radii: no lesion centre on the disc

# Gray levels (0 black .. 1 white) before the scanner style.
FUNDUS_LEVEL = 0.5
TEXTURE_AMPLITUDE = 0.04
TEXTURE_GRID = 6  # coarse random field, upsampled, for the choroidal mottling
DISC_BRIGHTNESS = 0.40
CUP_BRIGHTNESS = 0.15
VESSELS_ON_DISC = 0.5  # vessel contrast on the bright disc, relative to the retina
MACULA_DARKNESS = 0.20
VEIN_DARKNESS = 0.45
ARTERY_DARKNESS = 0.30
NEOVESSEL_DARKNESS = 0.55
BLOOD_DARKNESS = 0.65
EXUDATE_BRIGHTNESS = 0.40
COTTON_WOOL_BRIGHTNESS = 0.25
COTTON_WOOL_BLUR = 2.0  # hi-res pixels

# Lesion sizes, hi-res pixels on the reference canvas (so 1 output pixel = 4).
MICROANEURYSM_RADIUS = (2.5, 3.5)  # real ones are smaller; here about one output pixel
BLOT_RADIUS = (3.0, 5.0)
BLOT_BLOBS = (2, 4)
FLAME_FRACTION = 0.3  # of haemorrhages
FLAME_HALF_LENGTH = (4.0, 7.0)
FLAME_WIDTH = (2.5, 4.0)
EXUDATE_RADIUS = (1.5, 3.0)
EXUDATE_CLUSTERS = (1, 3)
EXUDATE_SPREAD = 1.0  # std of a cluster, in disc radii
COTTON_WOOL_RADIUS = (3.0, 5.0)
PRERETINAL_RADIUS = (10.0, 15.0)
TUFT_VESSELS = (14, 24)
TUFT_SEGMENTS = (4, 9)
TUFT_STEP = 2.0
TUFT_TORTUOSITY = 0.9  # std of the turn per segment, radians
TUFT_SPREAD = 0.6  # std of where the tuft's vessels start, in disc radii

# Vessel growth (hi-res pixels per step at 128 px, scaled with the canvas).
VESSEL_STEP = 3.0
VESSEL_WANDER = 0.06  # std of the random turn per step, radians
VESSEL_BRANCH_PROB = 0.05
VESSEL_BRANCH_ANGLE = (0.4, 0.9)  # radians
VESSEL_BRANCH_WIDTH = 0.7  # child width / parent width
VESSEL_TAPER = 0.985  # width factor per step
VESSEL_MIN_WIDTH = 1.0
VESSEL_MAX_STEPS = 45
VEIN_WIDTH = 4.0  # hi-res pixels at 128 px
ARTERY_WIDTH = 3.0
BEADING_PERIOD = 4  # steps between beads
BEADING_GAIN = 1.8  # bead radius / vessel half-width
REFERENCE_CANVAS = 128  # the canvas size the pixel constants above are tuned for


@dataclass(frozen=True)
class ScannerStyle:
    """How one site's fundus camera renders: out = contrast * img + brightness, plus noise."""

    brightness: float = 0.0
    contrast: float = 1.0
    vignetting: float = 0.45  # 0 = flat illumination; 1 = the rim goes black
    noise: float = 0.01  # std of Gaussian sensor noise, in gray levels 0..1


STYLE_RANGES = {
    "brightness": (-0.08, 0.08),
    "contrast": (0.8, 1.2),
    "vignetting": (0.25, 0.7),
    "noise": (0.005, 0.02),
}


def draw_scanner_style(rng: np.random.Generator) -> ScannerStyle:
    """A random site style, uniform within ``STYLE_RANGES``."""
    values = {name: float(rng.uniform(*bounds)) for name, bounds in STYLE_RANGES.items()}
    return ScannerStyle(**values)


@dataclass(frozen=True)
class _Anatomy:
    canvas: int
    centre: float
    radius: float  # fundus radius R, hi-res pixels
    side: int  # +1: disc right of centre (right eye), -1: left eye
    disc: tuple[float, float]
    disc_radius: float
    fovea: tuple[float, float]

    @property
    def scale(self) -> float:
        return self.canvas / REFERENCE_CANVAS


class _Layers:
    """Antialiased 8-bit drawing layers, composited into the gray image at the end."""

    NAMES = ("vein", "artery", "neovessel", "blood", "exudate", "cotton_wool")

    def __init__(self, canvas: int) -> None:
        self.images = {name: Image.new("L", (canvas, canvas), 0) for name in self.NAMES}
        self.draw = {name: ImageDraw.Draw(img) for name, img in self.images.items()}

    def array(self, name: str) -> np.ndarray:
        image = self.images[name]
        if name == "cotton_wool":
            image = image.filter(ImageFilter.GaussianBlur(COTTON_WOOL_BLUR))
        return np.asarray(image, dtype=np.float32) / 255.0


def render_phantom(
    grade: int,
    rng: np.random.Generator,
    *,
    size: int = 32,
    style: ScannerStyle = ScannerStyle(),
) -> np.ndarray:
    """A grayscale fundus phantom of DR ``grade`` (index into ``DR_GRADES``), uint8 [size, size]."""
    assert 0 <= grade < len(DR_GRADES), f"grade {grade} is not in 0..{len(DR_GRADES) - 1}"
    canvas = size * SUPERSAMPLE
    anatomy = _draw_anatomy(rng, canvas)
    layers = _Layers(canvas)
    beaded_veins = grade == 3
    _draw_vessel_tree(layers, anatomy, rng, beaded=beaded_veins)
    _LESION_PAINTERS[grade](_LesionPainter(layers, anatomy, rng))
    image = _composite(layers, anatomy, rng, style)
    small = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE).mean(axis=(1, 3))
    small += rng.normal(0.0, style.noise, small.shape) * _fundus_mask(anatomy, size)
    return np.round(np.clip(small, 0.0, 1.0) * 255).astype(np.uint8)


# --- anatomy --------------------------------------------------------------------------------


def _draw_anatomy(rng: np.random.Generator, canvas: int) -> _Anatomy:
    centre = canvas / 2
    radius = FUNDUS_RADIUS * canvas
    side = 1 if rng.random() < 0.5 else -1
    disc = (
        centre + side * rng.uniform(*DISC_OFFSET) * radius,
        centre + rng.uniform(-DISC_VERTICAL_JITTER, DISC_VERTICAL_JITTER) * radius,
    )
    disc_radius = rng.uniform(*DISC_RADIUS) * radius
    fovea_distance = rng.uniform(*FOVEA_DISTANCE) * disc_radius
    fovea = (disc[0] - side * fovea_distance, disc[1] + 0.3 * disc_radius)
    return _Anatomy(canvas, centre, radius, side, disc, disc_radius, fovea)


def _grid(anatomy: _Anatomy, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of a size x size image, in hi-res pixel units."""
    step = anatomy.canvas / size
    coords = (np.arange(size, dtype=np.float32) + 0.5) * step
    return np.meshgrid(coords, coords)


def _fundus_mask(anatomy: _Anatomy, size: int) -> np.ndarray:
    x, y = _grid(anatomy, size)
    return (np.hypot(x - anatomy.centre, y - anatomy.centre) <= anatomy.radius).astype(np.float32)


def _composite(layers: _Layers, anatomy: _Anatomy, rng: np.random.Generator, style: ScannerStyle) -> np.ndarray:
    """Background, disc and macula, then the drawn layers, then the scanner's response."""
    x, y = _grid(anatomy, anatomy.canvas)
    r = np.hypot(x - anatomy.centre, y - anatomy.centre) / anatomy.radius
    inside = np.clip((1.0 - r) * anatomy.radius, 0.0, 1.0)  # 1 px antialiased rim

    texture = rng.uniform(-1.0, 1.0, (TEXTURE_GRID, TEXTURE_GRID)).astype(np.float32)
    texture = np.asarray(Image.fromarray(texture).resize((anatomy.canvas,) * 2, Image.BICUBIC))
    image = FUNDUS_LEVEL * (1.0 + TEXTURE_AMPLITUDE * texture / FUNDUS_LEVEL)

    d_disc = np.hypot(x - anatomy.disc[0], y - anatomy.disc[1]) / anatomy.disc_radius
    disc = np.clip(1.5 - 1.5 * d_disc**2, 0.0, 1.0)  # flat-topped, soft-edged
    image += DISC_BRIGHTNESS * disc + CUP_BRIGHTNESS * np.exp(-((d_disc / 0.45) ** 2))
    d_fovea = np.hypot(x - anatomy.fovea[0], y - anatomy.fovea[1]) / (1.5 * anatomy.disc_radius)
    image *= 1.0 - MACULA_DARKNESS * np.exp(-(d_fovea**2))

    vessel_contrast = 1.0 - (1.0 - VESSELS_ON_DISC) * disc
    image *= 1.0 - VEIN_DARKNESS * vessel_contrast * layers.array("vein")
    image *= 1.0 - ARTERY_DARKNESS * vessel_contrast * layers.array("artery")
    image *= 1.0 - NEOVESSEL_DARKNESS * layers.array("neovessel")
    image += EXUDATE_BRIGHTNESS * layers.array("exudate")
    image += COTTON_WOOL_BRIGHTNESS * layers.array("cotton_wool")
    image *= 1.0 - BLOOD_DARKNESS * layers.array("blood")  # blood on top: it hides what is beneath

    image *= 1.0 - style.vignetting * r**3
    image = style.contrast * image + style.brightness
    return image * inside


# --- vessels --------------------------------------------------------------------------------

# (initial angle, curvature per step) of the main vessels for a disc right of centre, with
# y pointing down: temporal arcades arch up/down then bend round the macula, nasal ones go out.
_MAIN_VESSELS = (
    (math.pi + 1.1, -0.05),  # superior temporal arcade
    (math.pi - 1.1, 0.05),  # inferior temporal arcade
    (-0.7, 0.0),  # superior nasal
    (0.7, 0.0),  # inferior nasal
    (math.pi, 0.0),  # small macular branch
)


def _draw_vessel_tree(layers: _Layers, anatomy: _Anatomy, rng: np.random.Generator, *, beaded: bool) -> None:
    """A vein and an artery along each main direction, each branching as it grows."""
    for angle, curvature in _MAIN_VESSELS:
        if anatomy.side < 0:  # mirror for a left eye
            angle, curvature = math.pi - angle, -curvature
        for layer, width in (("vein", VEIN_WIDTH), ("artery", ARTERY_WIDTH)):
            jitter = rng.normal(0.0, 0.15)
            _grow_vessel(
                layers.draw[layer],
                anatomy,
                rng,
                start=anatomy.disc,
                angle=angle + jitter,
                curvature=curvature,
                width=width * anatomy.scale,
                beaded=beaded and layer == "vein",
            )


def _grow_vessel(
    draw: ImageDraw.ImageDraw,
    anatomy: _Anatomy,
    rng: np.random.Generator,
    *,
    start: tuple[float, float],
    angle: float,
    curvature: float,
    width: float,
    beaded: bool,
) -> None:
    """Random-walk a vessel from ``start``; it thins as it goes and branches now and then.

    The whole path is drawn from the generator at once (one call per quantity, not per step),
    which keeps a phantom at a few milliseconds.
    """
    steps = np.arange(1, VESSEL_MAX_STEPS + 1)
    angles = angle + np.cumsum(curvature + rng.normal(0.0, VESSEL_WANDER, VESSEL_MAX_STEPS))
    step = VESSEL_STEP * anatomy.scale
    xs = start[0] + np.cumsum(step * np.cos(angles))
    ys = start[1] + np.cumsum(step * np.sin(angles))
    widths = width * VESSEL_TAPER**steps
    branches = rng.random(VESSEL_MAX_STEPS) < VESSEL_BRANCH_PROB
    turns = rng.uniform(*VESSEL_BRANCH_ANGLE, VESSEL_MAX_STEPS)
    turns *= rng.choice([-1.0, 1.0], VESSEL_MAX_STEPS)

    min_width = VESSEL_MIN_WIDTH * anatomy.scale
    outside = np.hypot(xs - anatomy.centre, ys - anatomy.centre) > anatomy.radius
    ends = np.flatnonzero(outside | (widths < min_width))
    length = int(ends[0]) if ends.size else VESSEL_MAX_STEPS
    if length == 0:
        return
    points = [start, *zip(xs[:length].tolist(), ys[:length].tolist())]
    pixel_widths = np.maximum(1, np.round(widths[:length])).astype(int)
    for first, last in _runs(pixel_widths):  # one polyline per run of equal drawn width
        draw.line(points[first : last + 2], fill=255, width=int(pixel_widths[first]), joint="curve")
    if beaded:
        for i in range(BEADING_PERIOD - 1, length, BEADING_PERIOD):
            _dot(draw, points[i + 1], BEADING_GAIN * widths[i] / 2)
    for i in np.flatnonzero(branches[:length]):
        if widths[i] * VESSEL_BRANCH_WIDTH >= min_width:
            _grow_vessel(
                draw,
                anatomy,
                rng,
                start=points[i + 1],
                angle=float(angles[i] + turns[i]),
                curvature=curvature * 0.5,
                width=float(widths[i] * VESSEL_BRANCH_WIDTH),
                beaded=beaded,
            )


def _runs(values: np.ndarray) -> list[tuple[int, int]]:
    """(first, last) index of each run of equal consecutive values."""
    breaks = np.flatnonzero(np.diff(values)) + 1
    firsts = [0, *breaks.tolist()]
    lasts = [*(breaks - 1).tolist(), len(values) - 1]
    return list(zip(firsts, lasts))


# --- lesions --------------------------------------------------------------------------------


class _LesionPainter:
    """Draws lesions of each kind onto the layers of one phantom."""

    def __init__(self, layers: _Layers, anatomy: _Anatomy, rng: np.random.Generator) -> None:
        self.layers, self.anatomy, self.rng = layers, anatomy, rng

    def size(self, bounds: tuple[float, float]) -> float:
        """A random size in hi-res pixels, from bounds given for the reference canvas."""
        return self.rng.uniform(*bounds) * self.anatomy.scale

    def count(self, bounds: tuple[int, int]) -> int:
        return int(self.rng.integers(*bounds))

    def point(self, *, quadrant: int | None = None) -> tuple[float, float]:
        """A point in the lesion field, off the disc; optionally in one quadrant (0..3)."""
        a, rng = self.anatomy, self.rng
        while True:
            radius = a.radius * LESION_FIELD * math.sqrt(rng.random())
            if quadrant is None:
                theta = rng.uniform(0.0, 2 * math.pi)
            else:
                theta = rng.uniform(quadrant * math.pi / 2, (quadrant + 1) * math.pi / 2)
            x, y = a.centre + radius * math.cos(theta), a.centre + radius * math.sin(theta)
            if math.hypot(x - a.disc[0], y - a.disc[1]) > LESION_DISC_CLEARANCE * a.disc_radius:
                return x, y

    def microaneurysms(self, count: int) -> None:
        for _ in range(count):
            _dot(self.layers.draw["blood"], self.point(), self.size(MICROANEURYSM_RADIUS))

    def haemorrhages(self, count: int, *, all_quadrants: bool = False) -> None:
        """Blots and flames; with ``all_quadrants`` they are dealt round the four quadrants."""
        for i in range(count):
            centre = self.point(quadrant=i % 4 if all_quadrants else None)
            if self.rng.random() < FLAME_FRACTION:
                self._flame_haemorrhage(centre)
            else:
                self._blot_haemorrhage(centre)

    def _blot_haemorrhage(self, centre: tuple[float, float]) -> None:
        """An irregular blot: a few overlapping round blobs."""
        base = self.size(BLOT_RADIUS)
        for _ in range(self.count(BLOT_BLOBS)):
            dx, dy = self.rng.normal(0.0, base / 2, 2)
            radius = base * self.rng.uniform(0.6, 1.0)
            _dot(self.layers.draw["blood"], (centre[0] + dx, centre[1] + dy), radius)

    def _flame_haemorrhage(self, centre: tuple[float, float]) -> None:
        """A streak along the nerve fibres, i.e. roughly radial from the disc."""
        disc = self.anatomy.disc
        direction = math.atan2(centre[1] - disc[1], centre[0] - disc[0])
        half = self.size(FLAME_HALF_LENGTH)
        dx, dy = half * math.cos(direction), half * math.sin(direction)
        ends = [(centre[0] - dx, centre[1] - dy), (centre[0] + dx, centre[1] + dy)]
        self.layers.draw["blood"].line(ends, fill=255, width=max(1, round(self.size(FLAME_WIDTH))))

    def hard_exudates(self, count: int) -> None:
        """Bright waxy dots in one or two clusters."""
        clusters = [self.point() for _ in range(self.count(EXUDATE_CLUSTERS))]
        spread = EXUDATE_SPREAD * self.anatomy.disc_radius
        for i in range(count):
            cx, cy = clusters[i % len(clusters)]
            dx, dy = self.rng.normal(0.0, spread, 2)
            _dot(self.layers.draw["exudate"], (cx + dx, cy + dy), self.size(EXUDATE_RADIUS))

    def cotton_wool_spots(self, count: int) -> None:
        for _ in range(count):
            _dot(self.layers.draw["cotton_wool"], self.point(), self.size(COTTON_WOOL_RADIUS))

    def neovascular_tuft(self, centre: tuple[float, float]) -> None:
        """A tangle of fine, tortuous new vessels."""
        rng, step = self.rng, TUFT_STEP * self.anatomy.scale
        spread = TUFT_SPREAD * self.anatomy.disc_radius
        for _ in range(self.count(TUFT_VESSELS)):
            x, y = centre[0] + rng.normal(0.0, spread), centre[1] + rng.normal(0.0, spread)
            angle = rng.uniform(0.0, 2 * math.pi)
            points = [(x, y)]
            for _ in range(self.count(TUFT_SEGMENTS)):
                angle += rng.normal(0.0, TUFT_TORTUOSITY)
                x, y = x + step * math.cos(angle), y + step * math.sin(angle)
                points.append((x, y))
            self.layers.draw["neovessel"].line(points, fill=255, width=1, joint="curve")

    def preretinal_haemorrhage(self) -> None:
        """Boat-shaped, below the disc: blood settles, so the top edge is a flat fluid level."""
        a = self.anatomy
        radius = self.size(PRERETINAL_RADIUS)
        cx = a.disc[0] - a.side * self.rng.uniform(0.0, 3.0) * a.disc_radius
        cy = a.disc[1] + self.rng.uniform(1.5, 3.0) * a.disc_radius
        lower_half = [
            (cx + radius * math.cos(t), cy + radius * 0.8 * math.sin(t)) for t in np.linspace(0.0, math.pi, 24)
        ]
        self.layers.draw["blood"].polygon(lower_half, fill=255)  # closed by the flat top


def _dot(draw: ImageDraw.ImageDraw, centre: tuple[float, float], radius: float) -> None:
    x, y = centre
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=255)


# What each grade shows; counts are [low, high) ranges.


def _no_dr(paint: _LesionPainter) -> None:
    """A healthy fundus has no lesions."""


def _mild(paint: _LesionPainter) -> None:
    paint.microaneurysms(paint.count((6, 13)))


def _moderate(paint: _LesionPainter) -> None:
    paint.microaneurysms(paint.count((6, 13)))
    paint.haemorrhages(paint.count((3, 7)))
    paint.hard_exudates(paint.count((5, 13)))


def _severe(paint: _LesionPainter) -> None:
    """The 4-2-1 picture: haemorrhages in all quadrants, beaded veins (drawn with the vessels)."""
    paint.microaneurysms(paint.count((8, 16)))
    paint.haemorrhages(paint.count((20, 31)), all_quadrants=True)
    paint.cotton_wool_spots(paint.count((2, 5)))


def _proliferative(paint: _LesionPainter) -> None:
    paint.microaneurysms(paint.count((6, 13)))
    paint.haemorrhages(paint.count((6, 13)))
    paint.neovascular_tuft(paint.anatomy.disc)
    if paint.rng.random() < 0.5:  # new vessels elsewhere too
        paint.neovascular_tuft(paint.point())
    paint.preretinal_haemorrhage()


_LESION_PAINTERS = (_no_dr, _mild, _moderate, _severe, _proliferative)
assert len(_LESION_PAINTERS) == len(DR_GRADES)
