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

import json
import logging
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from onnx import TensorProto, helper

from qvl_surgery.app import venvs
from qvl_surgery.app.package_parts import Checkpoint, build_embedding_model, genai_config, processor_config
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import Model
from qvl_surgery.core.values import write_value
from qvl_surgery.core.publish import check_new_dir, publish_dir, staging

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime-genai",)

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
_STAMP = venvs.STAMP

# Files a Qwen2.5-VL checkpoint carries for its tokenizer and chat template.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.json", "chat_template.jinja")
# What the builder writes beside the decoder that the package takes from the checkpoint instead.
_BUILDER_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                            "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json")


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
    return venvs.pins_stamp(BUILDER_REQUIREMENTS)


def builder_env(venv_dir: str | Path | None = None, *, create: bool = True) -> Path:
    """The Python of the builder's virtualenv, created on first use (``BUILDER_REQUIREMENTS``,
    installed with this Python's pip; about 1.1 GB, mostly torch); a later call with the same
    pins returns at once (:mod:`qvl_surgery.app.venvs`)."""
    venv = Path(venv_dir) if venv_dir is not None else builder_env_dir()
    if not create and not venvs.is_ready(venv, BUILDER_REQUIREMENTS):
        raise BadInput(f"{venv}: onnxruntime-genai's builder environment is missing or out of date; "
                       f"create it with qvl_surgery.app.package.builder_env() (or unset {BUILDER_ENV_VAR})")
    return venvs.make_venv(venv, BUILDER_REQUIREMENTS, what="onnxruntime-genai's builder environment",
                           note="once; about 1 minute, 1.1 GB")


def run_builder(src_dir: Path, out_dir: Path, python: Path) -> float:
    """onnxruntime-genai's builder on the checkpoint: the text decoder without its embedding
    (``text.onnx``, input ``inputs_embeds``) and ``genai_config.json``. Returns its seconds."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache = out_dir / ".cache"
    t0 = time.monotonic()
    # Nothing from a hub: the builder reads the local folder only.
    offline = venvs.child_env(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    venvs.run_logged([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(src_dir.resolve()),
                      "-o", str(out_dir.resolve()), "-p", "fp32", "-e", "cpu", "-c", str(cache.resolve()),
                      "--extra_options", "exclude_embeds=true", "filename=text.onnx"],
                     "build the text decoder with onnxruntime-genai's builder", cwd=out_dir,
                     log_path=out_dir.parent / "builder.log", env=offline)
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
