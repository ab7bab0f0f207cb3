"""Vision-tower configuration: the published presets and reading a checkpoint's config.json."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qvl_surgery.core.errors import BadInput


@dataclass(frozen=True)
class VisionConfig:
    """Fields of transformers' Qwen2_5_VLVisionConfig, with its defaults, so a field a checkpoint's
    config.json leaves out reads as transformers reads it. Those defaults are no released model's
    (hidden_size 3584, tokens_per_second 4; the 3B and 7B towers have 1280 and 2): the presets
    below are."""

    depth: int = 32
    hidden_size: int = 3584
    hidden_act: str = "silu"
    intermediate_size: int = 3420
    num_heads: int = 16
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_patch_size: int = 2
    tokens_per_second: int = 4
    window_size: int = 112
    out_hidden_size: int = 3584
    fullatt_block_indexes: tuple[int, ...] = (7, 15, 23, 31)
    initializer_range: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one pixel_values row: C * T * P * P (1176 for the released models)."""
        return self.in_channels * self.temporal_patch_size * self.patch_size**2

    @property
    def merge_unit(self) -> int:
        return self.spatial_merge_size**2

    @property
    def window_merged(self) -> int:
        """Window side in merged tokens (112 px // 2 // 14 = 4)."""
        return self.window_size // self.spatial_merge_size // self.patch_size

    def to_dict(self) -> dict:
        d = asdict(self)
        d["fullatt_block_indexes"] = list(self.fullatt_block_indexes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "VisionConfig":
        known = {f.name for f in fields(cls)}
        kw = {k: v for k, v in d.items() if k in known}
        if "fullatt_block_indexes" in kw:
            kw["fullatt_block_indexes"] = tuple(int(i) for i in kw["fullatt_block_indexes"])
        # Older configs call it embed_dim.
        if "hidden_size" not in kw and "embed_dim" in d:
            kw["hidden_size"] = d["embed_dim"]
        cfg = cls(**kw)
        if cfg.hidden_size % cfg.num_heads:
            raise BadInput(f"vision config: hidden_size {cfg.hidden_size} is not divisible by num_heads {cfg.num_heads}")
        if cfg.hidden_act != "silu":
            raise BadInput(f"vision config: hidden_act {cfg.hidden_act!r} is not supported (Qwen2.5-VL uses 'silu')")
        return cfg


PRESETS: dict[str, VisionConfig] = {
    # Small enough for tests in seconds, but with every feature: window and full blocks,
    # rotary with several frequencies, a merger.
    "tiny": VisionConfig(depth=4, hidden_size=64, intermediate_size=96, num_heads=4,
                         out_hidden_size=48, fullatt_block_indexes=(1, 3)),
    # vision_config of Qwen/Qwen2.5-VL-3B-Instruct: 668,684,288 parameters.
    "3b": VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=2048, tokens_per_second=2),
    # vision_config of Qwen/Qwen2.5-VL-7B-Instruct.
    "7b": VisionConfig(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                       out_hidden_size=3584, tokens_per_second=2),
}


def preset(name: str) -> VisionConfig:
    try:
        return PRESETS[name]
    except KeyError:
        raise BadInput(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}") from None


def read_config_json(checkpoint_dir: Path) -> dict:
    """The config.json of a local checkpoint directory, as it is (the one reader of it: the vision
    config below and the package's text config and token ids both come from here)."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise BadInput(f"{checkpoint_dir}: no such checkpoint directory; pass a local directory with config.json and *.safetensors")
    cfg_path = checkpoint_dir / "config.json"
    if not cfg_path.is_file():
        raise BadInput(f"{checkpoint_dir}: no config.json; pass a transformers Qwen2.5-VL checkpoint directory")
    try:
        return json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise BadInput(f"{cfg_path}: not readable JSON ({e})") from None


def read_checkpoint_config(checkpoint_dir: Path) -> VisionConfig:
    """The vision_config of a transformers Qwen2.5-VL checkpoint directory (or a bare vision config)."""
    d = read_config_json(checkpoint_dir)
    if "vision_config" in d:
        d = d["vision_config"]
    elif d.get("model_type") not in ("qwen2_5_vl", "qwen2_5_vl_vision", None):
        raise BadInput(f"{Path(checkpoint_dir) / 'config.json'}: model_type {d.get('model_type')!r} is not Qwen2.5-VL")
    return VisionConfig.from_dict(d)


def parse_image_size(text: str) -> tuple[int, int]:
    """'448x448' or '448' -> (height, width); both must be multiples of 28 (patch 14 x merge 2)."""
    try:
        parts = [int(p) for p in text.lower().replace("*", "x").split("x")]
    except ValueError:
        parts = []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2 or min(parts) <= 0:
        raise BadInput(f"image size {text!r}: write it as HEIGHTxWIDTH, e.g. 448x448")
    return parts[0], parts[1]


def check_image_size(cfg: VisionConfig, size: tuple[int, int]) -> tuple[int, int]:
    step = cfg.patch_size * cfg.spatial_merge_size
    h, w = size
    if h % step or w % step:
        raise BadInput(f"image size {h}x{w}: both sides must be multiples of {step} "
                       f"(patch {cfg.patch_size} x merge {cfg.spatial_merge_size}); "
                       f"e.g. {max(step, round(h / step) * step)}x{max(step, round(w / step) * step)}")
    return h, w
