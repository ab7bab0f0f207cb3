"""A polygraphy run plugin (entry point ``polygraphy.run.plugins``): two more runners for
``polygraphy run`` beside ``--onnxrt``.

    polygraphy run out/fp16.onnx --onnxrt --qvl-emulate-fp16        # fp16 rounding emulated
    polygraphy run out/bf16.onnx --qvl-emulate-fp16                 # a bf16 file: bf16 rounding (not --onnxrt:
                                                                    # onnxruntime has no bf16 arithmetic)
    polygraphy run out/parts/manifest.json --qvl-chain           # the parts of a split, chained

polygraphy guesses a model's type from its file extension and knows no ``.json``: the plugin tells
it that a qvl-surgery split (``manifest.json``, or the folder holding it) is a chain of ONNX
parts, so no ``--model-type`` flag is needed.
"""
from __future__ import annotations

from polygraphy.tools.args import ModelArgs
from polygraphy.tools.args.base import BaseRunnerArgs
from polygraphy.tools.script import make_invocable

from qvl_surgery.core.manifest import is_manifest_path


class _QvlRunnerArgs(BaseRunnerArgs):
    mode = "onnxrt"
    title = ""
    option = ""

    def register(self, groups):
        super().register(groups)
        try:
            model_args = groups[ModelArgs]
        except (KeyError, TypeError):
            return
        if getattr(model_args, "_qvl_manifest_aware", False):
            return
        parse = model_args.parse_impl

        def parse_impl(args):
            # runs before polygraphy guesses the type from the extension (it would stop at ".json")
            path = getattr(args, "model_file", None)
            if path and getattr(args, "model_type", None) is None and is_manifest_path(path):
                args.model_type = "onnx"
            return parse(args)

        model_args.parse_impl = parse_impl
        model_args._qvl_manifest_aware = True

    def get_name_opt_impl(self):
        return self.title, self.option

    def add_to_script_impl(self, script):
        script.add_import(imports=["QvlRunner"], frm="qvl_surgery.analysis.compare")
        path = self.arg_groups[ModelArgs].path
        script.add_runner(make_invocable("QvlRunner", path, mode=self.mode))


class QvlEmulateFp16Args(_QvlRunnerArgs):
    """qvl-surgery fp16 emulation: every fp16 (in a bf16 file, bf16) tensor rounded as on a GPU (model
    file or split)."""

    mode, title, option = "emulate-fp16", "qvl-surgery fp16/bf16 emulation", "qvl-emulate-fp16"


class QvlChainArgs(_QvlRunnerArgs):
    """qvl-surgery chain: the parts of a split (manifest.json) run in order in onnxruntime."""

    mode, title, option = "onnxrt", "qvl-surgery split chain", "qvl-chain"


def get_arg_groups():
    return [QvlEmulateFp16Args(), QvlChainArgs()]
