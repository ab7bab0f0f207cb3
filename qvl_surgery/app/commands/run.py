"""``qvl-surgery run``: one pipeline, export -> passes -> deployable files, compared with the fp32
export (:mod:`qvl_surgery.app.pipeline`)."""
from __future__ import annotations

import argparse
from pathlib import Path

from .args import Command, SourceArgs, WriteArgs, add_gen_script


class Run(Command):
    """one pipeline: export -> passes -> deployable files, compared to the fp32 export"""
    example = ("qvl-surgery run --random-init 3b -o out/run --passes attention,fp16:keep_silu_fp32,split:parts=3\n"
               "  qvl-surgery run -o out/run --recipe recipe.json   # source, image size and passes from the recipe")
    source = SourceArgs("checkpoint directory or an existing fp32 .onnx export")
    write = WriteArgs("output folder")

    def add_arguments(self, r: argparse.ArgumentParser) -> None:
        self.source.add(r)
        r.add_argument("--passes", help="e.g. attention,fp16:keep_silu_fp32,split:parts=3")
        r.add_argument("--recipe", type=Path, help="a JSON recipe with source, image_size and passes")
        add_gen_script(r)   # before the write options, as it always stood in --help
        self.write.add(r)

    @staticmethod
    def _resolved(a: argparse.Namespace):
        from qvl_surgery.app.pipeline import resolve_run
        return resolve_run(recipe=a.recipe, passes=a.passes, source=a.source, random_init=a.random_init, seed=a.seed,
                           image_size=a.image_size, dynamic=a.dynamic)

    def run(self, a: argparse.Namespace) -> int:
        from qvl_surgery.app.pipeline import run_pipeline
        source, image_size, specs = self._resolved(a)
        w = self.write.values(a)
        result = run_pipeline(out_dir=a.output, specs=specs, checkpoint=source.get("checkpoint"),
                              random_init=source.get("random_init"), seed=int(source.get("seed", 0)),
                              model=source.get("model"), image_size=image_size, dynamic=source.get("dynamic"),
                              force=w["overwrite"], progress=w["progress"], single_file=w["single_file"])
        print("\n".join(result.lines()))
        return 0 if result.compare.get("passed") else 1

    def script(self, a: argparse.Namespace) -> list[str]:
        from qvl_surgery.app.pipeline import gen_script
        source, image_size, specs = self._resolved(a)
        return gen_script(source=source, specs=specs, output=a.output, image_size=image_size,
                          single_file=self.write.values(a)["single_file"], compare=True).splitlines()
