"""CLIP byte-level BPE tokenizer on the ``tokenizers`` library, identical to transformers' CLIPTokenizer.

Prompts are padded to the model's context length (77) with the repository's own pad
token (``<|endoftext|>`` for SD 1.x, ``!`` for SD 2.x) and truncated there with a
warning naming the part that was dropped.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from .errors import ModelSourceError

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"
# CLIP's word splitter: contractions, letter runs, single digits, runs of other symbols.
_CLIP_SPLIT = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


class PromptTruncatedWarning(UserWarning):
    """A prompt was longer than the text encoder's context and lost its tail."""


def _token_content(value: object, default: str) -> str:
    if value is None:
        return default
    if isinstance(value, dict):  # tokenizer_config.json may store AddedToken dicts
        return str(value.get("content", default))
    return str(value)


def _read_merges(path: Path) -> list[tuple[str, str]]:
    merges = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{path}: malformed merge line {line!r}")
            merges.append((parts[0], parts[1]))
    return merges


def _vocab_and_merges_from_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    with open(path, encoding="utf-8") as f:
        model = json.load(f).get("model", {})
    if model.get("type") != "BPE" or "vocab" not in model:
        raise ValueError(f"{path} does not hold a BPE tokenizer")
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model.get("merges", [])]
    return dict(model["vocab"]), merges  # type: ignore[return-value]


class CLIPTokenizer:
    def __init__(self, vocab: dict[str, int], merges: list[tuple[str, str]], *, pad_token: str = EOS,
                 max_length: int = 77) -> None:
        for special in (BOS, EOS, pad_token):
            if special not in vocab:
                raise ValueError(f"tokenizer vocabulary lacks the special token {special!r}")
        model = BPE(vocab, merges, continuing_subword_prefix="", end_of_word_suffix="</w>", fuse_unk=False,
                    unk_token=EOS)
        tok = Tokenizer(model)
        tok.normalizer = normalizers.Sequence(
            [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_CLIP_SPLIT), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.RobertaProcessing(
            (EOS, vocab[EOS]), (BOS, vocab[BOS]), trim_offsets=False, add_prefix_space=False)
        # transformers registers the specials (the pad token included, "!" for SD 2.x) as added tokens,
        # matched in the raw text before BPE: "!!!" is then three pad ids, not one merged token.
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                for t in dict.fromkeys((pad_token, BOS, EOS))])
        self._tokenizer = tok
        self._vocab = vocab
        self.added_tokens: dict[str, int] = {}  # tokens added after loading (textual inversion), in id order
        self.multi_vector_ids: dict[int, list[int]] = {}  # first id of a multi-vector token -> all its ids
        self._expansions: dict[int, str] = {}  # first id -> "tok tok_1 ... tok_{n-1}"
        self.vocab_size = len(vocab)
        self.max_length = int(max_length)
        self.bos_token_id = vocab[BOS]
        self.eos_token_id = vocab[EOS]
        self.pad_token = pad_token
        self.pad_token_id = vocab[pad_token]

    @classmethod
    def from_folder(cls, folder: str | Path) -> "CLIPTokenizer":
        """Load ``vocab.json`` + ``merges.txt`` (+ optional ``tokenizer_config.json``) from a model's tokenizer folder."""
        folder = Path(folder)
        vocab_file, merges_file = folder / "vocab.json", folder / "merges.txt"
        if vocab_file.is_file() and merges_file.is_file():
            with open(vocab_file, encoding="utf-8") as f:
                vocab = json.load(f)
            merges = _read_merges(merges_file)
        elif (folder / "tokenizer.json").is_file():  # transformers >= 5 saves only this file
            vocab, merges = _vocab_and_merges_from_tokenizer_json(folder / "tokenizer.json")
        else:
            raise ModelSourceError(f"no tokenizer in {folder} (need vocab.json + merges.txt, or tokenizer.json)")
        pad, max_length = EOS, 77
        for name in ("tokenizer_config.json", "special_tokens_map.json"):
            path = folder / name
            if path.is_file():
                with open(path, encoding="utf-8") as f:
                    cfg = json.load(f)
                pad = _token_content(cfg.get("pad_token"), pad)
                if name == "tokenizer_config.json":
                    ml = cfg.get("model_max_length")
                    if isinstance(ml, int) and 0 < ml < 100_000:
                        max_length = ml
        return cls(vocab, merges, pad_token=pad, max_length=max_length)

    def __len__(self) -> int:
        """Vocabulary plus added tokens (transformers' ``len(tokenizer)``): the next added token's id."""
        return self.vocab_size + len(self.added_tokens)

    def __contains__(self, token: str) -> bool:
        """Whether ``token`` is in the vocabulary or among the added tokens (transformers' ``get_vocab()``)."""
        return token in self._vocab or token in self.added_tokens

    def token_id(self, token: str) -> int | None:
        """The id of a vocabulary entry or added token (``",</w>"`` is the comma ending a word), or None."""
        return self._vocab.get(token, self.added_tokens.get(token))

    def add_tokens(self, tokens: Sequence[str]) -> list[int]:
        """Add new tokens (matched in the raw text before BPE, as transformers' ``add_tokens``); their ids,
        consecutive from ``len(self)``. A token already known is refused."""
        known = [t for t in tokens if t in self]
        if known or len(set(tokens)) != len(tokens):
            raise ValueError(f"cannot add tokens {list(tokens)}: {known or 'duplicates'} already present")
        start = len(self)
        self._tokenizer.add_tokens(list(tokens))
        ids = [self._tokenizer.token_to_id(t) for t in tokens]
        if ids != list(range(start, start + len(tokens))):  # the library numbers them after the vocabulary
            raise RuntimeError(f"added tokens got ids {ids}, expected {start}..{start + len(tokens) - 1}")
        self.added_tokens.update(zip(tokens, ids))
        self.multi_vector_ids = {}
        for token, token_id in self.added_tokens.items():
            names = [token]
            while f"{token}_{len(names)}" in self.added_tokens:
                names.append(f"{token}_{len(names)}")
            stem, _, index = token.rpartition("_")
            if len(names) > 1 and not (stem in self.added_tokens and index.isdigit()):
                self.multi_vector_ids[token_id] = [self.added_tokens[n] for n in names]
        self._expansions = {first: " ".join(self._tokenizer.id_to_token(i) for i in run)
                            for first, run in self.multi_vector_ids.items()}
        return ids

    def expand_multi_vector_tokens(self, prompt: str) -> str:
        """Write each multi-vector textual-inversion token ``tok`` as ``tok tok_1 ... tok_{n-1}``, as diffusers'
        ``maybe_convert_prompt`` does, at every place the tokenizer matched it (case-insensitively).
        diffusers replaces the token's own spelling in the text after looking up the lowercased match, so a
        name with capitals (``EasyNegative``) or a prompt spelling it in another case keeps only the first
        vector there; here every vector is used. A lowercase name written in lowercase gives the same ids."""
        if not self._expansions:
            return prompt
        encoding = self._tokenizer.encode(prompt, add_special_tokens=False)
        for token_id, (start, end) in reversed(list(zip(encoding.ids, encoding.offsets))):
            if token_id in self._expansions:
                prompt = prompt[:start] + self._expansions[token_id] + prompt[end:]
        return prompt

    def encode_ids(self, text: str) -> list[int]:
        """Token ids of ``text`` without BOS/EOS (multi-vector tokens expanded), for building chunks."""
        return self._tokenizer.encode(self.expand_multi_vector_tokens(text), add_special_tokens=False).ids

    def tokenize(self, text: str) -> list[int]:
        """Token ids with BOS and EOS, unpadded and untruncated (multi-vector tokens expanded)."""
        return self._tokenizer.encode(self.expand_multi_vector_tokens(text)).ids

    def __call__(self, prompts: str | Sequence[str]) -> np.ndarray:
        """Ids of shape (batch, max_length): BOS, tokens, EOS, then pad; truncated with a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        rows = []
        for prompt in prompts:
            if not isinstance(prompt, str):
                raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
            ids = self.tokenize(prompt)
            if len(ids) > self.max_length:
                dropped = self._tokenizer.decode(ids[self.max_length - 1:-1]).replace("</w>", " ").strip()
                if len(dropped) > 60:  # the warning says where the cut falls, not the whole rest
                    dropped = dropped[:57].rstrip() + "..."
                warnings.warn(
                    f"prompt is {len(ids)} tokens, longer than the text encoder's {self.max_length}; "
                    f"this part was dropped: {dropped!r}", PromptTruncatedWarning, stacklevel=2)
                ids = ids[: self.max_length - 1] + [self.eos_token_id]
            rows.append(ids + [self.pad_token_id] * (self.max_length - len(ids)))
        return np.asarray(rows, dtype=np.int32)
