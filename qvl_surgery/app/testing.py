"""A tiny random Qwen2.5-VL checkpoint, made offline, for tests and demos of whole-model tools.

``make_tiny_checkpoint(path)`` writes what a released Qwen2.5-VL checkpoint folder holds, at toy
size: ``config.json`` + ``model.safetensors`` (``save_pretrained`` of transformers'
``Qwen2_5_VLForConditionalGeneration``, random weights from a fixed seed), a byte-level BPE
``tokenizer.json`` trained here with the ``tokenizers`` library in the structure of Qwen2's (NFC
normalizer, Qwen's split regex, ByteLevel pre-tokenizer/decoder, Qwen's 22 special tokens placed
after the learned tokens, as in the real vocabulary), ``tokenizer_config.json`` with Qwen's chat
template, ``preprocessor_config.json`` (Qwen2-VL image processor) and ``generation_config.json``.

The config's token ids (image/video pad, vision start/end, eos) are the tokenizer's, and
``vocab_size`` is rounded up past the special tokens like the released models' (151936 rows for
151665 tokens). Nothing loads from a hub.
"""
from __future__ import annotations

import json
from pathlib import Path

# Qwen2's special tokens in their order (151643.. in the released vocabulary); True = special.
QWEN_SPECIAL_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True),
    ("<|object_ref_start|>", True), ("<|object_ref_end|>", True), ("<|box_start|>", True),
    ("<|box_end|>", True), ("<|quad_start|>", True), ("<|quad_end|>", True),
    ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False), ("<|repo_name|>", False), ("<|file_sep|>", False),
)

# Qwen2's pre-tokenizer split pattern (tokenizer.json of every Qwen2/2.5 model).
QWEN_SPLIT_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                    r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# Qwen2-VL's chat template, shortened to what a single-turn image/video chat uses.
QWEN_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Text the tiny BPE is trained on: enough repeated pairs for a few hundred merges.
_CORPUS = (
    "A picture is worth a thousand words. Describe this image in one sentence. "
    "The quick brown fox jumps over the lazy dog, then the dog sleeps in the sun. "
    "What is in the picture? There is a red square, a green circle and a blue line. "
    "Vision language models read images and text; the encoder turns patches into tokens. "
    "Numbers 0 1 2 3 4 5 6 7 8 9 and 2025, 448x448, 3.14! Hello, world? Tab\tnew\nline. "
    "Caf\u00e9 na\u00efve \u00fcber \u4f60\u597d \u4e16\u754c emoji \U0001f600 done."
)


def train_tokenizer(vocab_learned: int = 384):
    """A byte-level BPE `tokenizers.Tokenizer` with Qwen2's pipeline and special tokens.

    ``vocab_learned`` bytes+merges come first (ids 0..), then the special tokens in Qwen's order.
    Training on a fixed corpus is deterministic."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, \
        processors, trainers
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_learned, min_frequency=1, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[])
    tok.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=s, normalized=False, lstrip=False, rstrip=False, single_word=False)
                            for t, s in QWEN_SPECIAL_TOKENS])
    return tok


def make_tiny_checkpoint(path: str | Path, *, seed: int = 0, tie_word_embeddings: bool = False,
                         weight_scale: float = 0.3) -> Path:
    """Write a tiny random Qwen2.5-VL checkpoint folder at ``path``; returns the path.

    The text model: 2 layers, hidden 64, 4 heads (head_dim 16, GQA with 2 kv heads), mrope
    [2, 3, 3]. The vision tower: the toolkit's tiny preset (depth 4, windows and full blocks)
    with its merger sized to the text hidden size. ``weight_scale`` is the std of the random
    linear weights: larger than transformers' 0.02 init so logits are spread and greedy
    decoding has clear winners (the runtime's float differences cannot flip a choice)."""
    import torch
    from transformers import GenerationConfig, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, \
        Qwen2TokenizerFast, Qwen2VLImageProcessor

    from qvl_surgery.core.config import PRESETS

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer()
    ids = {t: tok.token_to_id(t) for t, _ in QWEN_SPECIAL_TOKENS}
    n_tokens = tok.get_vocab_size(with_added_tokens=True)
    vocab_size = -(-n_tokens // 64) * 64  # padded rows, as in the released 151936
    hidden = 64
    vision = dict(PRESETS["tiny"].to_dict(), out_hidden_size=hidden, tokens_per_second=2)
    cfg = Qwen2_5_VLConfig(
        vision_config=vision, vocab_size=vocab_size, hidden_size=hidden, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        max_window_layers=2, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie_word_embeddings,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        vision_token_id=ids["<|vision_pad|>"], image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], torch_dtype="float32")
    cfg.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed)
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.startswith("visual."):  # non-trivial biases and norms so a wrong mapping shows
                p.add_(noise * 0.05)
            elif p.dim() >= 2:
                p.copy_(noise * weight_scale)
            else:  # text norms and biases
                p.add_(noise * 0.05)
    model.save_pretrained(path, safe_serialization=True)
    model.generation_config = GenerationConfig(
        bos_token_id=ids["<|endoftext|>"], eos_token_id=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad_token_id=ids["<|endoftext|>"], do_sample=False)
    model.generation_config.save_pretrained(path)

    fast = Qwen2TokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                              unk_token=None, bos_token=None, errors="replace", clean_up_tokenization_spaces=False,
                              model_max_length=32768, split_special_tokens=False)
    fast.chat_template = QWEN_VL_CHAT_TEMPLATE
    fast.save_pretrained(path)
    Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=28 * 28 * 256).save_pretrained(path)
    (path / "chat_template.json").write_text(json.dumps({"chat_template": QWEN_VL_CHAT_TEMPLATE}, indent=2))
    return path
