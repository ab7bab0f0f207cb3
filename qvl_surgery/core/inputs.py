"""What to feed a model: the inputs of a static export (one image of the export size), of a
dynamic export (``pixel_values`` + ``image_grid_thw``: several images of any size, video frames),
or of its host-inputs kind (``pixel_values`` + the grid tensors computed on the host), or of an
image-in export (``image``: the resized photo itself, uint8 NHWC or float NCHW).

Sources, for any kind: an ``.npz`` holding the model's inputs by name (a dynamic one: at least
``pixel_values`` and ``image_grid_thw``), image files run through transformers'
``Qwen2VLImageProcessor``, video frames (a dynamic model only), or random pixels with a fixed
seed (``image_sizes`` for a dynamic model, one image per size; uniform uint8 pixels for an
image-in one). Feeds for a dynamic model are
checked (:func:`check_feeds`): a grid that does not match the pixel rows, odd sides, zero or
negative entries are refused in one line, before onnxruntime sees them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvl_surgery.core.config import VisionConfig, check_image_size, parse_image_size
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.imagein import IMAGE_NAME, image_feed, layout_of
from qvl_surgery.core.manifest import is_manifest_path
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.signature import Signature, head_model, signature

GRID = "image_grid_thw"
PIXELS = "pixel_values"


@dataclass
class ModelKind:
    """What a model (or a split's first part) takes, from its metadata."""

    dynamic: str | None            # None (static), "self" or "host"
    cfg: VisionConfig | None
    image_size: tuple[int, int] | None
    signature: Signature
    image_input: str | None = None  # an image-in export's layout ("nhwc", "nchw"); None: pixel_values

    @property
    def inputs(self):
        return self.signature.inputs

    @classmethod
    def of(cls, source: "str | Path | Model") -> "ModelKind":
        """From a model file, a split (its folder or manifest), or a loaded Model."""
        if isinstance(source, Model):
            model, sig = source, signature(source)
        else:
            p = Path(source)
            # a split's inputs come from its manifest, its metadata from part 0; a model's both from its graph
            model = head_model(p)
            sig = signature(p) if is_manifest_path(p) else signature(model)
        meta = model.metadata()
        cfg = None
        if "qvl_surgery.vision_config" in meta:
            cfg = VisionConfig.from_dict(json.loads(meta["qvl_surgery.vision_config"]))
        size = meta.get("qvl_surgery.image_size")
        return cls(meta.get("qvl_surgery.dynamic"), cfg,
                   tuple(int(x) for x in size.split("x")) if size else None, sig, layout_of(meta))


def _processor(kind: ModelKind, fixed: tuple[int, int] | None):
    from transformers import Qwen2VLImageProcessor
    cfg = kind.cfg
    kw = {} if cfg is None else {"patch_size": cfg.patch_size, "temporal_patch_size": cfg.temporal_patch_size,
                                 "merge_size": cfg.spatial_merge_size}
    if fixed is not None:
        kw.update(min_pixels=fixed[0] * fixed[1], max_pixels=fixed[0] * fixed[1])
    return Qwen2VLImageProcessor(**kw)


MIN_IMAGE_SIDE = 28   # the processor's smallest grid: one merged token (2x2 patches of 14 px)


def _open_image(path: str, size: tuple[int, int] | None = None):
    from PIL import Image
    if Path(path).is_dir():
        raise BadInput(f"{path}: is a folder; give image files (comma separated)")
    try:
        img = Image.open(path).convert("RGB")
    except FileNotFoundError:
        raise BadInput(f"{path}: no such image file") from None
    except Exception as e:
        raise BadInput(f"{path}: not a readable image ({type(e).__name__})") from None
    if size:
        return img.resize((size[1], size[0]), Image.BICUBIC)
    if min(img.size) < MIN_IMAGE_SIDE:
        raise BadInput(f"{path}: {img.size[0]}x{img.size[1]} pixels; both sides must be at least {MIN_IMAGE_SIDE} "
                       "(the processor's smallest grid): give a larger image")
    return img


def _static_feed(kind: ModelKind, picture) -> dict[str, np.ndarray]:
    """A static export's input from one picture (a PIL image or uint8 ``[H, W, 3]`` of the export
    size): the image itself for an image-in export, else the processor's ``pixel_values``."""
    if kind.image_input:
        return {IMAGE_NAME: image_feed(np.asarray(picture, np.uint8), kind.image_input)}
    if isinstance(picture, np.ndarray):
        from PIL import Image
        picture = Image.fromarray(picture)
    px = _processor(kind, kind.image_size)(images=[picture], return_tensors="np")["pixel_values"]
    return {PIXELS: px.astype(np.float32)}


def image_feeds(kind: ModelKind, images: list[str], video: list[str] | None = None) -> dict[str, np.ndarray]:
    """Images (and video frames) through transformers' processor. A static model: one image,
    resized to the export size. A dynamic model: each image at its own size (the processor's
    smart_resize), then the video's frames (two per temporal patch), in one call."""
    if kind.dynamic is None:
        if video:
            raise BadInput("{video}: a static export takes one image; export with --dynamic for video",
                           video=",".join(video))
        if kind.image_size is None:
            raise BadInput(f"{images[0]}: the model has no qvl_surgery.image_size metadata; pass an .npz with "
                           "{inputs} instead of {image}", inputs="FILE.npz", image=images[0])
        if len(images) != 1:
            raise BadInput("{image}: a static export takes one image; export with --dynamic for several",
                           image=",".join(images))
        return _static_feed(kind, _open_image(images[0], kind.image_size))
    proc = _processor(kind, None)
    pixels, grids = [], []
    if images:
        out = proc(images=[_open_image(p) for p in images], return_tensors="np")
        pixels.append(out["pixel_values"])
        grids.append(out["image_grid_thw"])
    if video:
        out = proc(images=None, videos=[[_open_image(p) for p in video]], return_tensors="np")
        pixels.append(out["pixel_values_videos"])
        grids.append(out["video_grid_thw"])
    return dynamic_feeds(kind, np.concatenate(pixels).astype(np.float32), np.concatenate(grids).astype(np.int64))


def random_feeds(kind: ModelKind, *, seed: int = 0, image_sizes: list[tuple[int, int]] | None = None
                 ) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    if kind.image_input and kind.image_size:
        return {IMAGE_NAME: image_feed(rng.integers(0, 256, (*kind.image_size, 3), dtype=np.uint8), kind.image_input)}
    if kind.dynamic is None:
        return {t.name: rng.standard_normal([d if isinstance(d, int) else 1 for d in t.shape]).astype(
                    np.float32 if np.dtype(t.dtype).kind in "iub" else t.dtype) for t in kind.inputs}
    cfg = kind.cfg
    sizes = image_sizes or [(448, 448)]
    grid = np.array([[1, h // cfg.patch_size, w // cfg.patch_size]
                     for h, w in (check_image_size(cfg, s) for s in sizes)], np.int64)
    px = rng.standard_normal((int(np.prod(grid, axis=1).sum()), cfg.patch_dim)).astype(np.float32)
    return dynamic_feeds(kind, px, grid)


def dynamic_feeds(kind: ModelKind, pixel_values: np.ndarray, grid_thw: np.ndarray) -> dict[str, np.ndarray]:
    """``pixel_values`` + ``image_grid_thw`` checked; for the host kind, the grid tensors instead of the grid."""
    from qvl_surgery.core.dynamic import check_grid
    grid = check_grid(kind.cfg, len(pixel_values), grid_thw)
    if kind.dynamic == "host":
        from qvl_surgery.core.hostinputs import host_inputs
        return {PIXELS: pixel_values, **host_inputs(kind.cfg, grid, len(pixel_values))}
    return {PIXELS: pixel_values, GRID: grid}


def check_feeds(kind: ModelKind, feeds: dict[str, np.ndarray]) -> None:
    """Refuse, in one line, feeds a model would misread or fail on (onnxruntime would fail with a long
    shape error, or return wrong numbers without one): a missing input, a rank or fixed dimension the
    graph does not take, an integer array where it takes floats (or the reverse), a value that is not
    finite, a dynamic export's grid that does not describe its pixel rows."""
    kind.signature.check_feeds(feeds, where=None)
    for t in kind.inputs:
        a = np.asarray(feeds[t.name])
        want_int = np.dtype(t.dtype).kind in "iub"
        got_int = a.dtype.kind in "iub"
        if want_int != got_int or a.dtype.kind not in "iubf" and a.dtype.name != "bfloat16":
            raise BadInput(f"{t.name!r} has dtype {a.dtype}, the model takes {np.dtype(t.dtype).name}")
        finite = None if got_int else np.isfinite(a.astype(np.float32, copy=False))
        if finite is not None and not finite.all():
            bad = int(finite.size - np.count_nonzero(finite))
            raise BadInput(f"{t.name!r} holds {bad} values that are NaN or infinite; give finite inputs")
    if kind.dynamic == "self" and PIXELS in feeds and GRID in feeds:
        from qvl_surgery.core.dynamic import check_grid
        check_grid(kind.cfg, len(feeds[PIXELS]), feeds[GRID])


def parse_sizes(text: str) -> list[tuple[int, int]]:
    return [parse_image_size(s) for s in text.split(",") if s.strip()]


def load_inputs(ref_path: str | Path, *, inputs: str | None = None, image: str | None = None,
                video: str | None = None, image_size: str | None = None, seed: int = 0,
                also_for: str | Path | None = None) -> dict[str, np.ndarray]:
    """One set of feeds for ``ref_path`` (a model or a split): an .npz (``inputs``), images (comma
    separated) and/or video frames (comma separated), random pixels at ``image_size``
    ("HxW[,HxW...]", dynamic models), or random pixels of the static export's size. Checked as every
    input set is (:func:`check_feeds`); a refusal names the option it came from.

    ``also_for``: a second model to feed the same picture to (compare). Where it takes another input
    form (an image-in export beside a ``pixel_values`` one of the same size), the feeds hold both
    forms of one image: the image file given, or one random uint8 image."""
    kind = ModelKind.of(ref_path)
    if also_for is not None and not inputs and not video:
        other = ModelKind.of(also_for)
        if other.signature.input_names != kind.signature.input_names and (kind.image_input or other.image_input):
            return _one_picture_for_both(kind, other, image, seed)
    if inputs:
        if image or video:
            raise BadInput("{inputs}: give an .npz or images, not both", inputs=inputs)
        source = InputSource.parse(inputs, "inputs", random_ok=False)
        if len(source.files) != 1 or not source.files[0].endswith(".npz"):
            raise BadInput("{inputs}: give one .npz file of the model's inputs (images go to {image})",
                           inputs=inputs, image="FILES")
        return source.sets(ref_path)[0]
    if image or video:
        option, text = ("image", image) if image else ("video", video)
        try:
            feeds = image_feeds(kind, [s for s in (image or "").split(",") if s],
                                [s for s in (video or "").split(",") if s])
            check_feeds(kind, feeds)
        except BadInput as e:
            raise _flagged(e, option, text) from None
        return feeds
    if image_size and kind.dynamic is None:
        raise BadInput("{image_size}: a static export has one size; it applies to dynamic exports",
                       image_size=image_size)
    feeds = random_feeds(kind, seed=seed, image_sizes=parse_sizes(image_size) if image_size else None)
    check_feeds(kind, feeds)
    return feeds


def _one_picture_for_both(a: ModelKind, b: ModelKind, image: str | None, seed: int) -> dict[str, np.ndarray]:
    """The feeds of two static models of one size, one taking the image and one ``pixel_values``,
    made from one picture (the processor makes the other's ``pixel_values`` from the same uint8 image)."""
    if a.dynamic or b.dynamic or a.image_size != b.image_size:
        raise BadInput(f"an image-in export compares with a static pixel_values export of its size "
                       f"({a.image_size} vs {b.image_size}{', dynamic' if a.dynamic or b.dynamic else ''})")
    option, text = ("image", image) if image else ("inputs", "random")
    try:
        if image:
            if "," in image:
                raise BadInput("{image}: a static export takes one image", image=image)
            picture = np.asarray(_open_image(image, a.image_size), np.uint8)
        else:
            picture = np.random.default_rng(seed).integers(0, 256, (*a.image_size, 3), dtype=np.uint8)
        feeds = {}
        for kind in (a, b):
            feeds.update(_static_feed(kind, picture))
            check_feeds(kind, feeds)
    except BadInput as e:
        raise _flagged(e, option, text) from None
    return feeds


# ------------------------------------------------------------------------------ the one input source

RANDOM = "random"


def _flagged(e: BadInput, option: str, text: str, prefix: str = "") -> BadInput:
    """``e`` as the user's option's error: ``--calibrate a.npz: ...`` (the option's flag from the CLI)."""
    return BadInput("{" + option + "}: " + prefix + e.template, **{**e.params, option: text})


@dataclass(frozen=True)
class InputSource:
    """Where input sets come from, as the user wrote it: ``random[:N]`` (N sets of normal pixels,
    fixed seeds 0..N-1), or comma-separated files, each ``.npz`` one set of the model's inputs by
    name and each image one set through transformers' processor. ``option`` is the library parameter
    the user gave it as (``calibrate``, ``inputs``, ``dataset``): every refusal names it, and the CLI
    renders its flag. :meth:`parse` checks the form before any work; :meth:`sets` builds the sets
    and checks each against the model (:func:`check_feeds`)."""

    text: str
    option: str
    count: int = 0                  # random:N
    files: tuple[str, ...] = ()

    @property
    def random(self) -> bool:
        return not self.files

    @classmethod
    def parse(cls, text: str, option: str = "calibrate", *, random_ok: bool = True,
              default_count: int = 8) -> "InputSource":
        text = str(text)
        head, _, tail = text.partition(":")
        if head.strip() == RANDOM:
            if not random_ok:
                raise BadInput("{" + option + "}: random inputs are not taken here (this measures real "
                               "magnitudes): give .npz or image file(s), comma separated", **{option: text})
            count = default_count
            if tail.strip() or text.endswith(":"):
                try:
                    count = int(tail)
                except ValueError:
                    raise BadInput("{" + option + "}: write random or random:N with N a whole number",
                                   **{option: text}) from None
            if count < 1:
                raise BadInput("{" + option + f"}}: {count} input sets; write random:N with N >= 1", **{option: text})
            return cls(text, option, count=count)
        files = tuple(f.strip() for f in text.split(",") if f.strip())
        if not files:
            raise BadInput("{" + option + "}: give .npz or image file(s), comma separated"
                           + (", or random:N" if random_ok else ""), **{option: text})
        for f in files:
            if Path(f).is_dir():
                raise BadInput("{" + option + f"}}: {f}: is a folder; give .npz or image files, comma separated",
                               **{option: text})
            if not Path(f).is_file():
                raise BadInput("{" + option + f"}}: {f}: no such file (give .npz files of the model's inputs or "
                               "image files" + (", or random:N)" if random_ok else ")"), **{option: text})
        return cls(text, option, files=files)

    def describe(self) -> str:
        if self.random:
            return f"{self.count} random input sets (normal pixels)"
        return f"{len(self.files)} file(s) ({self.text})"

    def sets(self, model: "str | Path | Model") -> list[dict[str, np.ndarray]]:
        """The input sets for ``model`` (a file, a split, or a loaded Model), each checked."""
        kind = ModelKind.of(model)
        if self.random:
            if kind.dynamic and kind.cfg is None:
                raise BadInput("{" + self.option + "}: random inputs for a dynamic model need its "
                               "qvl_surgery.vision_config metadata; give .npz or image files", **{self.option: self.text})
            out = []
            for s in range(self.count):
                feeds = random_feeds(kind, seed=s)
                check_feeds(kind, feeds)
                out.append(feeds)
            return out
        out = []
        for f in self.files:
            try:
                if f.endswith(".npz"):
                    from qvl_surgery.core.runners import load_npz
                    feeds = load_npz(f)
                    if kind.dynamic == "host" and GRID in feeds and PIXELS in feeds:
                        feeds = dynamic_feeds(kind, feeds[PIXELS], feeds[GRID])
                else:
                    feeds = image_feeds(kind, [f])
                check_feeds(kind, feeds)
            except BadInput as e:
                raise _flagged(e, self.option, self.text, "" if e.template.startswith(f) else f"{f}: ") from None
            out.append(feeds)
        return out
