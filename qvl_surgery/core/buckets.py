"""Aspect-ratio buckets: one static image-in encoder per image size, in one folder whose graphs all
reference one data file, each weight stored once (NPUs take static graphs, so a deployment keeps a
few sizes and sends each photo to the closest).

``DIR/buckets.json`` lists the sizes, their files and the host rule; ``DIR/HxW.onnx`` are the
graphs; ``DIR/weights.data`` holds every distinct tensor once (deduplicated by content, so five
sizes of the 3b cost one 2.7 GB data file plus their small per-size tables). The host rule
(:func:`choose_bucket`): the size whose aspect ratio is closest to the photo's (in log ratio), the
larger one on a tie; the photo is then resized to it (:func:`qvl_surgery.core.imagein.resize_image`).

A bucket folder is a value like a model or a split: every model-to-model pass runs on each size
and writes a bucket folder again, the weights still shared (:class:`qvl_surgery.core.passbase.Pass`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.imagein import MAX_PIXELS, smart_resize
from qvl_surgery.core.modelfile import Model, check_model_path, load_model, write_shared

BUCKETS = "buckets.json"
DATA = "weights.data"
RULE = ("the size whose aspect ratio (width / height) is closest to the photo's in log ratio, the larger "
        "on a tie; resize the photo to it (PIL bicubic on uint8)")


@dataclass
class Buckets:
    """One encoder at several image sizes: ``models`` by ``"HxW"``, in the order written."""

    models: dict[str, Model]
    max_pixels: int | None = None

    @property
    def sizes(self) -> list[tuple[int, int]]:
        return [parse_key(k) for k in self.models]


def size_key(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


def parse_key(key: str) -> tuple[int, int]:
    h, _, w = key.partition("x")
    return int(h), int(w)


def is_bucket_dir(path: str | Path) -> bool:
    path = Path(path)
    return path.is_dir() and (path / BUCKETS).is_file() or path.name == BUCKETS and path.is_file()


def bucket_sizes(count: int, max_pixels: int, *, factor: int = 28, widest: float = 2.0) -> list[tuple[int, int]]:
    """``count`` sizes for a pixel budget: aspect ratios spread evenly in log ratio from 1:``widest``
    (portrait) to ``widest``:1 (landscape), square in the middle when ``count`` is odd; each made by
    the processor's own rule (:func:`smart_resize`), so its sides are multiples of ``factor``."""
    if count < 1:
        raise BadInput("{buckets}: at least 1 size", buckets=count)
    if max_pixels < factor * factor:
        raise BadInput("{max_pixels}: " + f"at least {factor * factor} pixels", max_pixels=max_pixels)
    out: list[tuple[int, int]] = []
    for k in range(count):
        ratio = widest ** ((2 * k / (count - 1) - 1) if count > 1 else 0.0)   # width / height
        h, w = math.sqrt(max_pixels / ratio), math.sqrt(max_pixels * ratio)
        size = smart_resize(max(factor, round(h)), max(factor, round(w)), factor=factor, max_pixels=max_pixels)
        if size not in out:
            out.append(size)
    return out


def choose_bucket(height: int, width: int, sizes: Iterable[tuple[int, int]]) -> tuple[int, int]:
    """The host rule (:data:`RULE`): the bucket a ``height`` x ``width`` photo goes to."""
    sizes = list(sizes)
    if not sizes:
        raise BadInput("no bucket sizes")
    want = math.log(width / height)
    return min(sizes, key=lambda s: (round(abs(math.log(s[1] / s[0]) - want), 9), -s[0] * s[1]))


def load_buckets(path: str | Path) -> Buckets:
    """A bucket folder (or its buckets.json) as a value; the weights stay on disk."""
    path = Path(path)
    folder = path.parent if path.name == BUCKETS else path
    try:
        doc = json.loads((folder / BUCKETS).read_text())
        files = {k: folder / v for k, v in doc["files"].items()}
    except (OSError, ValueError, KeyError, AttributeError) as e:
        raise BadInput(f"{folder / BUCKETS}: not a bucket manifest ({type(e).__name__}); write the folder with "
                       "qvl-surgery export --input image --image-size S1,S2,...") from None
    return Buckets({k: load_model(p) for k, p in files.items()}, doc.get("max_pixels"))


def write_buckets(value: Buckets, folder: Path, *, progress: bool = False) -> list[str]:
    """Write the graphs, the one data file and buckets.json into ``folder`` (an empty staging folder:
    :func:`qvl_surgery.core.values.write_value` publishes it); every graph is checked by path."""
    names = [f"{k}.onnx" for k in value.models]
    size = write_shared(list(value.models.values()), folder, names, DATA, progress="buckets" if progress else None)
    for name in names:
        check_model_path(folder / name)
    doc = {"sizes": [list(s) for s in value.sizes], "files": dict(zip(value.models, names)), "data": DATA,
           "max_pixels": value.max_pixels or MAX_PIXELS, "rule": RULE}
    (folder / BUCKETS).write_text(json.dumps(doc, indent=1) + "\n")
    return [f"wrote {len(names)} sizes ({', '.join(value.models)}) sharing {DATA} ({size / 1e9:.3f} GB)"]


def build_buckets(weights, sizes: list[tuple[int, int]], image_input: str, max_pixels: int | None = None) -> Buckets:
    """The image-in encoder at each size (weightless: the weights are computed as they are written,
    each distinct one once)."""
    from qvl_surgery.core.export import build_encoder
    if len(set(sizes)) != len(sizes):
        raise BadInput("{image_size}: a size is given twice", image_size=",".join(map(size_key, sizes)))
    return Buckets({size_key(s): build_encoder(weights.cfg, weights, s, image_input=image_input) for s in sizes},
                   max_pixels)
