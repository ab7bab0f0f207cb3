"""package --runtime onnxruntime-genai: a tiny random Qwen2.5-VL checkpoint made offline, packaged,
then run through onnxruntime-genai (og.Model, its multimodal processor, greedy search) against
transformers' generate, token for token."""
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import import_client
from qvl_surgery.core.errors import BadInput, QvlError
from qvl_surgery.app.package import build_embedding_model, builder_env, Checkpoint, package, write_vision_model
from qvl_surgery.core.weights import CheckpointWeights
from qvl_surgery.app.testing import make_tiny_checkpoint

og = import_client("onnxruntime_genai")

NEW_TOKENS = 24
PROMPT = ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Describe this image.<|im_end|>\n"
          "<|im_start|>assistant\n")


def _tree_digest(folder: Path) -> dict[str, tuple[str, int]]:
    return {p.name: (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.iterdir())}


def _noise_image(path: Path, height: int, width: int, seed: int) -> Path:
    """Noise at a size that needs no resize (multiples of 28 within min/max pixels): the runtime's
    bicubic differs from Pillow's by a level or more on noise."""
    from PIL import Image
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def packaged(tmp_path_factory):
    d = tmp_path_factory.mktemp("genai")
    src = make_tiny_checkpoint(d / "ckpt", seed=0)
    before = _tree_digest(src)
    report = package(src, d / "pkg", builder_python=builder_env())
    assert _tree_digest(src) == before  # the checkpoint is only read
    return src, d / "pkg", report


@pytest.fixture(scope="module")
def hf(packaged):
    from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
    src = packaged[0]
    return AutoProcessor.from_pretrained(src), Qwen2_5_VLForConditionalGeneration.from_pretrained(src).eval()


def _og_generate(pkg: Path, images: list[Path], new_tokens: int, prompt: str = PROMPT):
    model = og.Model(str(pkg))
    inputs = model.create_multimodal_processor()(prompt, images=og.Images.open(*map(str, images)))
    prompt_len = inputs["input_ids"].as_numpy().shape[-1]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=prompt_len + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.set_inputs(inputs)
    while not gen.is_done():
        gen.generate_next_token()
    seq = np.asarray(gen.get_sequence(0))
    return seq, {k: inputs[k].as_numpy() for k in ("input_ids", "pixel_values", "image_grid_thw")}


def _hf_generate(hf, images: list[Path], new_tokens: int, prompt: str = PROMPT):
    from PIL import Image
    processor, model = hf
    enc = processor(text=[prompt], images=[Image.open(i) for i in images], return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
    return out[0].numpy(), enc


def test_generation_equals_transformers(packaged, hf, tmp_path):
    _, pkg, _ = packaged
    image = _noise_image(tmp_path / "a.png", 112, 84, seed=0)
    og_seq, og_in = _og_generate(pkg, [image], NEW_TOKENS)
    hf_seq, enc = _hf_generate(hf, [image], NEW_TOKENS)
    prompt_len = enc["input_ids"].shape[1]
    # same prompt tokens (12 image pads for a 112x84 image) and the same pixels
    assert np.array_equal(og_in["input_ids"].reshape(-1), enc["input_ids"].numpy().reshape(-1))
    assert (og_in["input_ids"] == hf[1].config.image_token_id).sum() == 112 * 84 // 28 ** 2
    assert np.array_equal(og_in["image_grid_thw"].reshape(-1, 3), enc["image_grid_thw"].numpy())
    assert np.abs(og_in["pixel_values"] - enc["pixel_values"].numpy()).max() <= 1e-5
    # token for token
    assert len(og_seq) - prompt_len >= 20
    assert og_seq.tolist() == hf_seq.tolist()
    # the package's vision model on the runtime's pixels == transformers' visual
    feats, = ort.InferenceSession(str(pkg / "vision.onnx"), providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": og_in["pixel_values"], "image_grid_thw": og_in["image_grid_thw"].astype(np.int64)})
    with torch.no_grad():
        ref = hf[1].visual(enc["pixel_values"], enc["image_grid_thw"]).numpy()
    assert feats.shape == ref.shape == (12, hf[1].config.hidden_size)
    assert np.abs(feats - ref).max() <= 1e-4 * np.abs(ref).max()
    # the image reaches the answer: another image of another size gives another answer, still equal
    image_b = _noise_image(tmp_path / "b.png", 56, 140, seed=1)
    og_b, _ = _og_generate(pkg, [image_b], NEW_TOKENS)
    hf_b, enc_b = _hf_generate(hf, [image_b], NEW_TOKENS)
    assert og_b.tolist() == hf_b.tolist()
    assert og_b[enc_b["input_ids"].shape[1]:].tolist() != og_seq[prompt_len:].tolist()


def test_two_images_in_one_prompt(packaged, hf, tmp_path):
    """Two images of one size: the runtime runs the vision model once with image_grid_thw [2, 3]."""
    two = PROMPT.replace("<|vision_end|>", "<|vision_end|>and <|vision_start|><|image_pad|><|vision_end|>", 1)
    images = [_noise_image(tmp_path / f"{k}.png", 84, 112, seed=10 + k) for k in range(2)]
    og_seq, og_in = _og_generate(packaged[1], images, NEW_TOKENS, two)
    hf_seq, enc = _hf_generate(hf, images, NEW_TOKENS, two)
    assert enc["image_grid_thw"].tolist() == [[1, 6, 8], [1, 6, 8]]
    assert og_seq.tolist() == hf_seq.tolist()
    assert len(og_seq) - enc["input_ids"].shape[1] >= 20


def test_package_files(packaged):
    src, pkg, report = packaged
    names = {"vision.onnx", "vision.onnx.data", "embedding.onnx", "embedding.onnx.data", "text.onnx",
             "text.onnx.data", "genai_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert names <= set(os.listdir(pkg))
    assert not [n for n in os.listdir(pkg.parent) if n.startswith(".")]  # no temporary left behind
    for n in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "chat_template.json"):
        assert (pkg / n).read_bytes() == (src / n).read_bytes()
    cfg = json.loads((pkg / "genai_config.json").read_text())["model"]
    src_cfg = json.loads((src / "config.json").read_text())
    assert cfg["type"] == "qwen2_5_vl"
    for k in ("image_token_id", "video_token_id", "vision_start_token_id"):
        assert cfg[k] == src_cfg[k]
    assert cfg["vision"]["inputs"] == {"pixel_values": "pixel_values", "image_grid_thw": "image_grid_thw"}
    assert cfg["decoder"]["inputs"]["inputs_embeds"] == "inputs_embeds" and "input_ids" not in cfg["decoder"]["inputs"]
    vision = onnx.load(str(pkg / "vision.onnx"), load_external_data=False)
    meta = {p.key: p.value for p in vision.metadata_props}
    assert meta["qvl_surgery.dynamic"] == "self"  # the toolkit's dynamic export, grid in the graph
    assert [i.name for i in vision.graph.input] == ["pixel_values", "image_grid_thw"]
    transforms = json.loads((pkg / "processor_config.json").read_text())["processor"]["transforms"]
    resize = next(t["operation"]["attrs"] for t in transforms if t["operation"]["type"] == "Resize")
    pre = json.loads((src / "preprocessor_config.json").read_text())
    assert (resize["min_pixels"], resize["max_pixels"]) == (pre["min_pixels"], pre["max_pixels"])
    assert any("onnxruntime-genai builder" in line for line in report.lines())


def test_embedding_model_scatters_features(packaged, tmp_path):
    """Pad tokens take feature rows in order; with no rows (every decode step), a generated pad
    token keeps its embedding, as in transformers."""
    src, pkg, _ = packaged
    ckpt = Checkpoint.read(src)
    from safetensors.torch import load_file
    table = load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"].numpy()
    s = ort.InferenceSession(str(pkg / "embedding.onnx"), providers=["CPUExecutionProvider"])
    ids = np.array([[5, ckpt.image_token_id, ckpt.image_token_id, 7], [ckpt.video_token_id, 9, 1, 2]], np.int64)
    feats = np.random.default_rng(0).standard_normal((3, ckpt.hidden_size)).astype(np.float32)
    out, = s.run(None, {"input_ids": ids, "image_features": feats})
    want = table[ids]
    want[0, 1], want[0, 2], want[1, 0] = feats[0], feats[1], feats[2]
    assert np.array_equal(out, want)
    out, = s.run(None, {"input_ids": ids[:, 1:2], "image_features": np.zeros((0, ckpt.hidden_size), np.float32)})
    assert np.array_equal(out, table[ids[:, 1:2]])
    # released checkpoints are bf16: the table is upcast while writing
    from safetensors.torch import save_file
    bf16 = tmp_path / "bf16"
    bf16.mkdir()
    for p in src.iterdir():
        if p.suffix != ".safetensors":
            (bf16 / p.name).write_bytes(p.read_bytes())
    save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(src / "model.safetensors")).items()},
              str(bf16 / "model.safetensors"))
    t, source = Checkpoint.read(bf16).embed_table()
    assert t.dims == list(table.shape)
    assert np.array_equal(source.make(), torch.from_numpy(table).to(torch.bfloat16).float().numpy())
    assert build_embedding_model(ckpt).sources["embed_tokens"].path == src / "model.safetensors"  # fp32: referenced


def test_refusals(packaged, tmp_path):
    src, pkg, _ = packaged
    with pytest.raises(BadInput, match="fp32 only"):
        package(src, tmp_path / "a", fp16=True)
    with pytest.raises(BadInput, match="outside the checkpoint"):
        package(src, src / "pkg")
    with pytest.raises(BadInput, match="already holds an earlier output"):
        package(src, pkg)
    with pytest.raises(BadInput, match="unknown runtime"):
        package(src, tmp_path / "a", runtime="mnn")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "config.json").write_text('{"architectures": ["Qwen2ForCausalLM"]}')
    with pytest.raises(BadInput, match="not Qwen2_5_VLForConditionalGeneration"):
        package(tmp_path / "text", tmp_path / "a")


def test_failed_builder_leaves_nothing(packaged, tmp_path):
    """A builder that fails after writing part of its output: one error naming the step, no package."""
    src = packaged[0]
    fake = tmp_path / "fake-python"
    fake.write_text("#!/bin/sh\nfor a; do case $prev in -o) mkdir -p \"$a\"; echo x > \"$a/text.onnx\";; esac; "
                    "prev=$a; done\necho 'builder exploded' >&2\nexit 3\n")
    fake.chmod(0o755)
    with pytest.raises(QvlError, match="onnxruntime-genai's builder.*\n.*builder exploded"):
        package(src, tmp_path / "out", builder_python=fake)
    assert not (tmp_path / "out").exists()
    assert os.listdir(tmp_path) == ["fake-python"]


def test_vision_passes_must_keep_the_runtime_contract(packaged, tmp_path):
    """The runtime feeds fp32 features to an fp32 decoder and needs one vision file."""
    weights = CheckpointWeights(packaged[0])
    with pytest.raises(BadInput, match="fp32 image features"):
        write_vision_model(weights, tmp_path / "v.onnx", "fp16")
    with pytest.raises(BadInput, match="split cannot be the last pass"):
        write_vision_model(weights, tmp_path / "v.onnx", "split:parts=2")
    assert os.listdir(tmp_path) == []


def test_package_cli(tmp_path):
    """The subcommand maps onto package(): bad input is one line with the CLI's flags."""
    from conftest import assert_one_line_error, cli
    ck = tmp_path / "ck"
    ck.mkdir()
    assert_one_line_error(cli("package", ck, "-o", tmp_path / "out", "--fp16"), "--fp16")
    assert_one_line_error(cli("package", tmp_path / "missing", "-o", tmp_path / "out"))
    assert not (tmp_path / "out").exists()
