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
- ``nncf_ignored_scope.json``: ``{"names": [...]}`` for ``nncf.IgnoredScope(**json.load(f))`` on the
  ONNX model (NNCF's ONNX backend matches node names exactly, and refuses an unknown one);
  ``nncf_ignored_scope_openvino.json`` for the model after ``ov.convert_model``, which splits a Gemm
  ``X`` into a MatMul ``X/WithoutBiases`` and a bias Add ``X`` (nncf 3.4: the plain names match the
  Adds and leave every MatMul quantized). Quantize with ``model_type=nncf.ModelType.TRANSFORMER``:
  the default type also quantizes the residual and RMSNorm path, where the outliers live;
- ``rknn_hybrid.json`` (and with ``rknn_step1``, ``rknn.quantization.cfg``): rknn-toolkit2's hybrid
  quantization: the kept linears and the residual stream (residual Adds, RMSNorms: rknn quantizes
  every activation) at 16 bits, named as rknn's own step-1 graph names them, in the
  ``custom_quantize_layers`` of the cfg its ``hybrid_quantization_step1`` wrote. The 16 bits are
  int16 (``rknn_dtype``; float16 on request): measured in rknn-toolkit2 2.5.0's rk3588 simulator on
  the tiny outlier stand-in (photos), float16 keeps ~11 bits of a value, and the merger's first
  linear carries a per-channel constant of up to 0.85 over an image-dependent part of std 5e-4:
  with the merger and the residual stream in float16, 0.966 centered (rknn's own all-float16 build:
  0.967), in int16 0.998;
- ``pulsar2_config.json``: a pulsar2 build config (``quant.layer_configs``: the kept layers at U16
  activations, every other layer the default U8; ``quant.input_configs``: the calibration tar);
- with a dataset: ``calib/rknn/dataset.txt`` (one line per sample: the sample's .npy per model input,
  space separated, in rknn's input order) and ``calib/pulsar2/<input>.tar`` (one .npy per sample), each
  array in the model's own input layout (a static export: ``pixel_values`` [patches, 1176]); for an
  image-in export, each sample as the PNG picture it is, and the configs say mean 0 / std 1 (the
  normalization is in the graph) and that rknn's runtime feeds the uint8 NHWC image.
"""
from __future__ import annotations

import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

import numpy as np

from qvl_surgery.core.errors import BadInput
from qvl_surgery.core.imagein import layout_of, toolchain_mean_std
from qvl_surgery.core.linears import block_numbers, find_linears, kept_share, select_kept
from qvl_surgery.core.modelfile import Model, load_model, read_initializer

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
    ``path``'s metadata, or in a ``keep.json`` this module wrote; checked against ``model``'s linears."""
    from qvl_surgery.core.signature import head_model
    if Path(path).suffix == ".json":
        try:
            rec = json.loads(Path(path).read_text())
            kept = dict(rec["kept"])
        except (OSError, ValueError, KeyError, TypeError):
            raise BadInput(f"{path}: not a keep.json written by qvl-surgery toolchains (no 'kept' mapping)") from None
        return allocation_of(model, kept, f"{rec.get('source', 'a keep-list')} (from {path})",
                        {k: v for k, v in rec.items() if k == "budget"})
    raw = head_model(Path(path)).metadata().get("qvl_surgery.quantize")
    if not raw:
        raise BadInput(f"{path}: no qvl_surgery.quantize metadata; --keep-from takes a file written by "
                       "qvl-surgery quantize")
    rec = json.loads(raw)
    return allocation_of(model, dict(rec.get("kept") or {}), f"kept by quantize in {path} ({rec.get('scheme')})",
                    {"budget": rec["budget"]} if rec.get("budget") else {})


def allocation_by_hand(model: Model, keep_node: list[str], keep_block: list[str]) -> Allocation:
    """The linears matching ``keep_node`` globs or in ``keep_block`` blocks (as quantize selects them)."""
    kept = select_kept(find_linears(model, []), keep_nodes=keep_node, keep_blocks=block_numbers(keep_block))
    return allocation_of(model, kept, "given by hand")


def allocation_of(model: Model, kept: dict[str, str], source: str, extra: dict | None = None) -> Allocation:
    """``kept`` (linear -> why) checked against ``model``'s linears, with its share of their work."""
    linears = find_linears(model, [])
    names = {lin.name for lin in linears}
    missing = [n for n in kept if n not in names]
    if missing:
        raise BadInput(f"the keep-list names {missing[0]!r}, which is not a linear layer of this model ({len(missing)} "
                       "such); give the fp32 file that was quantized (or its smoothed / rotated form)")
    share, by = kept_share(model, linears, kept)
    return Allocation(kept, source, share, by, extra or {})


def allocation_from_budget(model, budget: float, scheme: dict, *, progress: bool = False):
    """The keep-list quantize --budget ``budget`` chooses under ``scheme`` (quantize's scheme
    options), measured now, as an :class:`~qvl_surgery.analysis.toolchains.Allocation`."""
    from passes.quantize import quantize_model
    _, report = quantize_model(model, budget=budget, progress=progress, **scheme)
    kept = {n: why for why, names in report.kept.items() for n in names}
    where = scheme.get("target") or "onnxruntime"
    where = report.format if where == "onnxruntime" else f"measured in {where}'s arithmetic"
    return allocation_of(model, kept, f"quantize --budget {budget} ({report.scheme}, {where})",
                         {"budget": report.budget})


# ----------------------------------------------------------------------------- rknn-toolkit2
# rknn-toolkit2 (2.5.0) names the layers of its hybrid config after the tensors of its own rewritten
# graph, which hybrid_quantization_step1 writes as ``<stem>.model`` (an ONNX protobuf, weights inline):
# a Gemm ``X`` becomes a Conv ``X#N`` whose output is ``<X's output>_mm``; the qkv Gemm of a
# full-attention block is split into three Convs named after their input (their weights are row blocks
# of ours, the norm's scale folded in per input channel). An unknown name in custom_quantize_layers
# is an error there, so every name written here comes from that file.

MOVE_OPS = {"Reshape", "Transpose", "Gather", "exDataConvert", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


def _same_up_to_input_scale(a: np.ndarray, b: np.ndarray) -> bool:
    """``a == b @ diag(g)`` for some ``g``: every input column of ``a`` parallel to ``b``'s."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    na, nb = np.linalg.norm(a, axis=0), np.linalg.norm(b, axis=0)
    ok = (na > 0) & (nb > 0)
    return bool(ok.any()) and bool((np.abs((a[:, ok] * b[:, ok]).sum(0)) / (na[ok] * nb[ok])).min() > 0.99999)


def rknn_linear_tensors(rk, model: Model, kept: dict[str, str]) -> dict[str, list[str]]:
    """For each kept linear (our node name), the output tensors of its layer(s) in rknn's graph ``rk``."""
    from onnx import numpy_helper
    ours = {n.name or n.output[0]: n for n in model.graph.node}
    linears = {lin.name: lin for lin in find_linears(model, [])}
    rk_inits = {t.name: t for t in rk.graph.initializer}
    found: dict[str, list[str]] = {}
    for name in kept:
        n = ours[name]
        hits = [r for r in rk.graph.node if r.name == name or r.name.startswith((name + "#", name + "_2"))]
        if not hits:
            hits = [r for r in rk.graph.node if n.input[1] in r.input]
        if not hits:
            lin = linears[name]
            w = read_initializer(model.initializers()[lin.weight], model.sources.get(lin.weight))
            w = w if lin.out_in else w.T          # [out, in]
            for r in rk.graph.node:
                t = rk_inits.get(r.input[1]) if r.op_type == "Conv" and len(r.input) > 1 else None
                if t is None or not (t.raw_data or t.float_data):
                    continue
                rw = numpy_helper.to_array(t)
                rw = rw.reshape(rw.shape[0], -1)
                if rw.shape[1] != w.shape[1] or w.shape[0] % rw.shape[0]:
                    continue
                if any(_same_up_to_input_scale(rw, w[k:k + rw.shape[0]]) for k in range(0, w.shape[0], rw.shape[0])):
                    hits.append(r)
        if not hits:
            raise BadInput(f"rknn-toolkit2's graph has no layer for {name!r}; was step 1 run on this model?")
        found[name] = [o for r in hits for o in r.output]
    return found


def rknn_residual_tensors(rk, model: Model) -> dict[str, list[str]]:
    """The residual stream in rknn's graph ``rk``: the output of each residual Add (an Add whose
    output an RMSNorm reads: rknn keeps our node's name) and of each RMSNorm (rknn fuses the pattern,
    and smooth's Sub after it, into one exNorm named after our ReduceMean plus a suffix). Measured on
    the tiny outlier stand-in (rknn-toolkit2 2.5.0): with these at 16 bits the residual's ~1e3
    channels stop setting an int8 step of ~4 that erases everything else."""
    from qvl_surgery.core.patterns import rmsnorm_patterns
    norms = rmsnorm_patterns(model)
    rk_by_name = {r.name: r for r in rk.graph.node}
    ours = {o: n for n in model.graph.node for o in n.output}
    found: dict[str, list[str]] = {}
    for nodes in norms:
        x = nodes[0].input[0]
        add = ours.get(x)
        if add is not None and add.op_type == "Add" and add.name in rk_by_name:
            found.setdefault(add.name, list(rk_by_name[add.name].output))
        rm = next(n for n in nodes if n.op_type == "ReduceMean")
        fused = [r for r in rk.graph.node if r.name.startswith(rm.name + "_") and r.op_type == "exNorm"]
        if fused:
            found[rm.name] = [o for r in fused for o in r.output]
    return found


def _cfg_dtypes(cfg_text: str) -> dict[str, str]:
    """quantize_parameters' tensor -> dtype in a step-1 cfg (YAML, read by its fixed layout)."""
    out, key, inside = {}, None, False
    for line in cfg_text.splitlines():
        if not line.startswith(" "):
            inside = line.strip() == "quantize_parameters:"
            continue
        if not inside:
            continue
        if line.startswith("    ") and not line.startswith("     ") and line.rstrip().endswith(":"):
            key = line.strip()[:-1].strip("'\"")
        elif key and line.strip().startswith("dtype:"):
            out[key] = line.split(":", 1)[1].strip()
    return out


def rknn_input_chains(rk, dtypes: dict[str, str], layers: dict[str, list[str]]) -> list[str]:
    """For the layers set to 16 bits, the int8 tensors that carry their input from the last compute
    layer before them through data movement only (Reshape, Transpose, ...), and that layer's output:
    a 16-bit layer fed an int8 tensor still sees the int8 rounding (measured: the tiny outlier
    stand-in's merger kept float16 behind an int8 Reshape stays at 0.10 centered; with its input
    chain float16, 0.46)."""
    prod = {o: n for n in rk.graph.node for o in n.output}
    chain: list[str] = []
    for outs in layers.values():
        for o in outs:
            node = prod.get(o)
            todo = [node.input[0]] if node is not None and node.input else []
            while todo:
                t = todo.pop()
                if dtypes.get(t) == "int8":
                    chain.append(t)
                n = prod.get(t)
                if n is not None and n.op_type in MOVE_OPS and n.input:
                    todo.append(n.input[0])
    return list(dict.fromkeys(chain))


def rknn_output_tail(rk, dtypes: dict[str, str]) -> tuple[list[str], set[str]]:
    """The int8 tensors between rknn's last compute layers and the graph outputs (data movement only),
    and those last layers' outputs: a 16-bit last layer still hands its result to an int8 output
    unless its tail is 16-bit too."""
    prod = {o: n for n in rk.graph.node for o in n.output}
    tail, heads, todo = [], set(), [o.name for o in rk.graph.output]
    while todo:
        t = todo.pop()
        n = prod.get(t)
        if n is None or n.op_type not in MOVE_OPS:
            heads.add(t)
            continue
        if dtypes.get(t) == "int8":
            tail.append(t)
        todo.extend(n.input[:1])
    return tail, heads


def rknn_hybrid_cfg(step1_dir: str | Path, model: Model, kept: dict[str, str], *, residual: bool = True,
                    dtype: str = "int16") -> tuple[str, dict]:
    """The step-1 cfg in ``step1_dir`` with the kept linears' layers (with the data movement feeding
    them, and the output tail after the last one when it is kept) set to ``dtype`` (int16 or
    float16), and with
    ``residual`` the residual stream too (the
    residual Adds and the RMSNorms: rknn quantizes every activation, not only the linears' inputs);
    and what was set, per linear / residual node."""
    import onnx
    d = Path(step1_dir)
    models, cfgs = sorted(d.glob("*.model")), sorted(d.glob("*.quantization.cfg"))
    if len(models) != 1 or len(cfgs) != 1:
        raise BadInput(f"{d}: expected one <name>.model and one <name>.quantization.cfg (rknn-toolkit2's "
                       "hybrid_quantization_step1 writes them into its working directory)")
    try:
        rk = onnx.load(str(models[0]))
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: not rknn's step-1 graph
        raise BadInput(f"{models[0]}: not a readable rknn step-1 model ({type(e).__name__}); run "
                       "hybrid_quantization_step1 on MODEL again") from None
    cfg = cfgs[0].read_text()
    dtypes = _cfg_dtypes(cfg)
    by_linear = rknn_linear_tensors(rk, model, kept)
    by_residual = rknn_residual_tensors(rk, model) if residual else {}
    layers = [t for ts in [*by_linear.values(), *by_residual.values()] for t in ts]
    tail, heads = rknn_output_tail(rk, dtypes)
    tail = tail if heads & set(layers) else []
    inputs = rknn_input_chains(rk, dtypes, by_linear)
    layers += tail + inputs
    unknown = [t for t in layers if t not in dtypes]
    if unknown:
        raise BadInput(f"{cfgs[0]}: no entry for rknn tensor {unknown[0]!r}; the cfg and the .model come from "
                       "different step-1 runs?")
    return edit_rknn_cfg(cfg, list(dict.fromkeys(layers)), dtype), {"linears": by_linear, "residual": by_residual,
                                                           "output_tail": tail, "input_chains": inputs}


def edit_rknn_cfg(cfg_text: str, layers: list[str], dtype: str = "int16") -> str:
    """rknn-toolkit2's ``.quantization.cfg`` (written by ``hybrid_quantization_step1``) with
    ``layers`` set to ``dtype`` under ``custom_quantize_layers``; every other line kept."""
    lines = cfg_text.splitlines()
    entries = [f"    {json.dumps(layer)}: {dtype}" for layer in layers]
    for i, line in enumerate(lines):
        if line.strip().startswith("custom_quantize_layers:"):
            if line.strip() == "custom_quantize_layers: {}":
                lines[i] = "custom_quantize_layers:" if entries else line
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


def _hwc_uint8(a: np.ndarray, layout: str) -> np.ndarray:
    """An image-in model's input array back as the uint8 ``[H, W, 3]`` picture it was made from."""
    a = np.asarray(a)[0]
    if layout == "nhwc":
        return np.asarray(a, np.uint8)
    mean, std = toolchain_mean_std(layout)            # undo a normalized layout's normalization
    a = a.transpose(1, 2, 0) * np.asarray(std, np.float32) + np.asarray(mean, np.float32)
    return np.asarray(np.clip(np.rint(a), 0, 255), np.uint8)


def _png_bytes(picture: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(picture).save(buf, format="PNG")
    return buf.getvalue()


def write_datasets(root: Path, sets: list[dict[str, np.ndarray]], input_names: list[str],
                   image_layout: str | None = None) -> dict[str, str]:
    """rknn's dataset list and pulsar2's tars from the input sets, each array as the model takes it;
    for an image-in model (``image_layout``), each set as the PNG picture it is (the toolchains read
    images and apply their mean/std, here 0 and 1)."""
    rk = root / "calib" / "rknn"
    rk.mkdir(parents=True)
    lines = []
    for i, feeds in enumerate(sets):
        paths = []
        for name in input_names:
            if image_layout:
                p = rk / f"{i:04d}_{_safe(name)}.png"
                p.write_bytes(_png_bytes(_hwc_uint8(feeds[name], image_layout)))
            else:
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
                if image_layout:
                    data, suffix = _png_bytes(_hwc_uint8(feeds[name], image_layout)), "png"
                else:
                    data, suffix = _npy_bytes(np.asarray(feeds[name])), "npy"
                info = tarfile.TarInfo(f"{i:04d}.{suffix}")
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
                            dataset: list[dict[str, np.ndarray]] | None = None, rknn_step1: str | Path | None = None,
                            rknn_residual: bool = True, rknn_dtype: str = "int16", overwrite: bool = False,
                            inputs: Iterable[Path] = ()) -> ToolchainReport:
    """``inputs``: files the command read besides the model (never overwritten or enclosed)."""
    from qvl_surgery.core.publish import check_new_dir, publish_dir, staging
    model_path, out = Path(model_path), Path(out_dir)
    model = load_model(model_path)
    guard = [model_path, *sorted(model.data_files()), *inputs] + ([Path(rknn_step1)] if rknn_step1 else [])
    check_new_dir(out, overwrite=overwrite, inputs=guard)
    inits = model.initializers()
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    nodes = list(allocation.kept)
    ops = {n.name or n.output[0]: n.op_type for n in model.graph.node}
    ort_nodes = nodes + [f"{n}_MatMul" for n in nodes if ops.get(n) == "Gemm"]
    model_ref = str(model_path.resolve())
    rknn_cfg = rknn_set = None
    if rknn_step1 is not None:
        rknn_cfg, rknn_set = rknn_hybrid_cfg(rknn_step1, model, allocation.kept, residual=rknn_residual,
                                             dtype=rknn_dtype)
    with staging(out) as tmp:
        files = {
            "keep.json": {"model": model_ref, **allocation.to_dict()},
            "onnxruntime.json": {"nodes_to_exclude": ort_nodes},
            "nncf_ignored_scope.json": {"names": nodes},
            "nncf_ignored_scope_openvino.json": {"names": [f"{n}/WithoutBiases" if ops.get(n) == "Gemm" else n
                                                           for n in nodes]},
            "rknn_hybrid.json": {"model": model_ref, rknn_dtype: nodes,
                                 "how": "rknn's names for these layers exist only after its hybrid_quantization_step1: "
                                        "run it (dataset: calib/rknn/dataset.txt), then qvl-surgery toolchains MODEL "
                                        "--keep-from keep.json --rknn-step1 ITS_FOLDER -o DIR writes "
                                        "DIR/rknn.quantization.cfg for hybrid_quantization_step2"},
        }
        layout = layout_of(model.metadata())
        if layout:   # normalization inside the graph (the toolchains' own: the identity), or theirs to do
            mean, std = toolchain_mean_std(layout)
            files["rknn_hybrid.json"]["config"] = {"mean_values": [mean], "std_values": [std]}
            files["rknn_hybrid.json"]["runtime_input"] = "uint8 NHWC [1, H, W, 3]: the resized RGB image"
        written = {}
        if dataset:
            written = write_datasets(tmp, dataset, inputs, layout)
        quant: dict = {"layer_configs": ([{"layer_names": nodes, "data_type": PULSAR2_KEPT_DTYPE}] if nodes else []),
                       "calibration_method": "MinMax"}
        if dataset:
            quant["input_configs"] = [{"tensor_name": name, "calibration_dataset": written[f"pulsar2:{name}"],
                                       "calibration_format": "Image" if layout else "Numpy",
                                       "calibration_size": len(dataset),
                                       **({"calibration_mean": toolchain_mean_std(layout)[0],
                                           "calibration_std": toolchain_mean_std(layout)[1]} if layout else {})}
                                      for name in inputs]
        files["pulsar2_config.json"] = {"input": model_ref, "output_dir": "pulsar2_out", "model_type": "ONNX",
                                        "quant": quant}
        if dataset:
            files["rknn_hybrid.json"]["dataset"] = written["rknn"]
        if rknn_cfg is not None:
            files["rknn_hybrid.json"].update(rknn_set)
            (tmp / "rknn.quantization.cfg").write_text(rknn_cfg)
        for name, doc in files.items():
            (tmp / name).write_text(json.dumps(doc, indent=1) + "\n")
        listed = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file()
                        and not (p.suffix in (".npy", ".png") and p.parent.name == "rknn"))
        for suffix, what in ((".npy", "arrays"), (".png", "images")):
            count = sum(1 for _ in (tmp / "calib" / "rknn").glob(f"*{suffix}")) if dataset else 0
            if count:
                listed.append(f"calib/rknn/*{suffix} ({count} {what})")
        publish_dir(tmp, out, "toolchains")
    return ToolchainReport(out, allocation, listed, len(dataset or []))
