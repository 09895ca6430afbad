"""Tokenizer equality with transformers' CLIPTokenizer on the real CLIP vocabulary."""

import warnings

import pytest
from helpers import BUNDLED_TOKENIZER

from mlx_stablefused import PromptTruncatedWarning
from mlx_stablefused.tokenizer import CLIPTokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF AN ASTRONAUT, Riding A Horse!!!",
    "",
    " ",
    "   leading and trailing spaces   ",
    "tabs\tand\nnew\r\nlines",
    "don't stop-believing; (hold) [on] {to} <that> feelin'",
    "it's, we're, they've, I'm, you'll, he'd",
    "3.14159 is pi, 2+2=4, 100% sure, $5 #hash @at",
    "café, naïve, façade, Ångström, Straße",
    "日本語のテキストと漢字",
    "emoji 🚀🔥👩‍🚀 mixed with text",
    "Ünïcödé ✓ ✗ → ← ©®™",
    "masterpiece, best quality, ultra-detailed, 8k uhd, dslr, soft lighting, film grain",
    "(((very))) [[weighted]] {{prompt}} syntax::1.5",
    "a" * 300,
    "word " * 80,
    "the quick brown fox jumps over the lazy dog " * 5,
    "newline at end\n",
    "mixed CASE WiTh NuMbErS 123abc456",
    "hyphen-ated and under_scored and slash/ed",
    "quotes \"double\" and 'single' and `back`",
    "<|endoftext|> inside a prompt",
    "<|startoftext|>start token literal",
    "ellipsis... and — dashes – here",
    "Ελληνικά και Русский текст",
    "العربية نص",
    "a portrait of a woman, oil on canvas, by rembrandt, trending on artstation",
    "tokens" * 40,
    "1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 31 32 33 34 35 36 37 38 39",
]

needs_vocab = pytest.mark.skipif(not BUNDLED_TOKENIZER.is_dir(), reason="real CLIP vocabulary not available")


@pytest.fixture(scope="module", params=["<|endoftext|>", "!"], ids=["sd1-pad", "sd2-pad"])
def tokenizers(request, clip_vocabulary, tmp_path_factory):
    from transformers import CLIPTokenizer as Reference

    pad = request.param
    ref = Reference.from_pretrained(str(clip_vocabulary), pad_token=pad)
    folder = tmp_path_factory.mktemp("tok")
    ref.save_pretrained(str(folder))
    ours = CLIPTokenizer.from_folder(folder)
    return ref, ours


@needs_vocab
@pytest.mark.parametrize("prompt", PROMPTS)
def test_matches_transformers(tokenizers, prompt):
    ref, ours = tokenizers
    expected = ref(prompt, padding="max_length", max_length=77, truncation=True).input_ids
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptTruncatedWarning)
        got = ours(prompt)[0].tolist()
    assert got == expected


@needs_vocab
def test_pad_token_follows_model(tokenizers):
    ref, ours = tokenizers
    assert ours.pad_token_id == ref.pad_token_id
    assert ours("hi")[0, -1] == ref.pad_token_id


@needs_vocab
def test_vocab_and_merges_files_equal_tokenizer_json(clip_vocabulary):
    a = CLIPTokenizer.from_folder(clip_vocabulary)
    assert a.vocab_size == 49408 and a.bos_token_id == 49406 and a.eos_token_id == 49407
    assert a.tokenize("a photo of a cat") == [49406, 320, 1125, 539, 320, 2368, 49407]


@needs_vocab
def test_long_prompt_warns_and_keeps_eos(clip_vocabulary):
    tok = CLIPTokenizer.from_folder(clip_vocabulary)
    with pytest.warns(PromptTruncatedWarning, match="dropped") as caught:
        ids = tok("word " * 100)
    message = str(caught[0].message)
    assert "prompt is 102 tokens" in message and len(message) < 200 and message.endswith("...'")  # a short excerpt
    assert ids.shape == (1, 77) and ids[0, 0] == 49406 and ids[0, -1] == 49407


def test_batch_shape_and_types(tmp_path):
    from mlx_stablefused.demo import write_byte_level_tokenizer

    write_byte_level_tokenizer(tmp_path)
    tok = CLIPTokenizer.from_folder(tmp_path)
    ids = tok(["the cat", "and the dog"])
    assert ids.shape == (2, 77)
    with pytest.raises(TypeError):
        tok(["ok", 3])


def test_missing_tokenizer_files(tmp_path):
    from mlx_stablefused import ModelSourceError

    with pytest.raises(ModelSourceError, match="no tokenizer"):
        CLIPTokenizer.from_folder(tmp_path)
