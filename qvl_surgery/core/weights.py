"""Where the encoder's weights come from: a local checkpoint, random init, or a state dict.

Each source hands out one tensor at a time as float32 numpy, so the export streams weights into
its data file without ever holding the model. Names are the vision tower's own
(``blocks.0.attn.qkv.weight``), without the checkpoint's ``visual.`` prefix.
"""
from __future__ import annotations

import json
import logging
import struct
import zlib
from pathlib import Path
from typing import Mapping

import numpy as np

from qvl_surgery.core.config import VisionConfig, read_checkpoint_config
from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.modelfile import Computed, FileRange

log = logging.getLogger(__name__)

CHECKPOINT_PREFIXES = ("visual.", "model.visual.")


def expected_weights(cfg: VisionConfig) -> dict[str, tuple[int, ...]]:
    """Every vision-tower parameter and its shape, in transformers' layout."""
    c, i, o = cfg.hidden_size, cfg.intermediate_size, cfg.out_hidden_size
    m = c * cfg.merge_unit
    w: dict[str, tuple[int, ...]] = {
        "patch_embed.proj.weight": (c, cfg.in_channels, cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)}
    for b in range(cfg.depth):
        p = f"blocks.{b}."
        w.update({
            p + "norm1.weight": (c,), p + "norm2.weight": (c,),
            p + "attn.qkv.weight": (3 * c, c), p + "attn.qkv.bias": (3 * c,),
            p + "attn.proj.weight": (c, c), p + "attn.proj.bias": (c,),
            p + "mlp.gate_proj.weight": (i, c), p + "mlp.gate_proj.bias": (i,),
            p + "mlp.up_proj.weight": (i, c), p + "mlp.up_proj.bias": (i,),
            p + "mlp.down_proj.weight": (c, i), p + "mlp.down_proj.bias": (c,),
        })
    w.update({"merger.ln_q.weight": (c,), "merger.mlp.0.weight": (m, m), "merger.mlp.0.bias": (m,),
              "merger.mlp.2.weight": (o, m), "merger.mlp.2.bias": (o,)})
    return w


def parameter_count(cfg: VisionConfig) -> int:
    return sum(int(np.prod(s)) for s in expected_weights(cfg).values())


class WeightSource:
    """Base: ``array(name)`` returns one float32 tensor in transformers' layout."""

    description = ""

    def __init__(self, cfg: VisionConfig):
        self.cfg = cfg
        self.shapes = expected_weights(cfg)

    def array(self, name: str) -> np.ndarray:
        raise NotImplementedError


class RandomWeights(WeightSource):
    """Deterministic random weights, tensor by tensor: seed and name fix every value.

    Linear and conv weights are N(0, initializer_range) as in transformers' init; biases get the
    same small noise and norm scales 1 + N(0, 0.1), so that every parameter reaches the output.
    """

    def __init__(self, cfg: VisionConfig, seed: int = 0):
        super().__init__(cfg)
        self.seed = seed
        self.description = f"random init, seed {seed}"

    def array(self, name: str) -> np.ndarray:
        shape = self.shapes[name]
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode())])
        a = rng.standard_normal(size=shape, dtype=np.float32)
        if "norm" in name or "ln_q" in name:
            return 1.0 + np.float32(0.1) * a
        a *= np.float32(self.cfg.initializer_range)
        return a

    def state_dict(self) -> dict:
        """All weights as torch tensors (small configs and tests only)."""
        import torch
        return {k: torch.from_numpy(self.array(k).copy()) for k in self.shapes}


class OverflowWeights(RandomWeights):
    """Stand-in for the real 3B checkpoint's fp16 trouble: random weights, except 16 channels of the
    last block's ``mlp.down_proj.bias`` set to 4.9e4, which pushes the residual (and the merger's
    RMSNorm input) to ~4.9e4, as reported for ``blocks.31`` of Qwen2.5-VL-3B."""

    VALUE = 4.9e4

    def __init__(self, cfg: VisionConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.description = f"overflow stand-in (random init, seed {seed}; blocks.{cfg.depth - 1} down_proj bias 4.9e4)"

    def array(self, name: str) -> np.ndarray:
        a = super().array(name)
        if name == f"blocks.{self.cfg.depth - 1}.mlp.down_proj.bias":
            a[:16] = self.VALUE
        return a


class OutlierWeights(RandomWeights):
    """Stand-in for a trained ViT's massive activations: from block 1 on, a few fixed residual
    channels carry ~1e3 (block 1's ``mlp.down_proj`` bias, plus its rows scaled up so the channels
    also vary with the image). After RMSNorm those channels set every per-tensor int8 scale, and
    the other channels fall below one step: the failure of naive W8A8 on trained encoders.

    Every part of the shape is a class attribute, and can be given per instance (keywords):
    ``onset`` (the block that writes them, from the end when negative), ``channels`` (residual
    channel indices, taken modulo the hidden size, or a count: that many spread evenly),
    ``value`` (the bias), ``row_scale`` (1: the same in every token, a bias-driven offset) and
    ``writer`` (``mlp.down_proj`` or ``attn.proj``: the linear whose bias and rows carry them)."""

    CHANNELS: tuple[int, ...] | int = (7, 211, 643, 1109)
    VALUE = 1.0e3
    ROW_SCALE = 40.0
    ONSET = 1           # the block whose writer writes them (from the end when negative)
    WRITER = "mlp.down_proj"
    KIND = "outlier"

    def __init__(self, cfg: VisionConfig, seed: int = 0, *, onset: int | None = None,
                 channels: tuple[int, ...] | int | None = None, value: float | None = None,
                 row_scale: float | None = None, writer: str | None = None):
        super().__init__(cfg, seed)
        c = cfg.hidden_size
        channels = self.CHANNELS if channels is None else channels
        if isinstance(channels, int):   # a count: spread evenly, off the multiples of 2
            channels = tuple(int(k * c / channels) + (c // channels) // 2 for k in range(channels))
        self.channels = sorted({int(ch) % c for ch in channels})
        self.value = float(self.VALUE if value is None else value)
        self.row_scale = float(self.ROW_SCALE if row_scale is None else row_scale)
        self.writer = self.WRITER if writer is None else writer
        if self.writer not in ("mlp.down_proj", "attn.proj"):
            raise ValueError(f"writer {self.writer!r}: mlp.down_proj or attn.proj")
        onset = self.ONSET if onset is None else onset
        self.block = min(onset % cfg.depth, cfg.depth - 1)
        varying = "" if self.row_scale != 1.0 else ", the same in every token"
        where = "" if self.writer == "mlp.down_proj" else f" ({self.writer})"
        self.description = (f"{self.KIND} stand-in (random init, seed {seed}; residual channels "
                            f"{self.channels if len(self.channels) <= 8 else f'{len(self.channels)} of them'} "
                            f"~{self.value:g} from block {self.block}{where} on{varying})")

    def array(self, name: str) -> np.ndarray:
        a = super().array(name)
        if name == f"blocks.{self.block}.{self.writer}.bias":
            a[self.channels] = self.value
        elif name == f"blocks.{self.block}.{self.writer}.weight":
            a[self.channels] *= np.float32(self.row_scale)
        return a


class LateOutlierWeights(OutlierWeights):
    """Outliers of another shape: they start in the next-to-last block, in 12 channels, at 3e3."""
    CHANNELS = (3, 29, 101, 211, 307, 419, 523, 643, 757, 881, 997, 1109)
    VALUE = 3.0e3
    ONSET = -2
    KIND = "late-outlier"


class OffsetWeights(OutlierWeights):
    """A bias-driven offset: a quarter of the channels carry 50 from block 1 on, the same in every
    token (no image-dependent part): a constant component, where smoothing's shift is what helps."""
    CHANNELS = tuple(range(0, 4096, 4))
    VALUE = 50.0
    ROW_SCALE = 1.0
    KIND = "offset"


class EarlyOutlierWeights(OutlierWeights):
    """Outliers from the first block on, in two channels only."""
    CHANNELS = (7, 643)
    ONSET = 0
    KIND = "early-outlier"


class WideOutlierWeights(OutlierWeights):
    """Many outlier channels (a third of the hidden size in tiny, 24 of 64; 24 of 1280 in the 3b), smaller."""
    CHANNELS = 24
    VALUE = 300.0
    ROW_SCALE = 10.0
    KIND = "wide-outlier"


class HugeOutlierWeights(OutlierWeights):
    """Larger values: 3e4 in four channels (near fp16's range), from block 1 on."""
    VALUE = 3.0e4
    ROW_SCALE = 200.0
    KIND = "huge-outlier"


class ProjOffsetWeights(OutlierWeights):
    """A bias-driven offset written by another linear: block 2's attention output projection adds
    500 to eight channels, the same in every token."""
    CHANNELS = 8
    VALUE = 500.0
    ROW_SCALE = 1.0
    ONSET = 2
    WRITER = "attn.proj"
    KIND = "proj-offset"



class SpikeWeights(OutlierWeights):
    """Massive activations in a few tokens only, as trained ViTs have them: one MLP hidden unit of the
    onset block fires (a large gate with a negative bias: near zero in most tokens, large in the
    few whose gate is in its tail), and ``down_proj`` writes it into the residual channels with
    ``value`` per unit of it. The down_proj input carries the spike (one channel, a few tokens), and
    the residual's massive channels vary from token to token."""

    CHANNELS = (7, 643)
    VALUE = 20.0
    ROW_SCALE = 60.0     # the unit's gate and up rows, times this
    THRESHOLD = 2.0      # the gate's bias, in standard deviations of the scaled gate
    KIND = "spike"

    def __init__(self, cfg: VisionConfig, seed: int = 0, **shape):
        super().__init__(cfg, seed, **shape)
        self.description = (f"{self.KIND} stand-in (random init, seed {seed}; MLP unit 0 of block {self.block} fires "
                            f"in a few tokens, written into residual channels {self.channels} x{self.value:g})")

    def array(self, name: str) -> np.ndarray:
        a = RandomWeights.array(self, name)
        p = f"blocks.{self.block}.mlp."
        unit = 0
        sd = self.row_scale * self.cfg.initializer_range * np.sqrt(self.cfg.hidden_size)
        if name in (p + "gate_proj.weight", p + "up_proj.weight"):
            a[unit] *= np.float32(self.row_scale)
        elif name == p + "gate_proj.bias":
            a[unit] = -self.THRESHOLD * sd
        elif name == p + "up_proj.bias":
            a[unit] = 2.0 * sd
        elif name == p + "down_proj.weight":
            a[self.channels, unit] = self.value
        return a

STAND_INS = {"random": RandomWeights, "overflow": OverflowWeights, "outlier": OutlierWeights,
             "late-outlier": LateOutlierWeights, "offset": OffsetWeights, "early-outlier": EarlyOutlierWeights,
             "wide-outlier": WideOutlierWeights, "huge-outlier": HugeOutlierWeights,
             "proj-offset": ProjOffsetWeights, "spike": SpikeWeights}


class StateDictWeights(WeightSource):
    """A transformers vision model's state dict (tests; small models)."""

    def __init__(self, cfg: VisionConfig, state_dict: Mapping):
        super().__init__(cfg)
        self.sd = state_dict
        self.description = "state dict"

    def array(self, name: str) -> np.ndarray:
        t = self.sd[name]
        return t.detach().to("cpu").float().numpy() if hasattr(t, "detach") else np.asarray(t, np.float32)


# Bytes per element of each safetensors dtype (the format's own table).
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2,
                "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}


class SafetensorsCheckpoint:
    """The safetensors files of a local checkpoint folder (sharded or not): the one reader of them.

    Headers are parsed here (so a tensor's byte range is known without loading it) and checked
    as the safetensors library checks them; a tensor is loaded with the library, one at a time.
    The encoder export reads the ``visual.*`` tensors through it (:class:`CheckpointWeights`),
    the package its token-embedding table."""

    def __init__(self, checkpoint_dir: str | Path):
        self.dir = Path(checkpoint_dir)
        self._headers: dict[Path, tuple[dict, int]] = {}
        self._handles: dict[Path, object] = {}

    def files(self, prefixes: tuple[str, ...] = ()) -> list[Path]:
        """The files holding tensors whose names start with one of ``prefixes`` (all when none),
        as the index names them, else every ``*.safetensors`` file."""
        index = self.dir / "model.safetensors.index.json"
        if index.is_file():
            try:
                wm = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise BadInput(f"{index}: not a valid safetensors index ({e})") from None
            names = sorted({v for k, v in wm.items() if k.startswith(prefixes)})
            files = [self.dir / n for n in names]
            for f in files:
                if not f.is_file():
                    raise BadInput(f"{f}: shard named in the index is missing")
            if files:
                return files
        files = sorted(self.dir.glob("*.safetensors"))
        if not files:
            raise BadInput(f"{self.dir}: no *.safetensors files; save the checkpoint with safe_serialization=True")
        return files

    def header(self, path: Path) -> tuple[dict, int]:
        """A file's tensor entries (name -> dtype, shape, data_offsets) and the offset its data starts at."""
        if path not in self._headers:
            try:
                self._headers[path] = _read_header(path)
            except (OSError, ValueError, TypeError, KeyError, struct.error) as e:
                raise BadInput(f"{path}: not a readable safetensors file ({str(e)[:100]})") from None
        return self._headers[path]

    def find(self, keys: tuple[str, ...]) -> tuple[Path, str] | None:
        """The first file, and the first of ``keys`` in it, holding one of ``keys``."""
        for f in self.files():
            header = self.header(f)[0]
            for key in keys:
                if key in header:
                    return f, key
        return None

    def tensor(self, path: Path, key: str):
        """One tensor, as the torch tensor the safetensors library loads."""
        from safetensors import safe_open
        h = self._handles.get(path)
        if h is None:
            h = self._handles[path] = safe_open(str(path), framework="pt")
        return h.get_tensor(key)

    def fp32_source(self, path: Path, key: str) -> FileRange | Computed:
        """Where a tensor's bytes come from as float32: an F32 tensor is referenced where it lies
        in the file (no copy in memory); another float dtype is converted when it is written."""
        header, base = self.header(path)
        entry = header[key]
        start, end = (int(x) for x in entry["data_offsets"])
        if entry["dtype"] == "F32":
            return FileRange(path, base + start, end - start)
        nbytes = 4 * int(np.prod(entry["shape"], dtype=np.int64))
        return Computed(lambda: self.tensor(path, key).float().numpy(), nbytes)


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file without ``__metadata__``, and its data offset;
    ValueError unless the entries tile the data exactly, each the size its shape and dtype give."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > 100 << 20:
            raise ValueError(f"header length {n}")
        header = json.loads(fh.read(n))
    if not isinstance(header, dict):
        raise ValueError("header is not a JSON object")
    header.pop("__metadata__", None)
    data_size = path.stat().st_size - 8 - n
    at = 0
    for key, e in sorted(header.items(), key=lambda kv: list(kv[1]["data_offsets"])):
        start, end = (int(x) for x in e["data_offsets"])
        size = _DTYPE_BYTES.get(e["dtype"])
        if start != at or (size is not None and end - start != size * int(np.prod(e["shape"], dtype=np.int64))):
            raise ValueError(f"{key}: data_offsets {[start, end]} do not fit its dtype and shape")
        at = end
    if at != data_size:
        raise ValueError(f"the tensors take {at} bytes, the file holds {data_size}")
    return header, 8 + n


class CheckpointWeights(WeightSource):
    """``visual.*`` tensors of a local transformers checkpoint (safetensors, sharded or not).

    Only the safetensors headers and the vision tensors are read; the language model is
    neither built nor loaded.
    """

    def __init__(self, checkpoint_dir: str | Path):
        checkpoint_dir = Path(checkpoint_dir)
        super().__init__(read_checkpoint_config(checkpoint_dir))
        self.dir = checkpoint_dir
        self.description = f"checkpoint {checkpoint_dir}"
        self.checkpoint = SafetensorsCheckpoint(checkpoint_dir)
        self.location: dict[str, tuple[Path, str]] = {}
        for f in self.checkpoint.files(CHECKPOINT_PREFIXES):
            for k in self.checkpoint.header(f)[0]:
                for p in CHECKPOINT_PREFIXES:
                    if k.startswith(p):
                        self.location[k[len(p):]] = (f, k)
        missing = [k for k in self.shapes if k not in self.location]
        if len(missing) == len(self.shapes):
            raise BadInput(f"{checkpoint_dir}: no vision-tower weights (visual.*) in its safetensors files; "
                           "pass a Qwen2.5-VL checkpoint directory")
        if missing:
            raise BadInput(f"{checkpoint_dir}: {len(missing)} vision weights are missing, e.g. visual.{missing[0]}; "
                           "the checkpoint is incomplete or of another architecture")

    def array(self, name: str) -> np.ndarray:
        f, key = self.location[name]
        t = self.checkpoint.tensor(f, key)
        if tuple(t.shape) != self.shapes[name]:
            raise BadInput(f"{f}: {key} has shape {tuple(t.shape)}, the config says {self.shapes[name]}")
        return t.float().numpy()
