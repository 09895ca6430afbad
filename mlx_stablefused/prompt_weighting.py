"""AUTOMATIC1111's prompt syntax: attention weights, prompts of any length, ``BREAK``, ``<lora:...>`` tags.

Mirrors stable-diffusion-webui (modules/prompt_parser.py ``parse_prompt_attention``, modules/sd_hijack_clip.py
``tokenize_line`` / ``process_tokens``, modules/sd_emphasis.py ``EmphasisOriginal``, modules/extra_networks.py):

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``[text]`` divides it by 1.1, ``(text:1.3)`` sets a
  factor, brackets nest (factors multiply), unbalanced ones close at the end, ``\\(`` ``\\)`` ``\\[`` ``\\]``
  ``\\\\`` are literal characters;
* the tokens are cut into chunks of 75, each encoded on its own as BOS + 75 tokens (padded with EOS) + EOS,
  SD 2's pad token after the first EOS; ``BREAK`` starts a new chunk; when a chunk fills up and a comma came
  within the last 20 tokens (``comma_padding_backtrack``), the words after the comma move to the next chunk;
  a multi-vector textual-inversion embedding is never split across chunks;
* the hidden states of a chunk are multiplied by their tokens' weights and rescaled to the chunk's original
  mean (``z * w; z *= original_mean / new_mean``), per prompt: AUTOMATIC1111 takes that mean over the whole
  batch of prompts it encodes at once, which makes a prompt's embedding depend on its neighbours;
* prompts of different chunk counts (a prompt and its negative prompt, prompts of one batch) are padded with
  empty chunks (the encoded empty prompt) to the same length, as AUTOMATIC1111's "pad prompt/negative prompt"
  option does, so that all run through the UNet as one batch of 77 x k context tokens.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

CHUNK_LENGTH = 75  # prompt tokens per chunk (77 with BOS and EOS)
ROUND_BRACKET_MULTIPLIER = 1.1
SQUARE_BRACKET_MULTIPLIER = 1 / 1.1
COMMA_PADDING_BACKTRACK = 20  # AUTOMATIC1111's default opts.comma_padding_backtrack
BREAK = ("BREAK", -1.0)  # parse_prompt_attention's marker for a chunk break

_ATTENTION = re.compile(r"""
\\\(|\\\)|\\\[|\\]|\\\\|\\|   # escapes and a lone backslash
\(|\[|                        # openings
:([+-]?[.\d]+)\)|             # (text:weight) closing
\)|]|                         # closings
[^\\()\[\]:]+|                # plain text
:
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NETWORK = re.compile(r"<(\w+):([^>]+)>")
LORA_TAG_KINDS = ("lora", "lyco")  # AUTOMATIC1111's LoRA extra network and its alias


def parse_prompt_attention(text: str) -> list[list]:
    """``[[text, weight], ...]`` for a prompt in AUTOMATIC1111's syntax; ``["BREAK", -1]`` marks a chunk break.

    >>> parse_prompt_attention('an (important) word')
    [['an ', 1.0], ['important', 1.1], [' word', 1.0]]
    """
    res: list[list] = []
    round_brackets: list[int] = []
    square_brackets: list[int] = []

    def multiply_range(start: int, multiplier: float) -> None:
        for item in res[start:]:
            item[1] *= multiplier

    for match in _ATTENTION.finditer(text):
        part, weight = match.group(0), match.group(1)
        if part.startswith("\\"):
            res.append([part[1:], 1.0])
        elif part == "(":
            round_brackets.append(len(res))
        elif part == "[":
            square_brackets.append(len(res))
        elif weight is not None and round_brackets:
            multiply_range(round_brackets.pop(), float(weight))
        elif part == ")" and round_brackets:
            multiply_range(round_brackets.pop(), ROUND_BRACKET_MULTIPLIER)
        elif part == "]" and square_brackets:
            multiply_range(square_brackets.pop(), SQUARE_BRACKET_MULTIPLIER)
        else:
            for i, piece in enumerate(_BREAK.split(part)):
                if i > 0:
                    res.append(list(BREAK))
                res.append([piece, 1.0])
    for position in round_brackets:
        multiply_range(position, ROUND_BRACKET_MULTIPLIER)
    for position in square_brackets:
        multiply_range(position, SQUARE_BRACKET_MULTIPLIER)
    if not res:
        res = [["", 1.0]]
    i = 0  # merge runs of equal weights
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return res


# ------------------------------------------------------------------------------------------ LoRA tags
@dataclass(frozen=True)
class LoraTag:
    """``<lora:name:te:unet>``: text-encoder multiplier ``te`` (default 1), UNet multiplier ``unet``
    (default: ``te``); ``te=`` / ``unet=`` may be named, as in AUTOMATIC1111's Lora extension."""

    name: str
    text_encoder_weight: float = 1.0
    unet_weight: float = 1.0

    @classmethod
    def parse(cls, kind: str, arguments: str) -> "LoraTag":
        tag = f"<{kind}:{arguments}>"
        if kind not in LORA_TAG_KINDS:
            raise ValueError(f"prompt tag {tag}: only LoRA tags (<lora:name:weight>) are supported, not {kind!r}")
        items = arguments.split(":")
        positional = [i for i in items if "=" not in i]
        named = dict(i.split("=", 1) for i in items if "=" in i)
        unknown = set(named) - {"te", "unet"}
        if not positional or not positional[0] or unknown:
            raise ValueError(f"prompt tag {tag}: expected <lora:name>, <lora:name:weight> or "
                             "<lora:name:te_weight:unet_weight>")
        try:
            te = float(named.get("te", positional[1] if len(positional) > 1 else 1.0))
            unet = float(named.get("unet", positional[2] if len(positional) > 2 else te))
        except ValueError:
            raise ValueError(f"prompt tag {tag}: weights must be numbers") from None
        return cls(positional[0], te, unet)

    @property
    def adapter_weight(self) -> float:
        """The one weight ``set_adapters`` takes for this adapter; separate text-encoder and UNet weights
        would need per-component adapter weights, which are refused by name rather than approximated."""
        if self.text_encoder_weight != self.unet_weight:
            raise ValueError(f"<lora:{self.name}:{self.text_encoder_weight:g}:{self.unet_weight:g}>: separate "
                             "text-encoder and UNet weights are not supported; give one weight")
        return self.unet_weight


def extract_lora_tags(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its ``<kind:...>`` tags (AUTOMATIC1111's extra-network syntax) and its LoRA tags."""
    tags: list[LoraTag] = []

    def found(match: re.Match) -> str:
        tags.append(LoraTag.parse(match.group(1), match.group(2)))
        return ""

    return _EXTRA_NETWORK.sub(found, prompt), tags


# ----------------------------------------------------------------------------------------- chunking
@dataclass(frozen=True)
class PromptChunks:
    """A prompt as k chunks of 77 token ids and their weights."""

    ids: np.ndarray  # (k, 77) int32
    weights: np.ndarray  # (k, 77) float32

    def padded(self, count: int, empty: "PromptChunks") -> "PromptChunks":
        """This prompt followed by empty chunks up to ``count`` chunks."""
        extra = count - len(self.ids)
        return PromptChunks(np.concatenate([self.ids] + [empty.ids] * extra),
                            np.concatenate([self.weights] + [empty.weights] * extra))


def tokenize_line(tokenizer: Any, line: str, comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK
                  ) -> PromptChunks:
    """A prompt -> chunks, by AUTOMATIC1111's ``tokenize_line`` (see the module docstring)."""
    parsed = parse_prompt_attention(line)
    comma = tokenizer.token_id(",</w>")
    runs = tokenizer.multi_vector_ids
    chunks: list[tuple[list[int], list[float]]] = []
    tokens: list[int] = []
    weights: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal tokens, weights, last_comma
        fill = CHUNK_LENGTH - len(tokens)
        chunks.append(([tokenizer.bos_token_id] + tokens + [tokenizer.eos_token_id] * (fill + 1),
                       [1.0] + weights + [1.0] * (fill + 1)))
        tokens, weights, last_comma = [], [], -1

    for text, weight in parsed:
        if (text, weight) == BREAK:
            next_chunk()
            continue
        ids = tokenizer.encode_ids(text)
        position = 0
        while position < len(ids):
            token = ids[position]
            if token == comma:
                last_comma = len(tokens)
            elif (comma_padding_backtrack and len(tokens) == CHUNK_LENGTH and last_comma != -1
                  and len(tokens) - last_comma <= comma_padding_backtrack):
                cut = last_comma + 1
                moved, moved_weights = tokens[cut:], weights[cut:]
                tokens, weights = tokens[:cut], weights[:cut]
                next_chunk()
                tokens, weights = moved, moved_weights
            if len(tokens) == CHUNK_LENGTH:
                next_chunk()
            run = runs.get(token)
            if run is not None and ids[position:position + len(run)] == run:  # an embedding stays in one chunk
                if len(tokens) + len(run) > CHUNK_LENGTH:
                    next_chunk()
                tokens += run
                weights += [weight] * len(run)
                position += len(run)
                continue
            tokens.append(token)
            weights.append(weight)
            position += 1
    if tokens or not chunks:
        next_chunk()
    ids_array = np.asarray([c[0] for c in chunks], dtype=np.int32)
    if tokenizer.pad_token_id != tokenizer.eos_token_id:  # SD 2: the pad token after the first EOS
        for row in ids_array:
            row[int(np.argmax(row == tokenizer.eos_token_id)) + 1:] = tokenizer.pad_token_id
    return PromptChunks(ids_array, np.asarray([c[1] for c in chunks], dtype=np.float32))


def empty_chunk(tokenizer: Any) -> PromptChunks:
    """The chunk of the empty prompt (AUTOMATIC1111's ``empty_chunk``, pad token after the first EOS)."""
    return tokenize_line(tokenizer, "")


def chunk_prompts(tokenizer: Any, prompts: Sequence[str],
                  comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK) -> list[PromptChunks]:
    """Every prompt chunked and padded with empty chunks to the largest chunk count among them."""
    chunked = [tokenize_line(tokenizer, p, comma_padding_backtrack) for p in prompts]
    count = max(len(c.ids) for c in chunked)
    empty = empty_chunk(tokenizer)
    return [c.padded(count, empty) for c in chunked]


def apply_weights(hidden: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUTOMATIC1111's "Original" emphasis on (B, k, 77, D) hidden states with (B, k, 77) weights: each chunk
    multiplied by its weights, then rescaled to its original mean."""
    z = hidden.astype(np.float64)
    original_mean = z.mean(axis=(2, 3), keepdims=True)
    z = z * weights[..., None]
    z *= original_mean / z.mean(axis=(2, 3), keepdims=True)
    return z.astype(np.float32)


def encode_weighted(backend: Any, tokenizer: Any, prompts: Sequence[str],
                    comma_padding_backtrack: int = COMMA_PADDING_BACKTRACK) -> Any:
    """Prompts in AUTOMATIC1111's syntax -> (B, 77 k, D) text embeddings (native), k the largest chunk count.

    All chunks go through the text encoder as one batch; prompts of one chunk with all weights 1 give
    exactly the plain path's embedding (the same ids, the same call)."""
    chunked = chunk_prompts(tokenizer, prompts, comma_padding_backtrack)
    return weighted_states(backend, chunked, backend.encode_text(np.concatenate([c.ids for c in chunked])))


def weighted_states(backend: Any, chunked: list[PromptChunks], hidden: Any) -> Any:
    """(B k, 77, D) native hidden states of ``chunked`` (prompt-major rows) -> (B, 77 k, D) with the weights
    applied; all weights 1: the states as they came (the plain path's numbers)."""
    b, k = len(chunked), len(chunked[0].ids)
    weights = np.stack([c.weights for c in chunked])
    length, d = hidden.shape[-2], hidden.shape[-1]
    if np.all(weights == 1.0):
        return hidden.reshape(b, k * length, d)
    z = apply_weights(backend.to_numpy(hidden).reshape(b, k, length, d), weights)
    return backend.from_numpy(z.reshape(b, k * length, d))
