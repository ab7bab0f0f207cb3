"""``qvl-surgery package``: a folder a runtime loads as it is (onnxruntime-genai)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import Command, WriteArgs, kwargs_source, print_report, py


class Package(Command):
    """a folder a runtime loads as it is (onnxruntime-genai: vision, embedding and text models,
    configs, tokenizer)"""
    example = "qvl-surgery package ~/Qwen2.5-VL-3B-Instruct --runtime onnxruntime-genai -o out/genai"
    write = WriteArgs("output folder", model=False)
    after = (write,)

    def add_arguments(self, pk: argparse.ArgumentParser) -> None:
        pk.add_argument("checkpoint", type=Path, help="local Qwen2.5-VL checkpoint directory (only read)")
        pk.add_argument("--runtime", default="onnxruntime-genai", choices=["onnxruntime-genai"],
                        help="the runtime to package for (default onnxruntime-genai)")
        pk.add_argument("--passes", help="passes for the vision model (the dynamic export), e.g. simplify")
        pk.add_argument("--fp16", action="store_true", help="fp16 models (refused for onnxruntime-genai's CPU build)")
        pk.add_argument("--builder-python", type=Path, help="a Python that imports onnxruntime-genai's model builder "
                        "(default: its own virtualenv in ~/.cache/qvl-surgery, made on first use)")

    def _options(self, a: argparse.Namespace) -> dict:
        return {"runtime": a.runtime, "fp16": a.fp16, "passes": a.passes, "builder_python": a.builder_python,
                **self.write.values(a)}

    def run(self, a: argparse.Namespace) -> int:
        from qvl_surgery.app.package import package
        report = package(a.checkpoint, a.output, **self._options(a))
        print("\n".join(report.lines()))
        return 0

    def script(self, a: argparse.Namespace) -> list[str]:
        return ["from qvl_surgery.app.package import package",
                f"report = package({py(a.checkpoint)}, {py(a.output)}, {kwargs_source(self._options(a))})",
                print_report()]
