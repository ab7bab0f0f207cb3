"""Issue 15's shape: imports flow one way (core <- passes <- app), a new pass is one class plus
one registry line, and every value is read and written one way."""
import ast
import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_one_line_error, check_written, run_cli

# the layers, lowest first: a module may import its own layer and the ones below, never one above;
# a pass never imports another pass (what two passes share lives in the core)
LAYERS = ("qvl_surgery.core", "passes", "qvl_surgery.analysis", "qvl_surgery.app")


def layer_of(module: str) -> int:
    for k, prefix in enumerate(LAYERS):
        if module == prefix or module.startswith(prefix + "."):
            return k
    if module == "qvl_surgery":       # the package itself: its version string, nothing else
        return 0
    raise AssertionError(f"{module}: in no layer; put it under one of {', '.join(LAYERS)}")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports() -> dict[str, set[str]]:
    """Every module of qvl_surgery/ and passes/ -> the project modules it imports anywhere
    (function-level imports included)."""
    mods = {_module_name(p): p for d in ("qvl_surgery", "passes") for p in (ROOT / d).rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")
                    up = up[:len(up) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            for n in names:
                while n and n not in mods:
                    n = n.rpartition(".")[0]
                if n and n != mod:
                    graph[mod].add(n)
    return graph


def test_imports_follow_the_folders_and_no_pass_imports_another():
    graph = _imports()
    assert "qvl_surgery.core.values" in graph and "passes.split" in graph and "qvl_surgery.app.cli" in graph
    for m, imported in graph.items():
        for i in imported:
            assert layer_of(i) <= layer_of(m), f"{m} ({LAYERS[layer_of(m)]}) imports {i} ({LAYERS[layer_of(i)]})"
        if m.startswith("passes.") and m.count(".") >= 1:
            own = ".".join(m.split(".")[:2])          # a pass module, or a pass package and its modules
            others = [i for i in imported if i.startswith("passes.") and not (i == own or i.startswith(own + "."))]
            assert not others, f"pass {m} imports another pass: {others}"
    loose = sorted(p.name for p in (ROOT / "qvl_surgery").glob("*.py") if p.name != "__init__.py")
    assert not loose, f"modules outside the layer folders: {loose}"
    # no cycle anywhere (depth-first search)
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for n in graph[m]:
            if state.get(n) == 1:
                # a package importing its own submodules is not a cycle unless they import it back
                raise AssertionError("import cycle: " + " -> ".join(stack + [m, n]))
            if not state.get(n):
                visit(n, stack + [m])
        state[m] = 2
    for m in sorted(graph):
        if not state.get(m):
            visit(m, [])


DUMMY = textwrap.dedent('''
    from dataclasses import dataclass
    from qvl_surgery.core.passbase import Option, Pass, PassReport, PassResult
    from qvl_surgery.core.modelfile import Model


    @dataclass
    class RenameReport(PassReport):
        renamed: int = 0

        def summary(self):
            return [f"rename: {self.renamed} nodes renamed"]


    class RenamePass(Pass):
        """Prefix every node name: a pass in 30 lines."""
        name = "rename"
        help = "prefix every node name"
        example = "qvl-surgery rename out/model.onnx -o out/renamed.onnx --prefix x/"
        options = (
            Option("prefix", str, "renamed/", "text put before each node name"),
            Option("only_op", list, None, "rename nodes of these op types only", metavar="TYPE"),
        )

        def apply(self, model: Model, context) -> PassResult:
            out, o, n = model.copy(), self.o, 0
            for node in out.graph.node:
                if not o.only_op or node.op_type in o.only_op:
                    node.name = o.prefix + node.name + getattr(o, "suffix", "")
                    n += 1
            return PassResult(out, RenameReport(renamed=n))
''')

RUNNER = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[1])
    import passes
    from dummy_pass import RenamePass
    passes.register(RenamePass)     # the one place a new pass is listed
    from qvl_surgery.app.cli import main
    sys.exit(main(sys.argv[2:]))
''')


ONE_MORE_OPTION = 'Option("suffix", str, "", "text put after each node name"),\n'


@pytest.mark.slow   # child processes of the CLI with a registered pass
def test_an_option_added_in_one_line_is_a_flag_passes_text_recipe_key_script_and_metadata(tiny_448, tmp_path):
    lines = DUMMY.splitlines(keepends=True)
    at = next(k for k, line in enumerate(lines) if line.strip().startswith("Option(\"only_op\""))
    indent = lines[at][:len(lines[at]) - len(lines[at].lstrip())]
    (tmp_path / "dummy_pass.py").write_text("".join(lines[:at + 1] + [indent + ONE_MORE_OPTION] + lines[at + 1:]))
    (tmp_path / "cli.py").write_text(RUNNER)

    def cli(*args):
        import subprocess
        return subprocess.run([sys.executable, str(tmp_path / "cli.py"), str(tmp_path), *map(str, args)],
                              capture_output=True, text=True)
    from qvl_surgery.core.modelfile import load_model
    r = cli("rename", "--help")
    assert r.returncode == 0 and "--suffix" in r.stdout
    r = cli("rename", tiny_448, "-o", tmp_path / "r.onnx", "--suffix", "_s", "-q")
    assert r.returncode == 0, r.stderr
    m = load_model(tmp_path / "r.onnx")
    assert json.loads(m.metadata()["qvl_surgery.passes"])[-1] == "rename:suffix=_s"
    assert all(n.name.startswith("renamed/") and n.name.endswith("_s") for n in m.graph.node)
    r = cli("run", tiny_448, "-o", tmp_path / "run", "--passes", "rename:suffix=_t", "-q")
    assert r.returncode == 0, r.stderr
    assert load_model(tmp_path / "run" / "model.onnx").graph.node[0].name.endswith("_t")
    (tmp_path / "recipe.json").write_text(json.dumps({"passes": [{"pass": "rename", "suffix": "_u"}]}))
    r = cli("run", tiny_448, "-o", tmp_path / "run2", "--recipe", tmp_path / "recipe.json", "-q")
    assert r.returncode == 0, r.stderr
    assert json.loads(load_model(tmp_path / "run2" / "model.onnx").metadata()["qvl_surgery.passes"])[-1] == \
        "rename:suffix=_u"
    r = cli("rename", tiny_448, "-o", tmp_path / "g.onnx", "--suffix", "_g", "--gen-script")
    assert r.returncode == 0 and "RenamePass(suffix='_g')" in r.stdout


@pytest.mark.slow   # child processes of the CLI with a registered pass
def test_a_new_pass_is_one_class_and_one_registry_line(tiny_448, tmp_path):
    (tmp_path / "dummy_pass.py").write_text(DUMMY)
    (tmp_path / "cli.py").write_text(RUNNER)
    assert len(DUMMY.strip().splitlines()) <= 32

    def cli(*args):
        import subprocess
        return subprocess.run([sys.executable, str(tmp_path / "cli.py"), str(tmp_path), *map(str, args)],
                              capture_output=True, text=True)
    # its subcommand, flags and example come from the spec
    r = cli("rename", "--help")
    assert r.returncode == 0 and "--prefix" in r.stdout and "--only-op" in r.stdout and "--prefix x/" in r.stdout
    # the subcommand runs and records itself in the output's metadata
    r = cli("rename", tiny_448, "-o", tmp_path / "r.onnx", "--prefix", "p/", "--only-op", "Gemm")
    assert r.returncode == 0, r.stderr
    assert "nodes renamed" in r.stdout
    check_written(tmp_path / "r.onnx")
    from qvl_surgery.core.modelfile import load_model
    m = load_model(tmp_path / "r.onnx")
    assert json.loads(m.metadata()["qvl_surgery.passes"])[-1] == "rename:prefix=p/+only_op=Gemm"
    assert all(n.name.startswith("p/") for n in m.graph.node if n.op_type == "Gemm")
    # --passes and a recipe, through run
    r = cli("run", tiny_448, "-o", tmp_path / "run", "--passes", "rename:prefix=q/,split:parts=2", "-q")
    assert r.returncode == 0, r.stderr
    part = load_model(tmp_path / "run" / "parts" / "part0.onnx")
    assert json.loads(part.metadata()["qvl_surgery.passes"])[-2:] == ["rename:prefix=q/", "split:parts=2"]
    (tmp_path / "recipe.json").write_text(json.dumps({"passes": [{"pass": "rename", "only_op": ["Softmax"]}]}))
    r = cli("run", tiny_448, "-o", tmp_path / "run2", "--recipe", tmp_path / "recipe.json", "-q")
    assert r.returncode == 0, r.stderr
    # --gen-script prints Python that does the same
    r = cli("rename", tiny_448, "-o", tmp_path / "g.onnx", "--prefix", "g/", "--gen-script")
    assert r.returncode == 0 and "RenamePass(prefix='g/')" in r.stdout
    sys.path.insert(0, str(tmp_path))
    try:
        exec(compile(r.stdout, "gen_script", "exec"), {})
    finally:
        sys.path.remove(str(tmp_path))
    assert json.loads(load_model(tmp_path / "g.onnx").metadata()["qvl_surgery.passes"])[-1] == "rename:prefix=g/"


def test_passes_text_keeps_commas_inside_an_option():
    from passes import parse_spec
    specs = parse_spec("fp16:calibrate=a.png,b.png,split:parts=2")
    assert [p.name for p in specs] == ["fp16", "split"]
    assert specs[0].values["calibrate"] == "a.png,b.png"


def test_library_function_takes_the_option_names(tiny_448):
    from passes.fp16 import convert_fp16
    from qvl_surgery.core.modelfile import load_model
    model, report = convert_fp16(load_model(tiny_448), keep_silu_fp32=True, keep_node=["/blocks.0/*"])
    assert report.kept["silu"] and report.kept["node /blocks.0/*"]


def test_quantized_weights_never_inline(tmp_path):
    """An int8 weight computed by a pass goes to the data file; an int64 table stays inline."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    from qvl_surgery.core.modelfile import Computed, Model, save_model
    w = np.arange(64 * 64, dtype=np.int8).reshape(64, 64)
    table = numpy_helper.from_array(np.arange(300, dtype=np.int64), "table")
    wt = TensorProto(name="w", data_type=TensorProto.INT8, dims=[64, 64], data_location=TensorProto.EXTERNAL)
    g = helper.make_graph([helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
                           helper.make_node("Gather", ["wf", "table"], ["y"])], "g", [],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [300, 64])], initializer=[wt, table])
    model = Model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]),
                  {"w": Computed(lambda: w, w.nbytes)})
    save_model(model, tmp_path / "q.onnx")
    p = onnx.load(str(tmp_path / "q.onnx"), load_external_data=False)
    where = {t.name: t.data_location for t in p.graph.initializer}
    assert where == {"w": TensorProto.EXTERNAL, "table": TensorProto.DEFAULT}


def test_model_commands_on_a_split_say_merge_first(tiny_448, tmp_path):
    r = run_cli("split", tiny_448, "--parts", "2", "-o", tmp_path / "p", "-q")
    assert r.returncode == 0, r.stderr
    for cmd in (["fp16"], ["attention"], ["simplify"]):
        r = run_cli(*cmd, tmp_path / "p", "-o", tmp_path / "x.onnx")
        assert_one_line_error(r, "merge it first")
    r = run_cli("inspect", tmp_path / "p" / "manifest.json")
    assert_one_line_error(r, "is a split", "part0.onnx", "merge")


@pytest.mark.slow
def test_compare_judges_a_file_as_its_passes_declared(tiny_448, tmp_path):
    """A quantized file records its judgement (qvl_surgery.judgement): a plain compare judges it by
    that, not by fp32's tolerances; explicit flags still win."""
    r = run_cli("quantize", tiny_448, "-o", tmp_path / "q.onnx", "--activations", "int8", "--format", "onnxruntime",
                "-q")
    assert r.returncode == 0, r.stderr
    from qvl_surgery.core.modelfile import load_model
    assert "qvl_surgery.judgement" in load_model(tmp_path / "q.onnx").metadata()
    r = run_cli("compare", tiny_448, tmp_path / "q.onnx")
    assert r.returncode == 0 and "PASSED" in r.stdout and "centered" in r.stdout, r.stdout + r.stderr
    r = run_cli("compare", tiny_448, tmp_path / "q.onnx", "--atol", "1e-6", "--rtol", "1e-6")
    assert r.returncode == 1 and "FAILED" in r.stdout
