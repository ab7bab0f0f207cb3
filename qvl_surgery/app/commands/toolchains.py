"""``qvl-surgery toolchains``: one keep-list, every quantizer's config (onnxruntime, NNCF,
rknn-toolkit2, pulsar2) and their calibration sets."""
from __future__ import annotations

import argparse
from pathlib import Path

from qvl_surgery.core.errors import BadInput

from .args import Command, ModelArgs, SchemeArgs, WriteArgs, print_report, py


class Toolchains(Command):
    """one keep-list, every quantizer's config: onnxruntime nodes_to_exclude, NNCF IgnoredScope,
    rknn-toolkit2 hybrid layers, pulsar2 layer_configs, and their calibration sets"""
    example = ("qvl-surgery quantize out/smoothed.onnx -o out/q.onnx --activations int8 --format onnxruntime "
               "--budget 0.9995\n"
               "  qvl-surgery toolchains out/smoothed.onnx --keep-from out/q.onnx --dataset a.jpg,b.jpg -o out/configs\n"
               "  qvl-surgery toolchains out/model.onnx --keep-node '/merger/*' -o out/configs")
    model = ModelArgs(help="the fp32 model the toolchain will quantize (export, or smoothed / rotated)")
    scheme = SchemeArgs("scheme for --budget (as quantize; default w8a8 dynamic, format onnxruntime)")
    write = WriteArgs("output folder", model=False)
    after = (scheme, write)

    def add_arguments(self, tc: argparse.ArgumentParser) -> None:
        self.model.add(tc)
        way = tc.add_argument_group("where the keep-list comes from (one of)")
        way.add_argument("--keep-from", type=Path, metavar="QUANTIZED", help="a file written by qvl-surgery quantize "
                         "(e.g. with --budget): what it kept; or a keep.json written here before")
        way.add_argument("--budget", type=float, metavar="COSINE", help="measure now: quantize --budget's allocation "
                         "with the scheme below")
        way.add_argument("--keep-node", action="append", metavar="GLOB", help="linears by node name (repeatable)")
        way.add_argument("--keep-block", action="append", metavar="N", help="every linear of block N (repeatable)")
        tc.add_argument("--dataset", metavar="FILES", help="image or .npz file(s), comma separated: written as rknn's "
                        "dataset.txt of .npy files and pulsar2's tar of .npy, in the model's input layout")
        tc.add_argument("--rknn-step1", type=Path, metavar="DIR", help="the folder where rknn-toolkit2's "
                        "hybrid_quantization_step1 ran on MODEL (its .model and .quantization.cfg): writes "
                        "rknn.quantization.cfg with the kept layers and the residual stream (residual Adds, RMSNorms) "
                        "at 16 bits (--rknn-dtype), for hybrid_quantization_step2")
        tc.add_argument("--rknn-dtype", choices=("int16", "float16"), default="int16", help="the 16-bit type of the "
                        "rknn hybrid config's kept layers (default int16: in rknn-toolkit2 2.5.0's rk3588 simulator the "
                        "tiny outlier stand-in reaches 0.998 centered on photos, 0.966 in float16, which keeps ~11 bits)")
        tc.add_argument("--rknn-residual-int8", action="store_true", help="with --rknn-step1: leave the residual "
                        "stream int8 (only the kept linears at 16 bits)")

    def _checked(self, a: argparse.Namespace):
        """The arguments checked, in the order the command checks them: what the output must not
        touch, the scheme (with --budget), the dataset."""
        from qvl_surgery.core.inputs import InputSource
        ways = [x for x in (a.keep_from, a.budget, a.keep_node or a.keep_block or None) if x is not None]
        if len(ways) != 1:
            raise BadInput("toolchains: give one of --keep-from QUANTIZED.onnx, --budget COSINE, or --keep-node / "
                           "--keep-block")
        if a.rknn_residual_int8 and a.rknn_step1 is None:
            raise BadInput("--rknn-residual-int8: applies to the cfg written with --rknn-step1 DIR; add it or drop this")
        scheme_given = self.scheme.given(a)
        if scheme_given and a.budget is None:
            raise BadInput(f"{scheme_given[0]}: the scheme options apply to --budget (the measurement); drop them")
        for flag, path in (("--keep-from", a.keep_from), ("--rknn-step1", a.rknn_step1)):
            if path is not None and not path.exists():
                raise BadInput(f"{flag} {path}: no such file or folder")
        guard = self.model.guard(a) + [p for p in (a.keep_from, a.rknn_step1) if p is not None]
        scheme = self.scheme.values(a, a.budget) if a.budget is not None else None
        dataset_source = InputSource.parse(a.dataset, "dataset", random_ok=False) if a.dataset else None
        if dataset_source:
            guard += [Path(f) for f in dataset_source.files]
        if scheme and scheme["calibrate"]:
            guard += [Path(f) for f in InputSource.parse(scheme["calibrate"], "calibrate").files]
        return guard, scheme, dataset_source

    def _configs(self, a: argparse.Namespace) -> dict:
        """write_toolchain_configs()'s keywords from the command line (besides the dataset and guard)."""
        return {"rknn_step1": a.rknn_step1, "rknn_residual": not a.rknn_residual_int8, "rknn_dtype": a.rknn_dtype,
                "overwrite": a.force}

    def run(self, a: argparse.Namespace) -> int:
        from qvl_surgery.analysis.toolchains import (allocation_by_hand, allocation_from_budget,
                                                     allocation_from_quantized, write_toolchain_configs)
        from qvl_surgery.core.modelfile import load_model
        from qvl_surgery.core.publish import check_new_dir
        guard, scheme, dataset_source = self._checked(a)
        check_new_dir(a.output, overwrite=a.force, inputs=guard)
        model = load_model(a.model)
        dataset = dataset_source.sets(a.model) if dataset_source else None   # checked before the measurement
        if a.keep_from is not None:
            alloc = allocation_from_quantized(a.keep_from, model)
        elif a.budget is not None:
            alloc = allocation_from_budget(model, a.budget, scheme, progress=not a.quiet)
        else:
            alloc = allocation_by_hand(model, a.keep_node or [], a.keep_block or [])
        report = write_toolchain_configs(a.model, a.output, alloc, dataset=dataset, inputs=guard, **self._configs(a))
        print("\n".join(report.lines()))
        return 0

    def script(self, a: argparse.Namespace) -> list[str]:
        guard, scheme, _ = self._checked(a)
        lines = ["from qvl_surgery.analysis.toolchains import write_toolchain_configs",
                 "from qvl_surgery.core.modelfile import load_model", f"model = load_model({py(a.model)})"]
        if a.keep_from is not None:
            lines += ["from qvl_surgery.analysis.toolchains import allocation_from_quantized",
                      f"alloc = allocation_from_quantized({py(a.keep_from)}, model)"]
        elif a.budget is not None:
            lines += ["from qvl_surgery.analysis.toolchains import allocation_from_budget",
                      f"alloc = allocation_from_budget(model, {a.budget!r}, {py(scheme)}, progress={not a.quiet})"]
        else:
            lines += ["from qvl_surgery.analysis.toolchains import allocation_by_hand",
                      f"alloc = allocation_by_hand(model, {py(a.keep_node or [])}, {py(a.keep_block or [])})"]
        dataset = "None"
        if a.dataset:
            lines += ["from qvl_surgery.core.inputs import InputSource",
                      f"dataset = InputSource.parse({a.dataset!r}, 'dataset', random_ok=False).sets({py(a.model)})"]
            dataset = "dataset"
        configs = ", ".join(f"{k}={py(v)}" for k, v in self._configs(a).items())
        return lines + [f"report = write_toolchain_configs({py(a.model)}, {py(a.output)}, alloc, dataset={dataset}, "
                        f"inputs={py(guard)}, {configs})", print_report()]
