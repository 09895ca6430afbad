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

    def tokenize(self, text: str) -> list[int]:
        """Token ids with BOS and EOS, unpadded and untruncated."""
        return self._tokenizer.encode(text).ids

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
