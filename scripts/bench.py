"""scripts/bench: every speed and memory figure of the toolkit on the full-size 3b architecture
(random weights, fixed seed), each against a baseline run in the same invocation.
Writes BENCHMARKS.md. Each measured step runs in its own child process; wall time is
perf_counter around it and peak RSS is that child's own ru_maxrss (os.wait4).

    scripts/bench                 # everything
    scripts/bench --only export   # some sections (comma separated)
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
from pathlib import Path

from bench_sections import SECTIONS   # the sections; the child runner and its measures: scripts/harness/

ROOT = Path(__file__).resolve().parents[1]


MARK = "<!-- bench section: {} -->"


def _existing_sections(path: Path) -> dict[str, str]:
    """Sections of an earlier BENCHMARKS.md, by name (kept when --only reruns others)."""
    if not path.exists():
        return {}
    found, name, buf = {}, None, []
    for line in path.read_text().splitlines():
        if line.startswith("<!-- bench section: "):
            if name:
                found[name] = "\n".join(buf).rstrip() + "\n"
            name, buf = line[len("<!-- bench section: "):-len(" -->")], [line]
        elif name:
            buf.append(line)
    if name:
        found[name] = "\n".join(buf).rstrip() + "\n"
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections: " + ", ".join(SECTIONS))
    ap.add_argument("--work", type=Path, default=ROOT / "out" / "bench", help="scratch folder (several GB)")
    ap.add_argument("--output", type=Path, default=ROOT / "BENCHMARKS.md")
    ap.add_argument("--preset", default="3b", help="quant section only: tiny for a smoke run (write --output elsewhere)")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    names = [n for n in a.only.split(",") if n]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        raise SystemExit(f"bench: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}")
    sections = _existing_sections(a.output)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"
    for name in names:
        print(f"[{name}]", flush=True)
        body = SECTIONS[name](a.work, a.preset)
        stamp = (f"_Measured {datetime.datetime.now():%Y-%m-%d %H:%M} by `scripts/bench --only {name}` "
                 f"(or a full `scripts/bench`) on {machine}._")
        sections[name] = "\n".join([MARK.format(name), body[0], "", stamp, *body[1:]]).rstrip() + "\n"
        # write after every section, so a long run that is stopped keeps what it measured
        head = ["# Benchmarks", "",
                "Written by `scripts/bench` (all sections) or `scripts/bench --only NAME[,NAME]` (those sections; "
                "the others are kept from their own earlier run). Within a section every figure comes from one "
                "invocation and each ratio is against the baseline measured beside it. Peak RSS is the child "
                "process's ru_maxrss (Linux carries the bench process's own ~15-40 MB into it). Page cache was warm unless a row says cold.", ""]
        ordered = [sections[n] for n in SECTIONS if n in sections]
        a.output.write_text("\n".join(head) + "\n" + "\n".join(ordered))
    print(f"wrote {a.output}")


if __name__ == "__main__":
    main()
