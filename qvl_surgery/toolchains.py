"""One keep-list, every quantizer's config: the linears a measurement says to keep above 8 bits,
written in the form each toolchain reads, beside the calibration set it expects.

The keep-list (an :class:`Allocation`) comes from ``quantize --budget``'s output (its
``qvl_surgery.quantize`` metadata records what it kept and why), from the budget measured here, or
from node globs / block numbers given by hand. The model the configs name is the fp32 file the
toolchain quantizes (the export, or its smoothed / rotated form): the kept linears' node names are
the same in it and in the quantized file.

Written into one folder (published whole: an interrupted write leaves nothing):

- ``keep.json``: the allocation (linear -> why), its share of the linears' multiply-adds, where it came from;
- ``onnxruntime.json``: ``{"nodes_to_exclude": [...]}`` for ``quantize_static`` / ``quantize_dynamic``
  (``**json.load(f)``). onnxruntime matches node names, but ``quantize_dynamic`` first rewrites every
  Gemm into MatMul + Add named ``<gemm>_MatMul`` / ``<gemm>_Add`` and matches those (onnxruntime 1.32,
  ``ONNXModel.replace_gemm_with_matmul``): each kept Gemm is listed under both names;
- ``nncf_ignored_scope.json``: ``{"names": [...]}`` for ``nncf.IgnoredScope(**json.load(f))``; NNCF's
  ONNX backend matches node names;
- ``rknn_hybrid.json``: rknn-toolkit2's hybrid quantization: the layers to set to float16 in the
  ``custom_quantize_layers`` section of the ``.quantization.cfg`` its ``hybrid_quantization_step1``
  writes (:func:`edit_rknn_cfg` does that edit);
- ``pulsar2_config.json``: a pulsar2 build config (``quant.layer_configs``: the kept layers at U16
  activations, every other layer the default U8; ``quant.input_configs``: the calibration tar);
- with a dataset: ``calib/rknn/dataset.txt`` (one line per sample: the sample's .npy per model input,
  space separated, in rknn's input order) and ``calib/pulsar2/<input>.tar`` (one .npy per sample), each
  array in the model's own input layout (a static export: ``pixel_values`` [patches, 1176]).
"""
from __future__ import annotations

import fnmatch
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import BadInput
from .linears import find_linears, kept_share
from .modelfile import Model, load_model

PULSAR2_KEPT_DTYPE = "U16"


@dataclass
class Allocation:
    kept: dict[str, str]            # linear node name -> why it stays above 8 bits
    source: str                     # where the list came from
    share: float = 0.0              # of the linears' multiply-adds (or weight size, see counted_by)
    counted_by: str = ""
    extra: dict = field(default_factory=dict)   # e.g. the budget's measurements

    def to_dict(self) -> dict:
        return {"kept": self.kept, "source": self.source, "kept_share": round(self.share, 6),
                "counted_by": self.counted_by, **self.extra}


def allocation_from_quantized(path: str | Path, model: Model) -> Allocation:
    """The keep-list recorded by ``quantize`` (``--budget``, ``--keep-node``, ``--keep-block``) in
    ``path``'s metadata, checked against ``model``'s linears."""
    from .signature import head_model
    raw = head_model(Path(path)).metadata().get("qvl_surgery.quantize")
    if not raw:
        raise BadInput(f"{path}: no qvl_surgery.quantize metadata; --keep-from takes a file written by "
                       "qvl-surgery quantize")
    rec = json.loads(raw)
    return _checked(model, dict(rec.get("kept") or {}), f"kept by quantize in {path} ({rec.get('scheme')})",
                    {"budget": rec["budget"]} if rec.get("budget") else {})


def allocation_by_hand(model: Model, keep_node: list[str], keep_block: list[int]) -> Allocation:
    linears = find_linears(model, [])
    kept: dict[str, str] = {}
    for pat in keep_node:
        hits = [lin.name for lin in linears if fnmatch.fnmatchcase(lin.name, pat)]
        if not hits:
            raise BadInput("{keep_node}: matches no linear layer", keep_node=pat)
        kept.update({h: f"node {pat}" for h in hits if h not in kept})
    for b in keep_block:
        hits = [lin.name for lin in linears if re.match(rf"^/?blocks\.{b}/", lin.name)]
        if not hits:
            raise BadInput("{keep_block}: no linear layer in block " + str(b), keep_block=b)
        kept.update({h: f"block {b}" for h in hits if h not in kept})
    return _checked(model, kept, "given by hand")


def _checked(model: Model, kept: dict[str, str], source: str, extra: dict | None = None) -> Allocation:
    linears = find_linears(model, [])
    names = {lin.name for lin in linears}
    missing = [n for n in kept if n not in names]
    if missing:
        raise BadInput(f"the keep-list names {missing[0]!r}, which is not a linear layer of this model ({len(missing)} "
                       "such); give the fp32 file that was quantized (or its smoothed / rotated form)")
    share, by = kept_share(model, linears, kept)
    return Allocation(kept, source, share, by, extra or {})


# ----------------------------------------------------------------------------- rknn-toolkit2

def rknn_layers(model: Model, kept: dict[str, str]) -> list[str]:
    """rknn-toolkit2's names for the kept linears: measured with rknn-toolkit2 2.5.0, its layer of a
    Gemm is named after the ONNX node's output tensor."""
    by_name = {n.name or n.output[0]: n for n in model.graph.node}
    return [by_name[k].output[0] for k in kept]


def edit_rknn_cfg(cfg_text: str, layers: list[str], dtype: str = "float16") -> str:
    """rknn-toolkit2's ``.quantization.cfg`` (written by ``hybrid_quantization_step1``) with
    ``layers`` set to ``dtype`` under ``custom_quantize_layers``; every other line kept."""
    lines = cfg_text.splitlines()
    entries = [f"    {json.dumps(layer)}: {dtype}" for layer in layers]
    for i, line in enumerate(lines):
        if line.strip().startswith("custom_quantize_layers:"):
            if line.strip() == "custom_quantize_layers: {}":
                lines[i] = "custom_quantize_layers:"
            j = i + 1
            while j < len(lines) and lines[j].startswith((" ", "\t")) and lines[j].strip():
                j += 1
            return "\n".join(lines[:j] + entries + lines[j:]) + "\n"
    return "\n".join(["custom_quantize_layers:", *entries, *lines]) + "\n"


# ----------------------------------------------------------------------------- calibration sets

def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, a)
    return buf.getvalue()


def write_datasets(root: Path, sets: list[dict[str, np.ndarray]], input_names: list[str]) -> dict[str, str]:
    """rknn's dataset list and pulsar2's tars from the input sets, each array as the model takes it."""
    rk = root / "calib" / "rknn"
    rk.mkdir(parents=True)
    lines = []
    for i, feeds in enumerate(sets):
        paths = []
        for name in input_names:
            p = rk / f"{i:04d}_{_safe(name)}.npy"
            np.save(p, np.asarray(feeds[name]))
            paths.append(p.name)
        lines.append(" ".join(paths))
    (rk / "dataset.txt").write_text("\n".join(lines) + "\n")
    p2 = root / "calib" / "pulsar2"
    p2.mkdir(parents=True)
    tars = {}
    for name in input_names:
        tar = p2 / f"{_safe(name)}.tar"
        with tarfile.open(tar, "w") as t:
            for i, feeds in enumerate(sets):
                data = _npy_bytes(np.asarray(feeds[name]))
                info = tarfile.TarInfo(f"{i:04d}.npy")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        tars[name] = str(tar.relative_to(root))
    return {"rknn": str((rk / "dataset.txt").relative_to(root)), **{f"pulsar2:{k}": v for k, v in tars.items()}}


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


# ----------------------------------------------------------------------------- all of it

@dataclass
class ToolchainReport:
    out_dir: Path
    allocation: Allocation
    files: list[str]
    samples: int

    def lines(self) -> list[str]:
        a = self.allocation
        out = [f"wrote {self.out_dir}: {len(a.kept)} linears kept above 8 bits "
               f"({100 * a.share:.2f}% of the linear layers' {a.counted_by}); {a.source}"]
        out += [f"  {f}" for f in self.files]
        if not self.samples:
            out.append("  no calibration set (give --dataset images or .npz files to write rknn's and pulsar2's)")
        return out


def write_toolchain_configs(model_path: str | Path, out_dir: str | Path, allocation: Allocation, *,
                            dataset: list[dict[str, np.ndarray]] | None = None, overwrite: bool = False
                            ) -> ToolchainReport:
    from .publish import publish_dir, staging
    model_path, out = Path(model_path), Path(out_dir)
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not overwrite:
        raise BadInput(f"{out}: exists and is not empty; pass " + "{overwrite} to replace it", overwrite=True)
    model = load_model(model_path)
    inits = model.initializers()
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    nodes = list(allocation.kept)
    ops = {n.name or n.output[0]: n.op_type for n in model.graph.node}
    ort_nodes = nodes + [f"{n}_MatMul" for n in nodes if ops.get(n) == "Gemm"]
    layers = rknn_layers(model, allocation.kept)
    model_ref = str(model_path.resolve())
    with staging(out) as tmp:
        files = {
            "keep.json": {"model": model_ref, **allocation.to_dict()},
            "onnxruntime.json": {"nodes_to_exclude": ort_nodes},
            "nncf_ignored_scope.json": {"names": nodes},
            "rknn_hybrid.json": {"model": model_ref, "custom_quantize_layers": {l: "float16" for l in layers},
                                 "how": "rknn.hybrid_quantization_step1(dataset=...), then set these layers in the "
                                        "written .quantization.cfg (qvl_surgery.toolchains.edit_rknn_cfg), then "
                                        "hybrid_quantization_step2"},
        }
        written = {}
        if dataset:
            written = write_datasets(tmp, dataset, inputs)
        quant: dict = {"layer_configs": ([{"layer_names": nodes, "data_type": PULSAR2_KEPT_DTYPE}] if nodes else []),
                       "calibration_method": "MinMax"}
        if dataset:
            quant["input_configs"] = [{"tensor_name": name, "calibration_dataset": written[f"pulsar2:{name}"],
                                       "calibration_format": "Numpy", "calibration_size": len(dataset)}
                                      for name in inputs]
        files["pulsar2_config.json"] = {"input": model_ref, "output_dir": "pulsar2_out", "model_type": "ONNX",
                                        "quant": quant}
        if dataset:
            files["rknn_hybrid.json"]["dataset"] = written["rknn"]
        for name, doc in files.items():
            (tmp / name).write_text(json.dumps(doc, indent=1) + "\n")
        listed = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.suffix != ".npy")
        npys = sum(1 for _ in tmp.rglob("*.npy"))
        if npys:
            listed.append(f"calib/rknn/*.npy ({npys} arrays)")
        publish_dir(tmp, out)
    return ToolchainReport(out, allocation, listed, len(dataset or []))
