"""Image in on the 3b: a bucket folder of five sizes against one plain export (size, time, memory),
each size against transformers, and the image-in file's latency against the pixel_values one."""
from __future__ import annotations

import shutil
from pathlib import Path

from bench_sections.common import QVL, child, data_of, latency, table
from bench_sections.quant import cpu_low_precision
from harness import measure

SIZES_MAX_PIXELS = 448 * 448


def section_imagein(work: Path, preset: str) -> list[str]:
    model, image, buckets = work / "model.onnx", work / "image448.onnx", work / "buckets"
    shutil.rmtree(buckets, ignore_errors=True)
    plain = measure("baseline: qvl-surgery export (pixel_values, 448x448)",
                    [QVL, "export", "--random-init", "3b", "-o", str(model), "-q", "--force"])
    one = measure("qvl-surgery export --input image (448x448)",
                  [QVL, "export", "--random-init", "3b", "-o", str(image), "--input", "image", "-q", "--force"])
    five = measure("qvl-surgery export --input image --buckets 5 (one folder)",
                   [QVL, "export", "--random-init", "3b", "-o", str(buckets), "--input", "image", "--buckets", "5",
                    "--max-pixels", str(SIZES_MAX_PIXELS), "-q"])
    plain_bytes = data_of(model).stat().st_size
    shared = (buckets / "weights.data").stat().st_size
    graphs = sum(p.stat().st_size for p in buckets.glob("*.onnx"))
    acc = measure("each bucket against transformers (astronaut)", child("imagein-vs-transformers", buckets, "3b"),
                  show="python -c 'processor + model.visual vs each DIR/HxW.onnx'")
    base = latency("baseline: pixel_values export, onnxruntime", model, 4)
    img = latency("image-in export (uint8 NHWC), onnxruntime", image, 4)
    lat = ["| file | median s | x pixel_values |", "|---|---:|---:|",
           f"| pixel_values export 448x448 | {base.result['median_s']:.3f} | 1.00 |",
           f"| image-in export 448x448 (uint8 NHWC) | {img.result['median_s']:.3f} | "
           f"{img.result['median_s'] / base.result['median_s']:.2f} |"]
    rows = ["| size | max abs diff / max abs ref | token-centered cosine |", "|---|---:|---:|"]
    rows += [f"| {k} | {v['max_abs_over_max']:.2e} | {v['centered_cosine']:.7f} |" for k, v in acc.result.items()]
    shutil.rmtree(buckets, ignore_errors=True)
    for p in (image, data_of(image)):
        p.unlink(missing_ok=True)
    return ["## Image in (3b, random weights seed 0)", "",
            "Exports against the plain pixel_values export:", "", *table([plain, one, five], plain), "",
            f"A bucket folder of five sizes ({', '.join(acc.result)}) stores the weights once: weights.data "
            f"{shared / 1e9:.3f} GB against one export's {plain_bytes / 1e9:.3f} GB ({shared / plain_bytes:.3f}x), "
            f"plus {graphs / 1e6:.1f} MB of graphs.", "",
            "Each size against transformers' processor + model.visual on scikit-image's astronaut resized to it:", "",
            *rows, "", f"Latency in onnxruntime (CPU: {cpu_low_precision()}), median of 3 runs after the first:", "", *lat, ""]
