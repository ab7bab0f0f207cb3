"""``qvl-surgery export``: the fp32 encoder from a checkpoint or a preset with random weights."""
from __future__ import annotations

import argparse

from qvl_surgery.core.errors import BadInput

from .args import DEFAULT_IMAGE_SIZE, Command, SourceArgs, WriteArgs, print_report, py


class Export(Command):
    """export the fp32 encoder (one .onnx + one .onnx.data)"""
    example = ("qvl-surgery export ~/Qwen2.5-VL-3B-Instruct -o out/model.onnx --image-size 448x448\n"
               "  qvl-surgery export --random-init 3b --seed 0 -o out/model.onnx")
    source = SourceArgs("local transformers Qwen2.5-VL checkpoint directory")
    write = WriteArgs()
    after = (write,)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.source.add(p)

    def _checked(self, a: argparse.Namespace) -> tuple[dict, tuple[int, int]]:
        from qvl_surgery.core.config import parse_image_size
        source = self.source.values(a)
        if a.dynamic and a.image_size is not None:
            raise BadInput("export: --image-size fixes one size; a --dynamic export takes any size (drop one of them)")
        return source, parse_image_size(a.image_size or DEFAULT_IMAGE_SIZE)

    def run(self, a: argparse.Namespace) -> int:
        from qvl_surgery.app.pipeline import weights_of
        from qvl_surgery.core.config import check_image_size
        from qvl_surgery.core.export import export
        source, size = self._checked(a)
        weights = weights_of(source)
        if a.dynamic:
            from qvl_surgery.core.dynamic import export_dynamic
            report = export_dynamic(weights, a.output, host_inputs=a.dynamic == "host", **self.write.values(a))
        else:
            check_image_size(weights.cfg, size)
            report = export(weights, a.output, size, **self.write.values(a))
        print("\n".join(report.lines()))
        return 0

    def script(self, a: argparse.Namespace) -> list[str]:
        from qvl_surgery.app.pipeline import weights_script
        source, size = self._checked(a)
        lines = weights_script(source)
        if a.dynamic:
            lines += ["from qvl_surgery.core.dynamic import export_dynamic",
                      f"report = export_dynamic(weights, {py(a.output)}, host_inputs={a.dynamic == 'host'}, "
                      f"{self.write.render(a)})"]
        else:
            lines += ["from qvl_surgery.core.config import check_image_size",
                      "from qvl_surgery.core.export import export",
                      f"report = export(weights, {py(a.output)}, check_image_size(weights.cfg, {size!r}), "
                      f"{self.write.render(a)})"]
        return lines + [print_report()]
