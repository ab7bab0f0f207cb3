"""scripts/bench's sections, by name, in BENCHMARKS.md's order. A section is a function
(work folder, preset) -> markdown lines, its heading first; the preset is the quant and surgery
sections' (the others measure the full-size 3b)."""
from bench_sections.attention import section_attention, section_dynamic, section_simplify
from bench_sections.fp16 import section_accuracy, section_fp16, section_overflow
from bench_sections.imagein import section_imagein
from bench_sections.io import section_export, section_split
from bench_sections.quant import section_quant, section_scales
from bench_sections.surgery import section_surgery
from bench_sections.targets import section_targets

SECTIONS = {"export": section_export, "split": section_split, "fp16": section_fp16, "accuracy": section_accuracy,
            "overflow": section_overflow,
            "simplify": section_simplify,
            "attention": section_attention, "dynamic": section_dynamic, "quant": section_quant,
            "surgery": section_surgery, "imagein": section_imagein,
            "scales": section_scales, "targets": section_targets}
