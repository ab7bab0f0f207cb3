"""The > 2 GB path on the full-size 3b: export, split into parts under 2 GB, the chain and the merge
equal to the whole. Multi-GB files are deleted afterwards."""
import json
import textwrap

import onnx
import pytest

from conftest import peak_rss_mb_of, run_cli

pytestmark = pytest.mark.big

GB2 = 2**31


def test_3b_export_split_chain_merge(big_dir):
    model = big_dir / "model.onnx"
    r = run_cli("export", "--random-init", "3b", "--seed", "0", "-o", model, "-q")
    assert r.returncode == 0, r.stderr
    assert model.with_name("model.onnx.data").stat().st_size > GB2
    onnx.checker.check_model(str(model))
    r = run_cli("split", model, "--parts", "3", "-o", big_dir / "parts", "-q")
    assert r.returncode == 0, r.stderr
    man = json.loads((big_dir / "parts" / "manifest.json").read_text())
    for p in man["parts"]:
        assert p["data_bytes"] < GB2
        onnx.checker.check_model(str(big_dir / "parts" / p["path"]))
    r = run_cli("merge", big_dir / "parts", "-o", big_dir / "merged.onnx", "-q")
    assert r.returncode == 0, r.stderr
    onnx.checker.check_model(str(big_dir / "merged.onnx"))
    # numerics in a child process, one session at a time
    _, out = peak_rss_mb_of(textwrap.dedent(f"""
        import numpy as np
        from qvl_surgery.core.runners import run_chain, run_model
        px = np.random.default_rng(0).standard_normal((1024, 1176)).astype(np.float32)
        whole = run_model({str(model)!r}, {{"pixel_values": px}})["image_embeds"]
        chain = run_chain({str(big_dir / 'parts')!r}, {{"pixel_values": px}})["image_embeds"]
        merged = run_model({str(big_dir / 'merged.onnx')!r}, {{"pixel_values": px}})["image_embeds"]
        print(list(whole.shape), float(np.abs(whole).max()), float(np.abs(whole - chain).max()),
              float(np.abs(whole - merged).max()))
    """))
    print("3b whole vs chain vs merged:", out)
    scale, d_chain, d_merged = map(float, out.split()[-3:])
    assert out.startswith("[256, 2048]")
    assert scale > 0 and d_chain <= 1e-6 and d_merged == 0.0, out
