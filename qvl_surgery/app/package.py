"""package: a Qwen2.5-VL checkpoint as a folder a runtime loads as it is.

``package(src_dir, out_dir, runtime="onnxruntime-genai")`` writes what onnxruntime-genai's
multimodal pipeline (``og.Model``, ``model.create_multimodal_processor()``) expects:

================================= ============================================================
file                              made by
================================= ============================================================
``vision.onnx`` (+ ``.data``)     the toolkit's dynamic export (:mod:`qvl_surgery.core.dynamic`,
                                  self-contained kind: ``pixel_values`` [num_patches, 1176] +
                                  ``image_grid_thw`` [num_images, 3] -> ``image_features``),
                                  then the given passes
``embedding.onnx`` (+ ``.data``)  here: the checkpoint's token embeddings, with the image
                                  features scattered at the image/video pad tokens
``text.onnx`` (+ ``.data``)       onnxruntime-genai's own model builder (run, not rewritten:
                                  ``-p fp32 -e cpu --extra_options exclude_embeds=true``)
``genai_config.json``             the builder's, plus the ``vision`` and ``embedding`` sections
                                  and the image/video/vision-start token ids
``processor_config.json``         here, from the checkpoint's ``preprocessor_config.json``
tokenizer files                   copied from the checkpoint (``tokenizer.json``, ...)
================================= ============================================================

Rules and limits:

- The checkpoint folder is only read. The package is written into a hidden temporary sibling
  of ``out_dir`` and renamed into place when every file is written and checked.
- fp32 only: onnxruntime-genai's CPU provider runs fp32 models; an fp16 package would need a
  CUDA build of the runtime and a decoder built for it, which this toolkit cannot test.
- The builder runs in its own virtualenv (``builder_env()``, in the user's cache under a hash of
  its pins, so every checkout reuses it), created on first use: the onnxruntime-genai 0.18
  builder imports ``onnx_ir`` and classes that the toolkit's pinned transformers 4.49 lacks (Gemma3, Mistral3, Qwen3-VL, ...). It loads the whole checkpoint
  through transformers (its own design): for the 7B that is about 30 GB of RAM in fp32.
- Images: the runtime finds them by the literal ``<|vision_start|><|image_pad|><|vision_end|>``
  in the prompt, one vision-start per image; its bicubic resize differs from Pillow's, so an
  image whose size already fits (multiples of 28 within min/max pixels) gives transformers'
  pixels exactly.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
from onnx import TensorProto, helper

from qvl_surgery import __version__
from qvl_surgery.core.errors import BadInput, QvlError
from qvl_surgery.core.modelfile import Computed, FileRange, Model
from qvl_surgery.core.values import write_value
from qvl_surgery.core.publish import check_new_dir, publish_dir, staging

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime-genai",)
OPSET = 17

# The builder's own environment. Pinned: the runtime it was measured with (same version as the
# toolkit's venv), a transformers whose classes the builder imports, the toolkit's torch (CPU).
BUILDER_REQUIREMENTS = (
    "torch==2.13.0",
    "onnxruntime-genai==0.18.0",
    "onnxruntime==1.32.0",
    "onnx==1.23.2",
    "onnx-ir==1.1.0",
    "numpy==2.4.6",
    "transformers==5.24.0",
    "tokenizers==0.23.3",
    "huggingface-hub==2.4.0",
    "safetensors==0.8.0",
)
BUILDER_ENV_VAR = "QVL_SURGERY_GENAI_BUILDER"
_STAMP = ".qvl-builder-stamp"

# Files a Qwen2.5-VL checkpoint carries for its tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja")
# What the builder writes beside the decoder that the package takes from the checkpoint instead.
_BUILDER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                            "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")

EMBED_TABLE_KEYS = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight",
                    "language_model.model.embed_tokens.weight")
IMAGE_TOKEN, VIDEO_TOKEN, VISION_START = "<|image_pad|>", "<|video_pad|>", "<|vision_start|>"


# ----------------------------------------------------------------------------- the checkpoint

@dataclass
class Checkpoint:
    """What the package needs to know about a transformers Qwen2.5-VL checkpoint folder."""

    dir: Path
    config: dict
    image_token_id: int
    video_token_id: int
    vision_start_token_id: int
    hidden_size: int
    vocab_size: int

    @classmethod
    def read(cls, src_dir: str | Path) -> "Checkpoint":
        src = Path(src_dir)
        if not src.is_dir():
            raise BadInput(f"{src}: no such checkpoint directory; pass a local Qwen2.5-VL checkpoint folder")
        cfg_path = src / "config.json"
        try:
            config = json.loads(cfg_path.read_text())
        except FileNotFoundError:
            raise BadInput(f"{src}: no config.json; pass a transformers Qwen2.5-VL checkpoint folder") from None
        except (OSError, ValueError) as e:
            raise BadInput(f"{cfg_path}: not readable JSON ({e})") from None
        arch = config.get("architectures") or []
        if "Qwen2_5_VLForConditionalGeneration" not in arch:
            raise BadInput(f"{cfg_path}: architectures {arch} is not Qwen2_5_VLForConditionalGeneration; "
                           "onnxruntime-genai's builder needs a Qwen2.5-VL checkpoint")
        if not (src / "tokenizer.json").is_file():
            raise BadInput(f"{src}: no tokenizer.json; the runtime needs the checkpoint's tokenizer "
                           "(save it with the model: processor.save_pretrained(DIR))")
        text = config.get("text_config", config)  # newer transformers nest the text config
        added = _added_tokens(src / "tokenizer.json")
        ids = {}
        for key, token in (("image_token_id", IMAGE_TOKEN), ("video_token_id", VIDEO_TOKEN),
                           ("vision_start_token_id", VISION_START)):
            in_cfg = config.get(key, text.get(key))
            in_tok = added.get(token)
            if in_tok is None:
                raise BadInput(f"{src / 'tokenizer.json'}: no {token} token; the runtime finds images by "
                               "<|vision_start|><|image_pad|><|vision_end|> (a Qwen2.5-VL tokenizer has them)")
            if in_cfg is not None and int(in_cfg) != in_tok:
                raise BadInput(f"{cfg_path}: {key} is {in_cfg} but the tokenizer gives {token} id {in_tok}; "
                               "the config and tokenizer.json must come from the same model")
            ids[key] = in_tok
        return cls(dir=src, config=config, hidden_size=int(text["hidden_size"]),
                   vocab_size=int(text["vocab_size"]), **ids)

    def embed_table(self) -> tuple[TensorProto, FileRange | Computed]:
        """The token-embedding table as an fp32 initializer and the source of its bytes.

        An fp32 table is referenced where it lies in the safetensors file (no copy in memory);
        a bf16/fp16 one is converted while writing."""
        for f in sorted(self.dir.glob("*.safetensors")):
            header, base = _safetensors_header(f)
            for key in EMBED_TABLE_KEYS:
                if key in header:
                    return self._table(f, key, header[key], base)
        raise BadInput(f"{self.dir}: no token-embedding table ({' or '.join(EMBED_TABLE_KEYS)}) in its "
                       "safetensors files; the checkpoint is incomplete or of another architecture")

    def _table(self, f: Path, key: str, entry: dict, base: int) -> tuple[TensorProto, FileRange | Computed]:
        shape = [int(d) for d in entry["shape"]]
        if len(shape) != 2 or shape[1] != self.hidden_size or shape[0] < self.vocab_size:
            raise BadInput(f"{f}: {key} has shape {shape}; the config says [{self.vocab_size}, {self.hidden_size}]")
        start, end = (int(x) for x in entry["data_offsets"])
        t = TensorProto(name="embed_tokens", data_type=TensorProto.FLOAT, dims=shape)
        t.data_location = TensorProto.EXTERNAL
        nbytes = shape[0] * shape[1] * 4
        if entry["dtype"] == "F32":
            if end - start != nbytes or base + end > f.stat().st_size:
                raise BadInput(f"{f}: {key} byte range does not fit its shape or the file (damaged file?)")
            return t, FileRange(f, base + start, nbytes)
        if entry["dtype"] not in ("BF16", "F16"):
            raise BadInput(f"{f}: {key} has dtype {entry['dtype']}; expected F32, BF16 or F16")

        def convert() -> np.ndarray:
            from safetensors import safe_open
            with safe_open(str(f), framework="pt") as h:
                return h.get_tensor(key).float().numpy()
        return t, Computed(convert, nbytes)


def _safetensors_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset its data starts at."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            if n > 100 << 20:
                raise ValueError(f"header length {n}")
            header = json.loads(fh.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise BadInput(f"{path}: not a readable safetensors file ({e})") from None
    header.pop("__metadata__", None)
    return header, 8 + n


def _added_tokens(tokenizer_json: Path) -> dict[str, int]:
    try:
        doc = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"{tokenizer_json}: not readable JSON ({e})") from None
    return {t["content"]: int(t["id"]) for t in doc.get("added_tokens", [])}


# ----------------------------------------------------------------------------- embedding model

def build_embedding_model(ckpt: Checkpoint) -> Model:
    """``input_ids`` int64 [B, S] + ``image_features`` float32 [N, H] -> ``inputs_embeds`` [B, S, H].

    The k-th image or video pad token (in row-major order over the batch) takes row k of
    ``image_features``; every other token its embedding. The runtime runs this model at every
    decode step with N = 0, and a pad token can be generated then: pad tokens past the N-th keep
    their token embedding (transformers does the same when no pixels are given). The rows are
    gathered from ``[zeros(1, H); image_features]`` at ``cumsum(is_pad)`` (0 where no feature
    is taken), so no index is ever out of range."""
    table, source = ckpt.embed_table()
    H = ckpt.hidden_size
    consts = [
        helper.make_tensor("image_token_id", TensorProto.INT64, [], [ckpt.image_token_id]),
        helper.make_tensor("video_token_id", TensorProto.INT64, [], [ckpt.video_token_id]),
        helper.make_tensor("zero_i64", TensorProto.INT64, [], [0]),
        helper.make_tensor("flat_shape", TensorProto.INT64, [1], [-1]),
        helper.make_tensor("zero_row", TensorProto.FLOAT, [1, H], np.zeros(H, np.float32)),
        helper.make_tensor("last_axis", TensorProto.INT64, [1], [-1]),
    ]
    n = helper.make_node
    nodes = [
        n("Gather", ["embed_tokens", "input_ids"], ["token_embeds"], name="token_embeds"),
        n("Equal", ["input_ids", "image_token_id"], ["is_image"], name="is_image"),
        n("Equal", ["input_ids", "video_token_id"], ["is_video"], name="is_video"),
        n("Or", ["is_image", "is_video"], ["is_pad"], name="is_pad"),
        n("Cast", ["is_pad"], ["is_pad_i64"], name="is_pad_i64", to=TensorProto.INT64),
        n("Shape", ["input_ids"], ["ids_shape"], name="ids_shape"),
        n("Reshape", ["is_pad_i64", "flat_shape"], ["is_pad_flat"], name="is_pad_flat"),
        n("CumSum", ["is_pad_flat", "zero_i64"], ["pad_rank_flat"], name="pad_rank_flat"),
        n("Reshape", ["pad_rank_flat", "ids_shape"], ["pad_rank"], name="pad_rank"),
        n("Shape", ["image_features"], ["features_shape"], name="features_shape", start=0, end=1),
        n("Squeeze", ["features_shape"], ["num_features"], name="num_features"),
        n("LessOrEqual", ["pad_rank", "num_features"], ["has_feature"], name="has_feature"),
        n("And", ["is_pad", "has_feature"], ["takes_feature"], name="takes_feature"),
        n("Where", ["takes_feature", "pad_rank", "zero_i64"], ["feature_row"], name="feature_row"),
        n("Concat", ["zero_row", "image_features"], ["padded_features"], name="padded_features", axis=0),
        n("Gather", ["padded_features", "feature_row"], ["scattered_features"], name="scattered_features", axis=0),
        n("Unsqueeze", ["takes_feature", "last_axis"], ["takes_feature_3d"], name="takes_feature_3d"),
        n("Where", ["takes_feature_3d", "scattered_features", "token_embeds"], ["inputs_embeds"],
          name="inputs_embeds"),
    ]
    graph = helper.make_graph(
        nodes, "qwen2_5_vl_embedding",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
         helper.make_tensor_value_info("image_features", TensorProto.FLOAT, ["num_image_tokens", H])],
        [helper.make_tensor_value_info("inputs_embeds", TensorProto.FLOAT, ["batch_size", "sequence_length", H])],
        initializer=[table] + consts)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)],
                              producer_name="qvl-surgery", producer_version=__version__)
    proto.ir_version = 8
    model = Model(proto, {table.name: source})
    model.set_metadata("qvl_surgery.version", __version__)
    model.set_metadata("qvl_surgery.embedding", json.dumps(
        {"image_token_id": ckpt.image_token_id, "video_token_id": ckpt.video_token_id,
         "vocab_rows": int(table.dims[0]), "hidden_size": H}))
    return model


# ----------------------------------------------------------------------------- processor config

def processor_config(ckpt: Checkpoint) -> dict:
    """onnxruntime-extensions' ``qwen2_5_image_processor`` pipeline from the checkpoint's
    ``preprocessor_config.json`` (transformers' Qwen2-VL image processor; its defaults where a
    field is absent). ConvertRGB and Normalize's ``qwen2_5_vl`` flag each swap the channel order
    and so cancel out (measured); Resize's width/height are only the runtime's defaults:
    ``smart_resize`` computes the size from each image."""
    pre = {}
    path = ckpt.dir / "preprocessor_config.json"
    if path.is_file():
        try:
            pre = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise BadInput(f"{path}: not readable JSON ({e})") from None
    size = pre.get("size") or {}
    min_pixels = int(pre.get("min_pixels") or size.get("shortest_edge") or 56 * 56)
    max_pixels = int(pre.get("max_pixels") or size.get("longest_edge") or 28 * 28 * 1280)
    vc = ckpt.config.get("vision_config", {})
    patch = int(pre.get("patch_size", vc.get("patch_size", 14)))
    merge = int(pre.get("merge_size", vc.get("spatial_merge_size", 2)))
    temporal = int(pre.get("temporal_patch_size", vc.get("temporal_patch_size", 2)))
    mean = [float(x) for x in pre.get("image_mean", [0.48145466, 0.4578275, 0.40821073])]
    std = [float(x) for x in pre.get("image_std", [0.26862954, 0.26130258, 0.27577711])]

    def op(name: str, kind: str, **attrs) -> dict:
        o = {"name": name, "type": kind}
        if attrs:
            o["attrs"] = attrs
        return {"operation": o}
    return {"processor": {"name": "qwen2_5_image_processor", "transforms": [
        op("decode_image", "DecodeImage", color_space="RGB"),
        op("convert_to_rgb", "ConvertRGB"),
        op("resize", "Resize", width=540, height=360, smart_resize=1, min_pixels=min_pixels,
           max_pixels=max_pixels, patch_size=patch, merge_size=merge),
        op("rescale", "Rescale", rescale_factor=float(pre.get("rescale_factor", 1 / 255))),
        op("normalize", "Normalize", mean=mean, std=std, qwen2_5_vl=1),
        op("patch_image", "PatchImage", patch_size=patch, temporal_patch_size=temporal, merge_size=merge),
    ]}}


def genai_config(builder_config: dict, ckpt: Checkpoint, vision_cfg) -> dict:
    """The builder's genai_config.json plus what it leaves out for Qwen2.5-VL (names as the
    runtime reads them; ``image_grid_thw`` must be named: the runtime's default is ``image_sizes``)."""
    cfg = json.loads(json.dumps(builder_config))
    m = cfg["model"]
    if m.get("type") != "qwen2_5_vl":
        raise QvlError(f"onnxruntime-genai's builder wrote model type {m.get('type')!r}, expected 'qwen2_5_vl' "
                       "(exclude_embeds=true); this builder version is not the one the package was made for")
    session = {"log_id": "onnxruntime-genai", "provider_options": []}
    m["image_token_id"] = ckpt.image_token_id
    m["video_token_id"] = ckpt.video_token_id
    m["vision_start_token_id"] = ckpt.vision_start_token_id
    m["embedding"] = {
        "filename": "embedding.onnx",
        "inputs": {"input_ids": "input_ids", "image_features": "image_features"},
        "outputs": {"inputs_embeds": "inputs_embeds"},
        "session_options": dict(session),
    }
    m["vision"] = {
        "filename": "vision.onnx",
        "config_filename": "processor_config.json",
        "spatial_merge_size": vision_cfg.spatial_merge_size,
        "tokens_per_second": float(vision_cfg.tokens_per_second),
        "patch_size": vision_cfg.patch_size,
        "window_size": vision_cfg.window_size,
        "inputs": {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"},
        "outputs": {"image_features": "image_features"},
        "session_options": dict(session),
    }
    return cfg


# ----------------------------------------------------------------------------- the builder

def builder_env_dir() -> Path:
    """Where the builder's virtualenv lives: ``$QVL_SURGERY_GENAI_BUILDER`` if set, else the user's
    cache, ``~/.cache/qvl-surgery/genai-builder-<hash of its pins and Python>``: one per set of pins,
    shared by every run, checkout and clone (it is 1.1 GB and takes a minute to make); new pins
    get a new folder instead of rebuilding one another checkout still uses."""
    env = os.environ.get(BUILDER_ENV_VAR)
    if env:
        return Path(env).expanduser()
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / "qvl-surgery" / f"genai-builder-{_want_stamp()[:16]}"


def _want_stamp() -> str:
    text = "\n".join(BUILDER_REQUIREMENTS) + f"\npython {sys.version_info[0]}.{sys.version_info[1]}"
    return hashlib.sha256(text.encode()).hexdigest()


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    # Byte-code caching on: without it every builder run re-compiles torch and transformers (~2x).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    # Nothing from a hub: the builder reads the local folder only.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    return env


def builder_env(venv_dir: str | Path | None = None, *, create: bool = True) -> Path:
    """The Python of the builder's virtualenv, created on first use (``BUILDER_REQUIREMENTS``,
    installed with this Python's pip; about 1.1 GB, mostly torch); a later call with the same
    pins returns at once. Creation is atomic (temporary sibling, rename) and locked, so two
    processes do not build it twice."""
    venv = Path(venv_dir) if venv_dir is not None else builder_env_dir()
    python = venv / "bin" / "python"
    want = _want_stamp()

    def ready() -> bool:
        stamp = venv / _STAMP
        return python.exists() and stamp.is_file() and stamp.read_text().strip() == want

    if ready():
        return python
    if not create:
        raise BadInput(f"{venv}: onnxruntime-genai's builder environment is missing or out of date; "
                       f"create it with qvl_surgery.app.package.builder_env() (or unset {BUILDER_ENV_VAR})")
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f".{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if ready():
            return python
        log.warning("creating onnxruntime-genai's builder environment in %s (once; about 1 minute, 1.1 GB)", venv)
        t0 = time.monotonic()
        tmp = Path(tempfile.mkdtemp(prefix=f".{venv.name}.tmp-", dir=venv.parent))
        try:
            _run([sys.executable, "-m", "venv", "--without-pip", str(tmp)], "create the builder's virtualenv")
            # This Python's pip installs into the new venv; no byte-compiling of all of torch here:
            # the first builder run caches what it imports.
            _run([sys.executable, "-m", "pip", "--python", str(tmp / "bin" / "python"), "install", "--quiet",
                  "--no-compile", "--disable-pip-version-check", *BUILDER_REQUIREMENTS],
                 "install onnxruntime-genai's builder requirements")
            (tmp / _STAMP).write_text(want + "\n")
            os.chmod(tmp, 0o755)  # mkdtemp made it private
            if venv.exists():
                shutil.rmtree(venv)
            os.rename(tmp, venv)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        log.warning("builder environment ready in %.0f s", time.monotonic() - t0)
    return python


def _run(cmd: list[str], what: str, *, cwd: Path | None = None, log_path: Path | None = None,
         env: dict | None = None) -> None:
    r = subprocess.run(cmd, cwd=cwd, env=env or _child_env(), stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if log_path is not None:
        log_path.write_text(r.stdout)
    if r.returncode != 0:
        tail = "\n".join(r.stdout.strip().splitlines()[-15:])
        raise QvlError(f"could not {what} (exit {r.returncode}):\n{tail}")


def run_builder(src_dir: Path, out_dir: Path, python: Path) -> float:
    """onnxruntime-genai's builder on the checkpoint: the text decoder without its embedding
    (``text.onnx``, input ``inputs_embeds``) and ``genai_config.json``. Returns its seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / ".cache"
    t0 = time.monotonic()
    _run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(src_dir.resolve()),
          "-o", str(out_dir.resolve()), "-p", "fp32", "-e", "cpu", "-c", str(cache.resolve()),
          "--extra_options", "exclude_embeds=true", "filename=text.onnx"],
         "build the text decoder with onnxruntime-genai's builder", cwd=out_dir,
         log_path=out_dir.parent / "builder.log")
    shutil.rmtree(cache, ignore_errors=True)
    return time.monotonic() - t0


# ----------------------------------------------------------------------------- package

@dataclass
class PackageReport:
    out_dir: Path
    runtime: str
    files: dict[str, int]                 # name -> bytes
    vision_passes: list[str]
    vision_nodes: int
    token_ids: dict[str, int]
    builder_python: Path
    builder_seconds: float
    seconds: float
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        total = sum(self.files.values())
        out = [f"packaged {self.out_dir} for {self.runtime} ({len(self.files)} files, {total / 1e9:.3f} GB, "
               f"{self.seconds:.0f} s)",
               f"  vision.onnx: dynamic export, {self.vision_nodes} nodes, passes: "
               f"{', '.join(self.vision_passes) or 'none'}",
               "  embedding.onnx: token embeddings + image features at "
               + ", ".join(f"{k}={v}" for k, v in self.token_ids.items()),
               f"  text.onnx: onnxruntime-genai builder (fp32, cpu, {self.builder_seconds:.0f} s, "
               f"python {self.builder_python})"]
        out += [f"  {n}" for n in self.notes]
        return out


def _vision_passes(passes) -> list:
    from passes import parse_spec
    from qvl_surgery.core.passbase import Pass, Sequential
    if passes is None or passes == "" or passes == []:
        return []
    specs = parse_spec(passes) if isinstance(passes, str) else list(passes)
    if not all(isinstance(p, Pass) for p in specs):
        raise BadInput("{passes}: give pass specs as text (e.g. 'simplify') or Pass instances", passes=str(passes))
    Sequential(specs)  # checks the chain
    if specs[-1].gives != "model":
        raise BadInput("{passes}: the package holds one vision model; split cannot be the last pass",
                       passes=",".join(p.text() for p in specs))
    return specs


def package(src_dir: str | Path, out_dir: str | Path, *, runtime: str = "onnxruntime-genai", fp16: bool = False,
            passes: str | Sequence | None = None, overwrite: bool = False, progress: bool = False,
            builder_python: str | Path | None = None) -> PackageReport:
    """Write a folder that ``runtime`` loads as it is (see the module docstring for its files).

    ``passes``: graph passes for the vision model (``--passes`` text such as ``simplify`` or Pass
    instances), applied to the dynamic export before it is written. ``fp16``: refused for
    onnxruntime-genai, whose CPU provider runs fp32 models. ``overwrite``: replace an existing
    ``out_dir``. ``builder_python``: a Python that can import onnxruntime-genai's builder
    (default: :func:`builder_env`, created on first use)."""
    from qvl_surgery.core.weights import CheckpointWeights

    t0 = time.monotonic()
    if runtime not in RUNTIMES:
        raise BadInput("{runtime}: unknown runtime; choose one of " + ", ".join(RUNTIMES), runtime=runtime)
    if fp16:
        raise BadInput("{fp16}: onnxruntime-genai runs the package on its CPU provider, in fp32 only "
                       "(an fp16 decoder needs its CUDA build); drop the option", fp16=True)
    src = Path(src_dir)
    out = Path(out_dir)
    ckpt = Checkpoint.read(src)
    src_r, out_r = src.resolve(), out.resolve()
    if out_r == src_r or src_r in out_r.parents or out_r in src_r.parents:
        raise BadInput(f"{out}: the package folder must lie outside the checkpoint folder {src} (it is only read)")
    check_new_dir(out, overwrite=overwrite, inputs=[src])
    specs = _vision_passes(passes)
    weights = CheckpointWeights(src)
    if weights.cfg.out_hidden_size != ckpt.hidden_size:
        raise BadInput(f"{src / 'config.json'}: vision out_hidden_size {weights.cfg.out_hidden_size} differs from "
                       f"the text hidden_size {ckpt.hidden_size}; not a consistent Qwen2.5-VL config")
    python = Path(builder_python) if builder_python is not None else builder_env()
    notes: list[str] = []
    with staging(out) as tmp:
        # 1. the text decoder, by the runtime's own builder
        build_dir = tmp / "builder"
        builder_s = run_builder(src, build_dir, python)
        for name in os.listdir(build_dir):
            if name in _BUILDER_TOKENIZER_FILES:
                continue
            os.replace(build_dir / name, tmp / name)
        shutil.rmtree(build_dir)
        (tmp / "builder.log").unlink(missing_ok=True)
        builder_cfg = json.loads((tmp / "genai_config.json").read_text())

        # 2. the vision model: the dynamic export, then the passes
        applied, vision_nodes = write_vision_model(weights, tmp / "vision.onnx", specs, progress=progress)

        # 3. the embedding model
        write_value(build_embedding_model(ckpt), tmp / "embedding.onnx", progress=progress)

        # 4. configs and the tokenizer
        _write_json(tmp / "genai_config.json", genai_config(builder_cfg, ckpt, weights.cfg))
        _write_json(tmp / "processor_config.json", processor_config(ckpt))
        copied = []
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copyfile(src / name, tmp / name)
                copied.append(name)
        if "chat_template.jinja" not in copied and "chat_template.json" not in copied:
            notes.append("no chat template file in the checkpoint (tokenizer_config.json may carry one)")
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir()) if p.is_file()}
        publish_dir(tmp, out, "package")   # which gives the staged folder an ordinary folder's mode
    return PackageReport(out_dir=out, runtime=runtime, files=files, vision_passes=applied,
                         vision_nodes=vision_nodes,
                         token_ids={"image": ckpt.image_token_id, "video": ckpt.video_token_id,
                                    "vision_start": ckpt.vision_start_token_id},
                         builder_python=python, builder_seconds=builder_s, seconds=time.monotonic() - t0,
                         notes=notes)


def write_vision_model(weights, out: Path, passes=None, *, progress: bool = False) -> tuple[list[str], int]:
    """The toolkit's dynamic export (self-contained: ``pixel_values`` + ``image_grid_thw`` ->
    ``image_features``) of ``weights``, with ``passes`` applied, written to ``out``; returns the
    passes applied (as text) and the node count. The passes must keep the runtime's inputs,
    outputs and fp32 features."""
    from qvl_surgery.core.dynamic import GRID_NAME, INPUT_NAME, OUTPUT_NAME, build_dynamic_encoder
    from qvl_surgery.core.passbase import Context, Sequential
    specs = _vision_passes(passes)
    vision = build_dynamic_encoder(weights.cfg, weights)
    if not specs:
        write_value(vision, out, progress=progress)
        return [], len(vision.graph.node)
    with staging(out.with_name(out.name + ".work")) as work:  # simplify writes its result there
        vision, _ = Sequential(specs)(vision, Context(progress=progress, workdir=work))
        _check_vision_io(vision, INPUT_NAME, GRID_NAME, OUTPUT_NAME)
        write_value(vision, out, progress=progress)
    return [p.text() for p in specs], len(vision.graph.node)


def _check_vision_io(model: Model, pixels: str, grid: str, features: str) -> None:
    ins = [i.name for i in model.graph.input]
    outs = [o.name for o in model.graph.output]
    if ins != [pixels, grid] or outs != [features]:
        raise BadInput(f"after the passes the vision model has inputs {ins} and outputs {outs}; the runtime needs "
                       f"[{pixels}, {grid}] -> [{features}]: drop the pass that changed them")
    out_type = model.graph.output[0].type.tensor_type.elem_type
    if out_type != TensorProto.FLOAT:
        dtype = model.metadata().get("qvl_surgery.dtype", helper.tensor_dtype_to_np_dtype(out_type).name)
        raise BadInput(f"after the passes the vision model is {dtype} with {helper.tensor_dtype_to_np_dtype(out_type).name} "
                       "image features; onnxruntime-genai's CPU pipeline takes fp32 image features: drop the pass "
                       "that changed them (fp16)")


def _write_json(path: Path, doc: dict) -> None:
    path.write_text(json.dumps(doc, indent=4) + "\n")
