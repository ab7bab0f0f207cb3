"""COMPAT.md, both ways: read what an earlier COMPAT.md holds, and write it again from the results files
under .compat/ merged into those tables (a row no results file holds is carried over as it was)."""
from __future__ import annotations

import json
import re
from pathlib import Path

from compat_catalog import CLIENTS, COMPAT, KINDS, ROUTE_LABELS
from compat_cells import IGNORED_QUANT, fmt_cell


_CELL_SPLIT = re.compile(r"(?<!\\)\|")


def read_markdown(path: Path) -> tuple[dict[str, dict[str, dict[str, str]]], dict[str, str], list[str]]:
    """What an earlier COMPAT.md holds: its tables ("preset, size" -> row label -> column label -> cell text,
    in its order), each client's version text, and its "not in the matrix yet" lines. The results files
    under .compat/ are per checkout; a row none of them holds is carried over from here as it was."""
    tables: dict[str, dict[str, dict[str, str]]] = {}
    versions: dict[str, str] = {}
    failures: list[str] = []
    if not path.exists():
        return tables, versions, failures
    section, header = "", []
    for line in path.read_text().splitlines():
        if line.startswith("## "):
            section, header = line[3:].strip(), []
            continue
        if section == "Clients":
            m = re.match(r"- \*\*([\w-]+)\*\* \((.*?)\): ", line)
            if m and m.group(2) != "not run":
                versions[m.group(1)] = m.group(2)
        elif section == "Not in the matrix yet" and line.startswith("- "):
            failures.append(line)
        elif line.startswith("| ") and section:
            cells = [c.strip() for c in _CELL_SPLIT.split(line.strip())[1:-1]]
            if not header:
                header = cells
            elif set(cells) != {"---"}:
                tables.setdefault(section, {})[cells[0]] = dict(zip(header[1:], cells[1:]))
    return tables, versions, failures


def write_markdown(out: Path) -> None:
    """COMPAT.md from .compat/results-*.json, merged into the tables the earlier COMPAT.md holds: a measured
    row replaces the row of the same label (a cell no client ran this time keeps its earlier text), a new
    row goes at the end of its table, every other row (and table) stays as it was."""
    routes = ["onnxruntime:cpu"] + [f"{c.name}:{r}" for c in CLIENTS.values() for r in c.routes]
    columns = [ROUTE_LABELS.get(r, r) for r in routes]
    tables, old_versions, old_failures = read_markdown(out)
    versions: dict[str, dict] = {}
    failures: list[str] = []
    measured: set[str] = set()   # "preset size, label"
    for preset_file in sorted(COMPAT.glob("results-*.json")):
        preset = preset_file.stem.split("-", 1)[1]
        results = json.loads(preset_file.read_text())
        for size, block in results.items():
            table = tables.setdefault(f"{preset}, {size}", {})
            for kid, row in block.items():
                if kid.startswith("_"):
                    continue
                measured.add(f"{preset} {size}, {row['_label']}")
                if "_skipped" in row:
                    table[row["_label"]] = dict.fromkeys(columns, "—")
                    failures.append(f"- {preset} {size}, {row['_label']}: {row['_skipped']}")
                    continue
                kind = next((k for k in KINDS if k.id == kid), None)
                quantized = kind is not None and kind.quantized
                ort_rel = row.get("onnxruntime:cpu", {}).get("metrics", {}).get("rel_l2")
                cells = {}
                earlier = table.get(row["_label"], {})
                for r, col in zip(routes, columns):
                    cell = row.get(r)
                    if cell is None:   # a client this run left out (--clients, --skip): its earlier cell stays
                        cells[col] = earlier.get(col, "not run")
                        continue
                    client = r.split(":")[0]
                    cells[col] = fmt_cell(cell, CLIENTS[client].floor if client in CLIENTS else 1e-4, ort_rel,
                                          quantized=quantized, reference=r == "onnxruntime:cpu")
                    if cell.get("versions"):
                        versions.setdefault(client, cell["versions"])
                table[row["_label"]] = cells
    failures += [f for f in old_failures if not any(f.startswith(f"- {m}:") for m in measured)]
    lines = ["# Compatibility matrix", "",
             "Written by `scripts/compat` (do not edit by hand). Every kind of file the toolkit writes, through each "
             "client in its own virtualenv (`.compat/<client>/`), each given a copy of the file. Each cell: max abs / "
             "cosine against onnxruntime on the fp32 export, same input (random pixel_values, seed 0); or the "
             "client's own error. **WRONG** marks a relative L2 error (||out - ref|| / ||ref||) above both 10x "
             "onnxruntime's on the same file and the client's own arithmetic floor (1e-4; MNN's CPU kernels 1e-3; "
             "rknn's fp16 build 5e-3): a client silently computing something else.", "",
             "Quantized files (`windowed, w...` rows, all made by `qvl-surgery quantize` from the windowed file) are "
             "still compared with the fp32 export, so onnxruntime's own figure on them is the quantization error "
             "(its cell adds that relative L2 error, `rel`), and the WRONG rule still holds: 10x the quantization "
             "error. Each client's cell adds its relative L2 error as a multiple of onnxruntime's. About 1x: the "
             "client runs the same quantized arithmetic. Above 1x: its quantized arithmetic is coarser than "
             "onnxruntime's. Well below 1x (under "
             f"{IGNORED_QUANT}x, noted in the cell): it got closer to fp32 than the file allows, so it ran part of "
             "it in float (activations not quantized, or Q/DQ pairs dropped). Weights cannot be run better than "
             "their stored int8/int4 codes, so on a weight-only file a client that reads them right is about 1x "
             "whatever its arithmetic, and a client that drops only the activation quantization of a w8a8 file "
             "lands at the w8 weight-only figure.", ""]
    for section, table in tables.items():
        lines += [f"## {section}", "", "| file | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
        lines += [f"| {label} | " + " | ".join(cells.get(c, "not run") for c in columns) + " |"
                  for label, cells in table.items()]
        lines.append("")
    lines += ["## Clients", ""]
    for c in CLIENTS.values():
        v = ", ".join(f"{k} {val}" for k, val in versions.get(c.name, {}).items()) or old_versions.get(c.name)
        lines.append(f"- **{c.name}** ({v or 'not run'}): {c.note}" + (f" **Limits:** {c.limits}" if c.limits else ""))
    if failures:
        lines += ["", "## Not in the matrix yet", ""] + failures
    lines += ["", "Rerun: `scripts/compat` (tiny, 448x448 and 308x196, every client; about 25 min on 2 cores). The "
              "quantized rows alone: `scripts/compat --sizes 448x448 --kinds w8a8-qdq,w8a16-qdq,w8-qdq,w4-qdq,"
              "w8a8-ort,w4-ort,w8a8-qdq-single,w8-qdq-single` (under 2 min). The 3b section: `scripts/compat --preset 3b --sizes 448x448 --kinds "
              "windowed-fp16-single --clients openvino,mnn,onnx2tf --skip fp32:onnx2tf,windowed:onnx2tf --timeout "
              "1500` (\"not run\": rknn-toolkit2 was not tried on the 3b; onnx2tf is skipped on the 2.7 GB "
              "external-data files, see its limits). A run rewrites the rows it measured and keeps every other row "
              "of this file as it was. `--remeasure` recomputes the figures from the kept outputs. Each job's folder "
              "keeps the client's full log: `.compat/jobs/`.", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out}", flush=True)

