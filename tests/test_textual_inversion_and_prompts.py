"""Textual inversion against diffusers' ``load_textual_inversion``, and AUTOMATIC1111's prompt syntax against
its own documented examples and an independent numpy computation of its weighting (tiny SD1 model, both
backends). The embedding files (diffusers, A1111 .pt, emb_params .safetensors) are made here."""

import copy
import os
import pickle
import warnings

import numpy as np
import pytest
import torch
from helpers import diffusers_pipeline, diffusers_scheduler_for, max_abs_error, rel_error, report
from PIL import Image
from safetensors.torch import save_file

from mlx_stablefused import (ImageToImageDiffusion, ModelSourceError, PromptTruncatedWarning, TextToImageDiffusion,
                             WeightLoadError)
from mlx_stablefused.cli import main
from mlx_stablefused.demo import write_byte_level_tokenizer
from mlx_stablefused.pipelines.lora_tags import LoraTagState
from mlx_stablefused.prompt_weighting import LoraTag, chunk_prompts, extract_lora_tags, parse_prompt_attention
from mlx_stablefused.tokenizer import CLIPTokenizer

# ------------------------------------------------------------------------------------- the parser
# AUTOMATIC1111 stable-diffusion-webui, modules/prompt_parser.py, parse_prompt_attention's docstring
# examples, re-typed (these are the documented outputs, floats included).
A1111_DOCSTRING_EXAMPLES = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.5730000000000004], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.4641000000000006], [".", 1.1]]),
]
# From the same function's code: BREAK (re_break = \s*\bBREAK\b\s*) gives the marker ["BREAK", -1]; a weight
# needs ":number)" with no space (": 1.3)" is text, the bracket then counts 1.1); a lone backslash is literal.
A1111_ALGORITHM_CASES = [
    ("a cat BREAK  a dog", [["a cat", 1.0], ["BREAK", -1], ["a dog", 1.0]]),
    ("(word: 1.3)", [["word: 1.3", 1.1]]),
    ("[[x]]", [["x", 1.0 * (1 / 1.1) * (1 / 1.1)]]),
    ("a\\b", [["ab", 1.0]]),
]


@pytest.mark.parametrize("text,expected", A1111_DOCSTRING_EXAMPLES + A1111_ALGORITHM_CASES)
def test_parser_gives_automatic1111s_documented_weights(text, expected):
    assert parse_prompt_attention(text) == expected


def test_lora_tags_are_parsed_and_removed():
    text, tags = extract_lora_tags("a <lora:inkStyle:0.8> cat, <lora:b> <lora:c:0.5:1.5> <lyco:d:te=0.2>")
    assert text == "a  cat,   "
    assert tags == [LoraTag("inkStyle", 0.8, 0.8), LoraTag("b", 1.0, 1.0), LoraTag("c", 0.5, 1.5),
                    LoraTag("d", 0.2, 0.2)]
    assert [tags[i].adapter_weight for i in (0, 1, 3)] == [0.8, 1.0, 0.2]
    with pytest.raises(ValueError, match="<lora:c:0.5:1.5>: separate text-encoder and UNet weights"):
        tags[2].adapter_weight
    for bad, message in [("<hypernet:x:1>", "only LoRA tags"), ("<lora:x:heavy>", "numbers"),
                         ("<lora::1>", "expected <lora:name>")]:
        with pytest.raises(ValueError, match=message):
            extract_lora_tags(f"a {bad} b")


# ---------------------------------------------------------------------------------- chunking
@pytest.fixture(scope="module")
def byte_tokenizers(tmp_path_factory):
    """The tiny models' byte-level CLIP tokenizer, with SD1's pad token and with SD2's ("!")."""
    out = {}
    for name, pad in (("sd1", "<|endoftext|>"), ("sd2", "!")):
        folder = tmp_path_factory.mktemp(f"tok-{name}")
        write_byte_level_tokenizer(folder, pad_token=pad)
        out[name] = CLIPTokenizer.from_folder(folder)
    return out


def chunk(tok, *content, pad=None):
    """BOS + content + EOS, then EOS (or ``pad`` after the first EOS) up to 77 ids: one A1111 chunk."""
    ids = [tok.bos_token_id, *content, tok.eos_token_id]
    return ids + [tok.eos_token_id if pad is None else pad] * (77 - len(ids))


def test_chunks_follow_automatic1111s_tokenize_line(byte_tokenizers, tmp_path):
    tok = byte_tokenizers["sd1"]
    x, y, a, b, comma = (tok.encode_ids(c)[0] for c in "xyab,")

    def ids(prompt, backtrack=20):
        (c,) = chunk_prompts(tok, [prompt], backtrack)
        return c.ids.tolist(), c.weights

    assert ids("x " * 150)[0] == [chunk(tok, *[x] * 75)] * 2  # 150 tokens: two full chunks
    assert ids("x " * 151)[0] == [chunk(tok, *[x] * 75)] * 2 + [chunk(tok, x)]
    assert ids("a BREAK b")[0] == [chunk(tok, a), chunk(tok, b)]
    assert ids("BREAK b")[0] == [chunk(tok), chunk(tok, b)]  # a BREAK first gives an empty chunk
    # A comma within the last 20 tokens of a full chunk: the words after it move to the next chunk.
    prompt = "a " * 70 + ", " + "b " * 10
    assert ids(prompt)[0] == [chunk(tok, *[a] * 70, comma), chunk(tok, *[b] * 10)]
    assert ids(prompt, backtrack=0)[0] == [chunk(tok, *[a] * 70, comma, *[b] * 4), chunk(tok, *[b] * 6)]
    # Weights per token; BOS, EOS and padding keep 1.
    got, weights = ids("x (y:1.3) [a]")
    assert got == [chunk(tok, x, y, a)]
    np.testing.assert_array_equal(weights[0, :5], np.float32([1, 1, 1.3, 1 / 1.1, 1]))
    assert (weights[0, 5:] == 1).all()
    # SD 2: the pad token after the first EOS, as A1111's process_tokens writes it.
    sd2 = byte_tokenizers["sd2"]
    (c,) = chunk_prompts(sd2, ["x y"])
    assert c.ids.tolist() == [chunk(sd2, x, y, pad=sd2.pad_token_id)]
    # A multi-vector embedding is never split across chunks, and its vectors share the weight.
    first, second, third = tok.add_tokens(["<m>", "<m>_1", "<m>_2"])
    got, weights = ids("x " * 74 + "(<m>:1.2)")
    assert got == [chunk(tok, *[x] * 74), chunk(tok, first, second, third)]
    np.testing.assert_array_equal(weights[1, 1:4], np.float32([1.2] * 3))
    # Prompts of different chunk counts are padded with the empty prompt's chunk.
    short, long = chunk_prompts(tok, ["y", "x " * 80])
    assert short.ids.tolist() == [chunk(tok, y), chunk(tok)] and len(long.ids) == 2


# ------------------------------------------------------------------------- weighting vs numpy
def reference_weighted(text_encoder, tokenizer, fragments):
    """An independent A1111 encoding: fragments (text, weight) tokenized by transformers, cut into chunks of
    75 (no commas: no backtracking), each encoded and weighted, ``z *= original_mean / new_mean``."""
    ids, weights = [], []
    for text, weight in fragments:
        new = tokenizer(text, add_special_tokens=False).input_ids
        ids, weights = ids + new, weights + [weight] * len(new)
    out = []
    for start in range(0, max(len(ids), 1), 75):
        part, w = ids[start:start + 75], weights[start:start + 75]
        fill = 76 - len(part)
        row = [tokenizer.bos_token_id] + part + [tokenizer.eos_token_id] * fill
        with torch.no_grad():
            z = text_encoder(torch.tensor([row])).last_hidden_state[0].double().numpy()
        mean = z.mean()
        z = z * np.array([1.0] + w + [1.0] * fill)[:, None]
        out.append(z * (mean / z.mean()))
    return np.concatenate(out)


def test_weighted_long_prompts_match_an_independent_computation(sd1, pipelines, backend_name):
    """A 2-chunk weighted prompt and a 1-chunk weighted negative (padded with the empty prompt's chunk)."""
    ref_pipe, root = sd1
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    pipe.enable_prompt_weighting()
    prompt = "a (red:1.3) cat [blue] " + "y " * 80 + "((sky))"
    negative = "(ugly:1.2) hands"
    embedding = pipe.backend.to_numpy(pipe.prompt_to_embedding(prompt, negative))
    te, tok = ref_pipe.text_encoder, ref_pipe.tokenizer
    cond = reference_weighted(te, tok, [("a ", 1.0), ("red", 1.3), (" cat ", 1.0), ("blue", 1 / 1.1),
                                        (" " + "y " * 80, 1.0), ("sky", 1.1 * 1.1)])
    uncond = np.concatenate([reference_weighted(te, tok, [("ugly", 1.2), (" hands", 1.0)]),
                             reference_weighted(te, tok, [("", 1.0)])])
    assert embedding.shape == (2, 154, 32)
    assert report("A1111 weighted embeddings vs numpy on transformers (rel.)",
                  rel_error(embedding, np.stack([uncond, cond]))) < 1e-5


@pytest.mark.parametrize("model", ["sd1", "sd2"])
def test_77_tokens_or_fewer_give_exactly_the_plain_embedding(model, request, pipelines, backend_name):
    _, root = request.getfixturevalue(model)
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name)
    prompts, negatives = ["x " * 75, "a photo of the cat"], ["", "blurry, ugly"]  # 75 + BOS + EOS = 77
    plain = pipe.backend.to_numpy(pipe.prompt_to_embedding(prompts, negatives))
    pipe.enable_prompt_weighting()
    assert np.array_equal(pipe.backend.to_numpy(pipe.prompt_to_embedding(prompts, negatives)), plain)
    assert ImageToImageDiffusion.from_pipeline(pipe).prompt_syntax == "a1111"  # a setting from_pipeline copies
    # One token more: the plain path cuts it with a warning, the chunked one makes a second chunk.
    with pytest.warns(PromptTruncatedWarning):
        pipe.disable_prompt_weighting()
        pipe.prompt_to_embedding("x " * 76)
    pipe.enable_prompt_weighting()
    with warnings.catch_warnings():
        warnings.simplefilter("error", PromptTruncatedWarning)
        assert tuple(pipe.prompt_to_embedding("x " * 76).shape) == (2, 154, 32)


@pytest.fixture(scope="module")
def long_context_reference(sd1):
    """diffusers' image for given 2-chunk (154-token) embeddings: its UNet takes any context length."""
    return {}


def test_pipelines_run_on_chunked_embeddings_as_diffusers_does(sd1, pipelines, backend_name, long_context_reference):
    ref_pipe, root = sd1
    pipe = pipelines.pipeline(TextToImageDiffusion, root, backend_name, scheduler="ddim")
    pipe.enable_prompt_weighting()
    run = dict(prompt="a (red:1.4) boat BREAK on the sea", negative_prompt="[ugly]", num_inference_steps=2,
               guidance_scale=7.5, output_type="np")
    latent = np.random.default_rng(3).standard_normal((1, 4, 4, 4)).astype(np.float32)
    ours = pipe(latent=latent, **run)
    embedding = pipe.backend.to_numpy(pipe.prompt_to_embedding(run["prompt"], run["negative_prompt"]))
    assert embedding.shape == (2, 154, 32)
    if "image" not in long_context_reference:
        with torch.no_grad():
            reference = diffusers_pipeline(ref_pipe, scheduler=diffusers_scheduler_for(root, "ddim"))
            long_context_reference["image"] = reference(
                prompt_embeds=torch.from_numpy(embedding[1:]), negative_prompt_embeds=torch.from_numpy(embedding[:1]),
                latents=torch.from_numpy(latent), num_inference_steps=2, guidance_scale=7.5, height=32, width=32,
                output_type="np").images
    assert report("A1111 2-chunk context: image vs diffusers (max abs)",
                  max_abs_error(ours, long_context_reference["image"])) < 5e-3


# ---------------------------------------------------------------------------- textual inversion
@pytest.fixture(scope="module")
def embedding_files(tmp_path_factory):
    """One embedding per format, made here: {name: (path, token, vectors (n, 32))}."""
    folder = tmp_path_factory.mktemp("embeddings")
    rng = np.random.default_rng(11)
    vec = {n: torch.from_numpy(rng.standard_normal(shape).astype(np.float32) * 0.5)
           for n, shape in (("single", (32,)), ("pt", (3, 32)), ("emb", (2, 32)), ("bin", (2, 32)))}
    (folder / "diffusers").mkdir()
    save_file({"<cat-toy>": vec["single"]}, str(folder / "diffusers" / "learned_embeds.safetensors"))
    (folder / "diffusers-bin").mkdir()
    torch.save({"<bin-two>": vec["bin"]}, folder / "diffusers-bin" / "learned_embeds.bin")
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.nn.Parameter(vec["pt"])},
                "name": "charturner", "step": 1500, "sd_checkpoint": "a9263745", "sd_checkpoint_name": "v1-5"},
               folder / "charturner.pt")  # AUTOMATIC1111's own .pt layout
    save_file({"emb_params": vec["emb"]}, str(folder / "bad-hands.safetensors"))
    torch.save({"<narrow>": torch.zeros(16)}, folder / "narrow.bin")
    save_file({"lora_unet_a.lora_up.weight": torch.zeros(4, 2), "lora_unet_a.alpha": torch.ones(())},
              str(folder / "not-an-embedding.safetensors"))
    return {"diffusers": (folder / "diffusers", "<cat-toy>"), "bin": (folder / "diffusers-bin", "<bin-two>"),
            "pt": (folder / "charturner.pt", "charturner"), "emb": (folder / "bad-hands.safetensors", "bad-hands"),
            "narrow": (folder / "narrow.bin", "<narrow>"), "lora": (folder / "not-an-embedding.safetensors", None)}


TI_PROMPTS = ["a <cat-toy> on charturner, bad-hands", "<bin-two> and charturner"]
TI_NEGATIVES = ["bad-hands", ""]


@pytest.fixture(scope="module")
def diffusers_with_embeddings(sd1, embedding_files):
    """diffusers with the four embeddings loaded, on copies of the session's tokenizer and text encoder."""
    session = sd1[0]
    ref = diffusers_pipeline(session)
    ref.register_modules(tokenizer=copy.deepcopy(session.tokenizer), text_encoder=copy.deepcopy(session.text_encoder))
    ref.load_textual_inversion([str(embedding_files[k][0]) for k in ("diffusers", "pt", "bin")])
    ref.load_textual_inversion(str(embedding_files["emb"][0]), token="bad-hands")  # diffusers: token "emb_params"
    latent = np.random.default_rng(5).standard_normal((2, 4, 4, 4)).astype(np.float32)
    with torch.no_grad():
        prompt_embeds, negative_embeds = ref.encode_prompt(TI_PROMPTS, "cpu", 1, True, negative_prompt=TI_NEGATIVES)
        image = ref(TI_PROMPTS, negative_prompt=TI_NEGATIVES, latents=torch.from_numpy(latent), num_inference_steps=2,
                    height=32, width=32, output_type="np").images
    return ref, np.concatenate([negative_embeds.numpy(), prompt_embeds.numpy()]), latent, image


@pytest.fixture(scope="module")
def pipes_with_embeddings(sd1, embedding_files):
    """Our pipeline per backend with the four embeddings loaded (private models: embeddings change them)."""
    loaded = {}

    def get(backend):
        if backend not in loaded:
            pipe = TextToImageDiffusion(sd1[1], backend=backend, progress=False)
            added = pipe.load_textual_inversion([embedding_files[k][0] for k in ("diffusers", "pt", "bin")])
            added += pipe.load_textual_inversion(embedding_files["emb"][0])  # token: the file's name, as A1111's
            loaded[backend] = pipe, added
        return loaded[backend]

    return get


def test_textual_inversion_matches_diffusers(embedding_files, diffusers_with_embeddings, pipes_with_embeddings,
                                             backend_name):
    """All three formats, single- and multi-vector, loaded as a list and one by one: the tokenizer's ids and
    the text embeddings equal diffusers' ``load_textual_inversion``; bad embeddings are refused."""
    ref, ref_embedding, _, _ = diffusers_with_embeddings
    pipe, added = pipes_with_embeddings(backend_name)
    assert added == ["<cat-toy>", "charturner", "charturner_1", "charturner_2", "<bin-two>", "<bin-two>_1",
                     "bad-hands", "bad-hands_1"]
    for prompt in TI_PROMPTS + TI_NEGATIVES:
        expected = ref.tokenizer(ref.maybe_convert_prompt(prompt, ref.tokenizer), padding="max_length",
                                 max_length=77).input_ids
        assert pipe.tokenizer([prompt])[0].tolist() == expected
    embedding = pipe.backend.to_numpy(pipe.prompt_to_embedding(TI_PROMPTS, TI_NEGATIVES))
    assert report("textual inversion: embeddings vs diffusers (rel.)", rel_error(embedding, ref_embedding)) < 1e-4
    # A multi-vector name with capitals, or written in another case, gets all its vectors (diffusers: the first).
    tok = pipe.tokenizer
    pipe.load_textual_inversion({"EasyNeg": np.ones((3, 32), np.float32)})
    vectors = [tok.added_tokens[t] for t in ("EasyNeg", "EasyNeg_1", "EasyNeg_2")]
    expected = [tok.bos_token_id, *tok.encode_ids("a"), *vectors, *tok.encode_ids(", x"), tok.eos_token_id]
    assert tok(["a EasyNeg, x"])[0].tolist()[:8] == tok(["a easyneg, x"])[0].tolist()[:8] == expected
    if pipe.backend.release_text_encoder():  # MLX's low-memory mode re-reads the weights: the rows stay
        assert np.array_equal(pipe.backend.to_numpy(pipe.prompt_to_embedding(TI_PROMPTS, TI_NEGATIVES)), embedding)
    # Refusals, before anything changes: the wrong width (file, expected and found widths), a known token.
    size = len(pipe.tokenizer)
    with pytest.raises(ValueError, match=r"narrow\.bin: the embedding for '<narrow>' is 16 wide, .* takes 32-wide"):
        pipe.load_textual_inversion([embedding_files["diffusers"][0], embedding_files["narrow"][0]],
                                    token=["<fresh>", None])
    with pytest.raises(ValueError, match="Token <cat-toy> already in tokenizer vocabulary"):
        pipe.load_textual_inversion(embedding_files["diffusers"][0])
    with pytest.raises(ValueError, match="already in tokenizer vocabulary"):
        pipe.load_textual_inversion({"<|endoftext|>": np.zeros(32, np.float32)})
    with pytest.raises(WeightLoadError, match=r"not-an-embedding.safetensors is not a textual-inversion embedding.*"
                                              r"found \['lora_unet_a.alpha', 'lora_unet_a.lora_up.weight'\]"):
        pipe.load_textual_inversion(embedding_files["lora"][0])
    with pytest.raises(ModelSourceError, match="no textual-inversion file in .* \\(looked for learned_embeds"):
        pipe.load_textual_inversion(embedding_files["lora"][0].parent)
    assert len(pipe.tokenizer) == size and "<fresh>" not in pipe.tokenizer


@pytest.mark.parametrize("backend", ["mlx", pytest.param("torch", marks=pytest.mark.slow)])
def test_textual_inversion_images_match_diffusers(diffusers_with_embeddings, pipes_with_embeddings, backend):
    _, _, latent, ref_image = diffusers_with_embeddings
    pipe, _ = pipes_with_embeddings(backend)
    image = pipe(TI_PROMPTS, negative_prompt=TI_NEGATIVES, latent=latent, num_inference_steps=2, output_type="np")
    assert report("textual inversion: images vs diffusers (max abs)", max_abs_error(image, ref_image)) < 5e-3


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/mlx_stablefused_ti_pwned",))


def test_a_malicious_embedding_pickle_is_refused_not_executed(tmp_path, sd1, pipelines):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"string_to_param": {"*": _Exploit()}, "name": "evil"}, f, protocol=2)
    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1])
    with pytest.raises(WeightLoadError, match="nothing was executed"):
        pipe.load_textual_inversion(path)
    assert not os.path.exists("/tmp/mlx_stablefused_ti_pwned") and "evil" not in pipe.tokenizer


# ---------------------------------------------------------------------------------- LoRA tags, CLI
class RecordingLoras:
    """Stands in for the LoRA methods (diffusers' names) and records the calls."""

    def __init__(self):
        self.calls = []

    def load_lora_weights(self, path, adapter_name=None):
        self.calls.append(("load", os.path.basename(path), adapter_name))

    def set_adapters(self, names, adapter_weights=None):
        self.calls.append(("set", list(names), list(adapter_weights)))


def test_lora_tags_in_prompts_load_and_weight_adapters(sd1, pipelines, tmp_path, monkeypatch):
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "ink.safetensors").write_bytes(b"")
    pipe = pipelines.pipeline(TextToImageDiffusion, sd1[1])
    loras = RecordingLoras()
    monkeypatch.setattr(pipe, "load_lora_weights", loras.load_lora_weights, raising=False)
    monkeypatch.setattr(pipe, "set_adapters", loras.set_adapters, raising=False)
    plain = pipe.backend.to_numpy(pipe.prompt_to_embedding("a cat"))
    pipe.enable_prompt_weighting()
    with pytest.raises(ValueError, match=r"LoRA tags \(<lora:ink>\); pass enable_prompt_weighting\(lora_dir"):
        pipe.prompt_to_embedding("a <lora:ink:0.8> cat")
    pipe.enable_prompt_weighting(lora_dir=tmp_path)
    tagged = pipe.backend.to_numpy(pipe.prompt_to_embedding("a <lora:ink:0.8> cat"))
    assert np.array_equal(tagged, plain)  # the tag is not text
    pipe.prompt_to_embedding("a cat", negative_prompt="<lora:ink:0.3>")  # a negative prompt's tags are text (A1111)
    with pytest.raises(ValueError, match=r"<lora:nope>: no nope"):
        pipe.prompt_to_embedding("<lora:nope:1>")
    assert loras.calls == [("load", "ink.safetensors", "ink"), ("set", ["ink"], [0.8]), ("set", ["ink"], [0.0])]
    with pytest.raises(NotImplementedError, match="load_lora_weights"):
        LoraTagState(tmp_path).apply(object(), [LoraTag("ink")])


def test_cli_reads_a1111_syntax_and_embeddings_by_default(sd1, embedding_files, tmp_path):
    _, root = sd1
    path, token = embedding_files["pt"]
    prompt = f"a (red:1.4) boat, {token} BREAK on the sea"
    argv = ["txt2img", "--model", str(root), "--steps", "2", "--height", "32", "--width", "32", "--no-progress",
            "--seed", "1", "--prompt", prompt, "--textual-inversion", str(path)]
    assert main([*argv, "--output", str(tmp_path / "a1111.png")]) == 0
    assert main([*argv, "--output", str(tmp_path / "plain.png"), "--plain-prompts"]) == 0
    pipe = TextToImageDiffusion(root, progress=False)
    pipe.load_textual_inversion(path)
    pipe.enable_prompt_weighting()
    weighted = np.asarray(pipe(prompt, num_inference_steps=2, image_height=32, image_width=32, seed=1)[0])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a1111.png")), weighted)
    assert not np.array_equal(np.asarray(Image.open(tmp_path / "plain.png")), weighted)
    assert main([*argv, "--output", str(tmp_path / "x.png"), "--lora-dir", str(tmp_path / "none")]) == 1


def reference_weighted_sdxl(text_encoder, tokenizer, fragments, chunks):
    """The same independent A1111 encoding on one SDXL encoder: penultimate hidden states, the pad token after
    the first EOS, ``chunks`` chunks (empty ones appended); returns (states, the first chunk's pooled output)."""
    ids, weights = [], []
    for text, weight in fragments:
        new = tokenizer(text, add_special_tokens=False).input_ids
        ids, weights = ids + new, weights + [weight] * len(new)
    out, pooled = [], None
    for c in range(chunks):
        part, w = ids[75 * c:75 * c + 75], weights[75 * c:75 * c + 75]
        fill = 75 - len(part)
        row = [tokenizer.bos_token_id] + part + [tokenizer.eos_token_id] + [tokenizer.pad_token_id] * fill
        with torch.no_grad():
            result = text_encoder(torch.tensor([row]), output_hidden_states=True)
        z = result.hidden_states[-2][0].double().numpy()
        if c == 0:
            pooled = (result.text_embeds if hasattr(result, "text_embeds") else result.pooler_output)[0].numpy()
        mean = z.mean()
        z = z * np.array([1.0] + w + [1.0] * (fill + 1))[:, None]
        out.append(z * (mean / z.mean()))
    return np.concatenate(out), pooled


def test_sdxl_reads_a1111_syntax_on_both_encoders(sdxl, pipelines):
    """Each encoder weights and mean-restores its own penultimate states, both padded to one chunk count and
    concatenated; the pooled embedding is the second encoder's first chunk (AUTOMATIC1111's SDXL conditioner).
    Short unweighted prompts give exactly the plain path's embeddings."""
    ref_pipe, root = sdxl
    pipe = pipelines.pipeline(TextToImageDiffusion, root, "mlx")
    plain_prompt, negative = "a photo of a cat", "blurry"
    plain = [pipe.backend.to_numpy(a) for a in pipe.prompt_to_embedding(plain_prompt, negative)]
    pipe.enable_prompt_weighting()
    same = [pipe.backend.to_numpy(a) for a in pipe.prompt_to_embedding(plain_prompt, negative)]
    assert all(np.array_equal(a, b) for a, b in zip(plain, same))
    prompt = "a (red:1.3) cat " + "y " * 80 + "[sky]"
    text, pooled = (pipe.backend.to_numpy(a) for a in pipe.prompt_to_embedding(prompt, negative))
    fragments = [("a ", 1.0), ("red", 1.3), (" cat " + "y " * 80, 1.0), ("sky", 1 / 1.1)]
    encoders = [(ref_pipe.text_encoder, ref_pipe.tokenizer), (ref_pipe.text_encoder_2, ref_pipe.tokenizer_2)]
    cond = [reference_weighted_sdxl(te, tok, fragments, 2) for te, tok in encoders]
    uncond = [reference_weighted_sdxl(te, tok, [(negative, 1.0)], 2) for te, tok in encoders]
    expected = np.stack([np.concatenate([u[0] for u in uncond], -1), np.concatenate([c[0] for c in cond], -1)])
    assert text.shape == (2, 154, expected.shape[-1])
    assert report("A1111 SDXL weighted embeddings vs numpy on transformers (rel.)", rel_error(text, expected)) < 1e-5
    assert report("A1111 SDXL pooled embeddings vs transformers (rel.)",
                  rel_error(pooled, np.stack([uncond[1][1], cond[1][1]]))) < 1e-5
