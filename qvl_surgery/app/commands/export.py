"""``qvl-surgery export``: the fp32 encoder from a checkpoint or a preset with random weights."""
from __future__ import annotations

import argparse

from qvl_surgery.core.errors import BadInput

from .args import DEFAULT_IMAGE_SIZE, Command, SourceArgs, WriteArgs, print_report, py


class Export(Command):
    """export the fp32 encoder (one .onnx + one .onnx.data)"""
    example = ("qvl-surgery export ~/Qwen2.5-VL-3B-Instruct -o out/model.onnx --image-size 448x448\n"
               "  qvl-surgery export --random-init 3b --seed 0 -o out/model.onnx\n"
               "  qvl-surgery export --random-init 3b -o out/image.onnx --input image --image-layout nchw   # NPUs\n"
               "  qvl-surgery export --random-init 3b -o out/buckets --input image --image-size 448x448,448x672,672x448")
    source = SourceArgs("local transformers Qwen2.5-VL checkpoint directory")
    write = WriteArgs()
    after = (write,)

    def add_arguments(self, p: argparse.ArgumentParser) -> None:
        self.source.add(p)
        from qvl_surgery.core.weights import STAND_INS
        p.add_argument("--stand-in", choices=sorted(k for k in STAND_INS if k != "random"), metavar="NAME",
                       help="with --random-init: the random weights with a trained encoder's outliers planted "
                            "(the toolkit's test and bench stand-ins: " + ", ".join(sorted(k for k in STAND_INS
                                                                                          if k != "random")) + ")")
        p.add_argument("--input", choices=("pixel_values", "image"), default="pixel_values",
                       help="what the static export takes: the processor's pixel_values (default), or the resized "
                            "image itself, normalization and patchify inside (what NPU toolchains compile)")
        p.add_argument("--image-layout", choices=("nhwc", "nchw", "nchw-normalized"), default=None,
                       help="with --input image: nhwc, uint8 [1, H, W, 3] as PIL/numpy give it (default); nchw, "
                            "float [1, 3, H, W] in 0..255 (what rknn-toolkit2 and pulsar2 compile from); "
                            "nchw-normalized, the same normalized by the toolchain's input stage (its mean/std "
                            "255 x the processor's: rknn's fp16 build is more precise on it)")
        p.add_argument("--buckets", type=int, metavar="N",
                       help="with --input image: N sizes for aspect ratios from 1:2 to 2:1 within --max-pixels, "
                            "written as a bucket folder (-o DIR: one graph per size, the weights stored once)")
        p.add_argument("--max-pixels", type=int, metavar="P", help="with --buckets: the pixel budget of each size "
                       "(default 448*448)")

    def _checked(self, a: argparse.Namespace) -> tuple[dict, tuple[int, int]]:
        from qvl_surgery.core.config import parse_image_size
        source = self.source.values(a)
        if a.stand_in is not None:
            if a.random_init is None:
                raise BadInput("export: --stand-in plants outliers in random weights; add --random-init PRESET")
            source["stand_in"] = a.stand_in
        if a.dynamic and a.image_size is not None:
            raise BadInput("export: --image-size fixes one size; a --dynamic export takes any size (drop one of them)")
        if a.input == "image" and a.dynamic:
            raise BadInput("export: --input image is for static exports (one size per file); the dynamic export "
                           "takes pixel_values")
        if a.image_layout is not None and a.input != "image":
            raise BadInput("export: --image-layout applies with --input image")
        if (a.buckets is not None or a.max_pixels is not None) and a.input != "image":
            raise BadInput("export: --buckets and --max-pixels apply with --input image")
        if a.max_pixels is not None and a.buckets is None:
            raise BadInput("export: --max-pixels sets the budget of --buckets N; give both")
        if a.buckets is not None:
            if a.image_size is not None:
                raise BadInput("export: give --image-size S1,S2,... or --buckets N, not both")
            from qvl_surgery.core.buckets import bucket_sizes
            return source, bucket_sizes(a.buckets, a.max_pixels or 448 * 448)
        sizes = [parse_image_size(t) for t in (a.image_size or DEFAULT_IMAGE_SIZE).split(",") if t.strip()]
        if len(sizes) > 1 and a.input != "image":
            raise BadInput("export: several --image-size values make a bucket folder of image-in exports; "
                           "add --input image (or export one size per file)")
        return source, sizes if len(sizes) > 1 else sizes[0]

    @staticmethod
    def _image_input(a: argparse.Namespace) -> str | None:
        return (a.image_layout or "nhwc") if a.input == "image" else None

    def run(self, a: argparse.Namespace) -> int:
        from qvl_surgery.app.pipeline import weights_of
        from qvl_surgery.core.config import check_image_size
        from qvl_surgery.core.export import export
        source, size = self._checked(a)
        weights = weights_of(source)
        if a.dynamic:
            from qvl_surgery.core.dynamic import export_dynamic
            report = export_dynamic(weights, a.output, host_inputs=a.dynamic == "host", **self.write.values(a))
        elif isinstance(size, list):
            return self._buckets(a, weights, size)
        else:
            check_image_size(weights.cfg, size)
            report = export(weights, a.output, size, image_input=self._image_input(a), **self.write.values(a))
        print("\n".join(report.lines()))
        return 0

    def _buckets(self, a: argparse.Namespace, weights, sizes: list[tuple[int, int]]) -> int:
        from qvl_surgery.core.buckets import build_buckets
        from qvl_surgery.core.config import check_image_size
        from qvl_surgery.core.values import write_value
        w = self.write.values(a)
        if a.output.suffix == ".onnx":
            raise BadInput(f"{a.output}: several sizes make a bucket folder (one graph per size, one data file); "
                           "name a folder, not an .onnx file")
        value = build_buckets(weights, [check_image_size(weights.cfg, s) for s in sizes], self._image_input(a),
                              a.max_pixels)
        # write_value checks the folder before it writes anything (the graphs are built, weightless)
        wrote = write_value(value, a.output, overwrite=w["overwrite"], progress=w["progress"],
                            single_file=w["single_file"])
        for key, model in value.models.items():
            gathers = sum(n.op_type == "Gather" for n in model.graph.node)
            print(f"  {key}: {len(model.graph.node)} nodes, " + (f"{gathers} Gathers (partial windows)" if gathers
                                                                  else "no Gather"))
        print("\n".join(wrote))
        return 0

    def script(self, a: argparse.Namespace) -> list[str]:
        from qvl_surgery.app.pipeline import weights_script
        source, size = self._checked(a)
        lines = weights_script(source)
        if isinstance(size, list):
            w = self.write.values(a)
            return lines + ["from qvl_surgery.core.buckets import build_buckets",
                            "from qvl_surgery.core.values import write_value",
                            f"value = build_buckets(weights, {size!r}, {self._image_input(a)!r}, {a.max_pixels!r})",
                            f"print('\\n'.join(write_value(value, {py(a.output)}, overwrite={w['overwrite']!r}, "
                            f"progress={w['progress']!r})))"]
        if a.dynamic:
            lines += ["from qvl_surgery.core.dynamic import export_dynamic",
                      f"report = export_dynamic(weights, {py(a.output)}, host_inputs={a.dynamic == 'host'}, "
                      f"{self.write.render(a)})"]
        else:
            lines += ["from qvl_surgery.core.config import check_image_size",
                      "from qvl_surgery.core.export import export",
                      f"report = export(weights, {py(a.output)}, check_image_size(weights.cfg, {size!r}), "
                      + (f"image_input={self._image_input(a)!r}, " if self._image_input(a) else "")
                      + f"{self.write.render(a)})"]
        return lines + [print_report()]
