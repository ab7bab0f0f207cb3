"""What a package holds besides the decoder, made here: the checkpoint's facts (:class:`Checkpoint`),
the embedding model (:func:`build_embedding_model`) and the runtime's configs
(:func:`processor_config`, :func:`genai_config`). :mod:`qvl_surgery.app.package` puts them together.

The checkpoint's files are read by the core's readers: ``config.json`` by
:func:`qvl_surgery.core.config.read_config_json`, the safetensors files by
:class:`qvl_surgery.core.weights.SafetensorsCheckpoint` (which the encoder export reads too).
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper

from qvl_surgery import __version__
from qvl_surgery.core.config import read_config_json
from qvl_surgery.core.errors import BadInput, QvlError
from qvl_surgery.core.modelfile import Computed, FileRange, Model
from qvl_surgery.core.weights import SafetensorsCheckpoint

OPSET = 17
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
        cfg_path = src / "config.json"
        config = read_config_json(src)
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
        files = SafetensorsCheckpoint(self.dir)
        found = files.find(EMBED_TABLE_KEYS)
        if found is None:
            raise BadInput(f"{self.dir}: no token-embedding table ({' or '.join(EMBED_TABLE_KEYS)}) in its "
                           "safetensors files; the checkpoint is incomplete or of another architecture")
        f, key = found
        entry = files.header(f)[0][key]
        shape = [int(d) for d in entry["shape"]]
        if len(shape) != 2 or shape[1] != self.hidden_size or shape[0] < self.vocab_size:
            raise BadInput(f"{f}: {key} has shape {shape}; the config says [{self.vocab_size}, {self.hidden_size}]")
        if entry["dtype"] not in ("F32", "BF16", "F16"):
            raise BadInput(f"{f}: {key} has dtype {entry['dtype']}; expected F32, BF16 or F16")
        t = TensorProto(name="embed_tokens", data_type=TensorProto.FLOAT, dims=shape)
        t.data_location = TensorProto.EXTERNAL
        return t, files.fp32_source(f, key)


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


# ----------------------------------------------------------------------------- the runtime's configs

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
