"""Scenes of the generated world: the vocabulary, the scene graph dataclasses and the renderer.

A scene holds 2-6 objects. Each object has one of ``SHAPES`` (7), one of ``COLORS`` (8), a size (small/large) and a
rotation, and is drawn over a textured, noisy background. Objects overlap little (circumscribed circles keep apart and
box IoU <= ``MAX_BOX_IOU``). Boxes are tight around the drawn pixels: they come from each object's rendered mask.

Every image has its own random stream (``image_rng(seed, split, index)``), so an image depends only on the seed, its
split and its position. ``vl/world/dataset.py`` writes scenes out in the standard dataset formats.
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vl.errors import UserError

SPLITS: tuple[str, ...] = ("train", "val", "test")
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "hexagon", "diamond")
# Well-separated hues and a white; the background stays dark-to-mid grey so each of them stands out.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 35, 35),
    "green": (35, 175, 60),
    "blue": (40, 85, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 55, 195),
    "orange": (250, 140, 25),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
}
SIZES: tuple[str, ...] = ("small", "large")
MIN_OBJECTS, MAX_OBJECTS = 2, 6
MAX_BOX_IOU = 0.1  # layout rule: no two objects' boxes overlap more than this
# Circumradius as a fraction of the image side, per size class; small and large never meet.
RADIUS_RANGE = {"small": (0.055, 0.075), "large": (0.11, 0.145)}
MIN_RADIUS_PX = {"small": 6.0, "large": 11.0}
# Largest rotation (degrees) drawn per shape; square and diamond stay far from each other's look.
MAX_ROTATION = {"circle": 0.0, "square": 30.0, "triangle": 180.0, "star": 180.0, "cross": 30.0, "hexagon": 30.0,
                "diamond": 25.0}
COLOR_JITTER = 12  # per-channel jitter of an object's colour
MIN_SIZE_PX, MAX_SIZE_PX = 64, 1024
GENERATOR_VERSION = 1
_SUPERSAMPLE = 2  # masks are drawn at 2x and box-filtered down: anti-aliased edges


@dataclass(frozen=True)
class SceneObject:
    """One drawn object. ``center`` and ``radius`` (circumradius) are in pixels; ``bbox`` is COCO ``[x, y, w, h]``,
    tight around the object's rendered mask; ``area`` is the mask's area in pixels; ``polygon`` is the outline
    ``[x1, y1, x2, y2, ...]`` (COCO segmentation); ``rgb`` is the jittered fill colour."""

    shape: str
    color: str
    size: str
    center: tuple[float, float]
    radius: float
    rotation: float
    bbox: tuple[float, float, float, float]
    area: float
    polygon: tuple[float, ...]
    rgb: tuple[int, int, int]

    def to_dict(self) -> dict[str, Any]:
        return {"shape": self.shape, "color": self.color, "size": self.size,
                "center": [round(self.center[0], 2), round(self.center[1], 2)], "radius": round(self.radius, 2),
                "rotation": round(self.rotation, 2), "bbox": list(self.bbox), "area": self.area,
                "polygon": list(self.polygon), "rgb": list(self.rgb)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SceneObject:
        return cls(shape=data["shape"], color=data["color"], size=data["size"], center=tuple(data["center"]),
                   radius=float(data["radius"]), rotation=float(data["rotation"]), bbox=tuple(data["bbox"]),
                   area=float(data["area"]), polygon=tuple(data["polygon"]), rgb=tuple(data["rgb"]))


@dataclass(frozen=True)
class Scene:
    """A generated image's ground truth: its id, split, file name, size in pixels and objects in drawing order."""

    image_id: int
    split: str
    file_name: str
    width: int
    height: int
    objects: tuple[SceneObject, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"image_id": self.image_id, "split": self.split, "image_filename": self.file_name,
                "width": self.width, "height": self.height, "objects": [obj.to_dict() for obj in self.objects]}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        return cls(image_id=int(data["image_id"]), split=data["split"], file_name=data["image_filename"],
                   width=int(data["width"]), height=int(data["height"]),
                   objects=tuple(SceneObject.from_dict(obj) for obj in data["objects"]))


def image_file_name(split: str, image_id: int) -> str:
    """COCO's naming: ``COCO_val2014_000000000042.jpg`` for image 42 of the val split."""
    return f"COCO_{split}2014_{image_id:012d}.jpg"



def load_scenes(path: str | os.PathLike) -> list[Scene]:
    """Read a ``scenes_{split}2014.json`` file written by ``generate_world``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"scenes file not found: {path}")
    try:
        data = json.loads(path.read_text())
        return [Scene.from_dict(item) for item in data["scenes"]]
    except (ValueError, KeyError, TypeError) as err:
        raise UserError(f"{path}: not a scenes file ({type(err).__name__}: {err})") from None



# ----------------------------------------------------------------------------------------------------------------
# Geometry and rendering


def shape_outline(shape: str, center: tuple[float, float], radius: float, rotation: float) -> list[tuple[float, float]]:
    """The outline of ``shape`` as polygon vertices in pixels (a circle as a 24-gon), every vertex within ``radius``
    of ``center``, rotated by ``rotation`` degrees (clockwise on screen, y pointing down)."""
    cx, cy = center
    if shape == "circle":
        unit = [(math.cos(2 * math.pi * k / 24), math.sin(2 * math.pi * k / 24)) for k in range(24)]
        unit = [(0.9 * x, 0.9 * y) for x, y in unit]
    elif shape == "square":
        half = 0.7
        unit = [(-half, -half), (half, -half), (half, half), (-half, half)]
    elif shape == "triangle":
        unit = [(math.cos(math.radians(a)), math.sin(math.radians(a))) for a in (-90, 30, 150)]
        unit = [(x, y + 0.2) for x, y in unit]  # centre the box: the triangle spans y in [-0.8, 0.7]
    elif shape == "star":
        unit = []
        for k in range(10):
            angle = math.radians(-90 + 36 * k)
            scale = 1.0 if k % 2 == 0 else 0.45
            unit.append((scale * math.cos(angle), scale * math.sin(angle)))
    elif shape == "cross":
        arm, length = 0.3, 0.95
        unit = [(-arm, -length), (arm, -length), (arm, -arm), (length, -arm), (length, arm), (arm, arm),
                (arm, length), (-arm, length), (-arm, arm), (-length, arm), (-length, -arm), (-arm, -arm)]
    elif shape == "hexagon":
        unit = [(0.95 * math.cos(math.radians(60 * k)), 0.95 * math.sin(math.radians(60 * k))) for k in range(6)]
    elif shape == "diamond":
        unit = [(0.0, -1.0), (0.58, 0.0), (0.0, 1.0), (-0.58, 0.0)]
    else:
        raise UserError(f"unknown shape {shape!r} (expected one of {', '.join(SHAPES)})")
    cos_r, sin_r = math.cos(math.radians(rotation)), math.sin(math.radians(rotation))
    return [(cx + radius * (x * cos_r - y * sin_r), cy + radius * (x * sin_r + y * cos_r)) for x, y in unit]


def object_mask(
    shape: str, center: tuple[float, float], radius: float, rotation: float
) -> tuple[Image.Image, int, int]:
    """Render one object's anti-aliased coverage mask. Returns ``(mask, x0, y0)``: an ``L`` image whose pixel
    ``(i, j)`` covers image pixel ``(x0 + i, y0 + j)``, values 0 (outside) .. 255 (fully covered)."""
    x0 = int(math.floor(center[0] - radius)) - 2
    y0 = int(math.floor(center[1] - radius)) - 2
    side = int(math.ceil(2 * radius)) + 5
    ss = _SUPERSAMPLE
    canvas = Image.new("L", (side * ss, side * ss), 0)
    # Pixel (i, j) spans [i, i+1); its centre is i + 0.5. Vertices are scaled into the supersampled canvas.
    outline = [((x - x0) * ss, (y - y0) * ss) for x, y in shape_outline(shape, center, radius, rotation)]
    ImageDraw.Draw(canvas).polygon(outline, fill=255)
    return canvas.reduce(ss), x0, y0


def _mask_box_and_area(mask: Image.Image, x0: int, y0: int) -> tuple[tuple[float, float, float, float], float]:
    left, top, right, bottom = mask.getbbox()
    histogram = mask.histogram()
    area = sum(level * count for level, count in enumerate(histogram)) / 255.0
    return (float(x0 + left), float(y0 + top), float(right - left), float(bottom - top)), round(area, 2)


def _box_iou(a: tuple[float, float, float, float], b: tuple[float, float, float, float]) -> float:
    """IoU of two ``(x1, y1, x2, y2)`` boxes."""
    iw = min(a[2], b[2]) - max(a[0], b[0])
    ih = min(a[3], b[3]) - max(a[1], b[1])
    if iw <= 0 or ih <= 0:
        return 0.0
    inter = iw * ih
    return inter / ((a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter)


def _outline_box(outline: Sequence[tuple[float, float]]) -> tuple[float, float, float, float]:
    xs = [x for x, _ in outline]
    ys = [y for _, y in outline]
    return min(xs), min(ys), max(xs), max(ys)


@dataclass
class _Placed:
    shape: str
    color: str
    size: str
    center: tuple[float, float]
    radius: float
    rotation: float
    rgb: tuple[int, int, int]
    outline_box: tuple[float, float, float, float] = field(default=(0.0, 0.0, 0.0, 0.0))


def _sample_layout(rng: np.random.Generator, side: int) -> list[_Placed]:
    """Draw 2-6 objects and place them without heavy overlap; an object that finds no room after 40 tries is made
    small, and dropped if it still finds none (the first two always fit)."""
    num_objects = int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
    # Half the scenes draw from a small palette, so repeated shapes and colours (counting questions) are common.
    shape_pool = list(SHAPES) if rng.random() < 0.5 else list(rng.choice(SHAPES, size=int(rng.integers(2, 4)),
                                                                          replace=False))
    color_names = list(COLORS)
    color_pool = color_names if rng.random() < 0.5 else list(rng.choice(color_names, size=int(rng.integers(2, 4)),
                                                                        replace=False))
    placed: list[_Placed] = []
    for _ in range(num_objects):
        shape = str(shape_pool[int(rng.integers(len(shape_pool)))])
        color = str(color_pool[int(rng.integers(len(color_pool)))])
        size = SIZES[int(rng.integers(2))]
        max_rot = MAX_ROTATION[shape]
        rotation = float(rng.uniform(-max_rot, max_rot)) if max_rot else 0.0
        base = np.array(COLORS[color], dtype=np.int64)
        rgb = tuple(int(v) for v in np.clip(base + rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, 3), 0, 255))
        for size_try in ((size, "small") if size == "large" else (size,)):
            low, high = RADIUS_RANGE[size_try]
            found = None
            for _attempt in range(40):
                radius = max(MIN_RADIUS_PX[size_try], float(rng.uniform(low, high)) * side)
                margin = radius + 3.0
                center = (float(rng.uniform(margin, side - margin)), float(rng.uniform(margin, side - margin)))
                box = _outline_box(shape_outline(shape, center, radius, rotation))
                if all(math.dist(center, other.center) >= 0.9 * (radius + other.radius)
                       and _box_iou(box, other.outline_box) <= MAX_BOX_IOU for other in placed):
                    found = _Placed(shape, color, size_try, center, radius, rotation, rgb, box)
                    break
            if found is not None:
                placed.append(found)
                break
    return placed


def _background(rng: np.random.Generator, side: int) -> Image.Image:
    """A dark-to-mid grey, slightly tinted, low-frequency textured background with faint clutter lines."""
    level = int(rng.integers(45, 125))
    tint = rng.integers(-18, 19, 3)
    grid = int(rng.integers(3, 7))
    blobs = rng.integers(-40, 41, (grid, grid, 3)) + 128
    texture = Image.fromarray(blobs.astype(np.uint8), "RGB").resize((side, side), Image.Resampling.BILINEAR)
    base = np.asarray(texture, dtype=np.int16) - 128 + level + tint.astype(np.int16)
    image = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(0, 4))):
        points = [tuple(float(v) for v in rng.uniform(0, side, 2)) for _ in range(2)]
        shade = int(np.clip(level + rng.integers(-35, 36), 0, 255))
        draw.line(points, fill=(shade, shade, shade), width=int(rng.integers(1, 3)))
    return image


def _draw_objects(image: Image.Image, placed: Sequence[_Placed]) -> list[SceneObject]:
    objects = []
    for obj in placed:
        mask, x0, y0 = object_mask(obj.shape, obj.center, obj.radius, obj.rotation)
        image.paste(obj.rgb, (x0, y0, x0 + mask.width, y0 + mask.height), mask)
        bbox, area = _mask_box_and_area(mask, x0, y0)
        outline = shape_outline(obj.shape, obj.center, obj.radius, obj.rotation)
        polygon = tuple(round(v, 2) for point in outline for v in point)
        objects.append(SceneObject(obj.shape, obj.color, obj.size, obj.center, obj.radius, obj.rotation, bbox, area,
                                   polygon, obj.rgb))
    return objects


def render_scene(rng: np.random.Generator, image_id: int, split: str, side: int) -> tuple[Scene, Image.Image]:
    """Sample and draw one scene. Returns the scene (ground truth) and its ``side x side`` RGB image."""
    placed = _sample_layout(rng, side)
    image = _background(rng, side)
    objects = _draw_objects(image, placed)
    amplitude = int(rng.integers(6, 19))
    noise = rng.integers(-amplitude, amplitude + 1, (side, side, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(image, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    scene = Scene(image_id, split, image_file_name(split, image_id), side, side, tuple(objects))
    return scene, Image.fromarray(pixels, "RGB")


def render_clean(scene: Scene, background: tuple[int, int, int] = (0, 0, 0)) -> Image.Image:
    """Redraw a scene's objects on a flat background without texture or noise (for checks and figures)."""
    image = Image.new("RGB", (scene.width, scene.height), background)
    for obj in scene.objects:
        mask, x0, y0 = object_mask(obj.shape, obj.center, obj.radius, obj.rotation)
        image.paste(obj.rgb, (x0, y0, x0 + mask.width, y0 + mask.height), mask)
    return image


def image_rng(seed: int, split: str, index: int, stream: int = 0) -> np.random.Generator:
    """The random stream of image ``index`` of ``split``: stream 0 draws the scene, stream 1 its language, stream 2
    its referring expressions."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index, stream]))


def encode_jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()



def iter_scenes(seed: int, split: str, image_ids: Sequence[int], side: int) -> Iterator[tuple[Scene, bytes]]:
    """Yield ``(scene, jpeg_bytes)`` for each image of a split, in order."""
    for index, image_id in enumerate(image_ids):
        scene, image = render_scene(image_rng(seed, split, index), image_id, split, side)
        yield scene, encode_jpeg(image)


def measure_speed(num_images: int = 200, side: int = 224, seed: int = 0) -> dict[str, float]:
    """Time scene sampling + drawing + JPEG encoding in this process (one core). Returns images per second of wall
    time and per second of this process's CPU time (the latter does not depend on other load on the machine)."""
    start, cpu_start = time.perf_counter(), time.process_time()
    total_bytes = 0
    for index in range(num_images):
        _, image = render_scene(image_rng(seed, "train", index), index + 1, "train", side)
        total_bytes += len(encode_jpeg(image))
    elapsed, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return {"images": num_images, "size": side, "seconds": round(elapsed, 3),
            "images_per_s": round(num_images / elapsed, 1), "images_per_cpu_s": round(num_images / max(cpu, 1e-9), 1),
            "mean_jpeg_kb": round(total_bytes / num_images / 1024, 1)}
