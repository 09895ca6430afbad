"""What every pipeline adds to its prompts: textual-inversion tokens and, when enabled, AUTOMATIC1111's
prompt syntax (weights, chunks beyond 77 tokens, ``BREAK``, ``<lora:name:weight>`` tags).

A mixin of ``BaseDiffusion``: the prompt path (``encode_texts``) is the only place prompts become ids.
Loaded embeddings change the shared tokenizer and text encoder (like ``quantize``, every pipeline on the
same components sees them); the prompt syntax is a setting of one pipeline, copied by ``from_pipeline``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from .. import prompt_weighting
from ..textual_inversion import load_textual_inversion
from .lora_tags import LoraTagState

PROMPT_SYNTAXES = ("plain", "a1111")


class PromptFeaturesMixin:
    tokenizer: Any
    backend: Any
    prompt_syntax: str = "plain"
    comma_padding_backtrack: int = prompt_weighting.COMMA_PADDING_BACKTRACK
    lora_tags: LoraTagState | None = None

    # ------------------------------------------------------------------------- textual inversion
    def load_textual_inversion(self, pretrained_model_name_or_path: Any, token: str | list | None = None, *,
                               weight_name: str | None = None, subfolder: str | None = None,
                               local_files_only: bool = False, revision: str | None = None) -> list[str]:
        """Add textual-inversion embeddings (diffusers' method and keywords): a file (.safetensors, .pt,
        .bin), a folder or hub repo id holding ``learned_embeds.safetensors`` / ``.bin`` (or ``weight_name``),
        a ``{token: vector}`` dict, or a list of these with a list of tokens. ``token`` overrides the file's
        own. Returns the tokens added (``tok, tok_1, ...`` for a multi-vector embedding; ``tok`` in a prompt
        stands for all of them). On SDXL an embedding holds ``clip_l`` and ``clip_g`` tensors (AUTOMATIC1111 /
        civitai SDXL files, or such a dict): each text encoder and its tokenizer get theirs."""
        return load_textual_inversion(self.tokenizer, self.backend, pretrained_model_name_or_path, token,
                                      tokenizers=self.components.tokenizers, weight_name=weight_name, subfolder=subfolder,
                                      local_files_only=local_files_only, revision=revision)

    def maybe_convert_prompt(self, prompt: str | list[str]) -> str | list[str]:
        """``prompt`` with each multi-vector token ``tok`` written out as ``tok tok_1 ...`` (diffusers' name)."""
        if isinstance(prompt, list):
            return [self.tokenizer.expand_multi_vector_tokens(p) for p in prompt]
        return self.tokenizer.expand_multi_vector_tokens(prompt)

    # ---------------------------------------------------------------------------- prompt syntax
    def enable_prompt_weighting(self, lora_dir: str | Path | None = None,
                                comma_padding_backtrack: int = prompt_weighting.COMMA_PADDING_BACKTRACK) -> None:
        """Read prompts in AUTOMATIC1111's syntax: ``(word:1.3)``, ``(word)``, ``[word]``, escapes, ``BREAK``,
        prompts of any length as 75-token chunks. ``lora_dir``: the folder ``<lora:name:weight>`` tags load
        LoRA files from (``name.safetensors``, searched in subfolders too); without it such a tag is an error."""
        lora_dir = None if lora_dir is None else Path(lora_dir).expanduser()
        if lora_dir is not None and not lora_dir.is_dir():
            raise ValueError(f"lora_dir {str(lora_dir)!r} is not a folder")
        if not isinstance(comma_padding_backtrack, int) or not 0 <= comma_padding_backtrack < 75:
            raise ValueError(f"comma_padding_backtrack must be an integer in [0, 74], got {comma_padding_backtrack!r}")
        self.prompt_syntax = "a1111"
        self.comma_padding_backtrack = comma_padding_backtrack
        self.lora_tags = LoraTagState(lora_dir) if lora_dir is not None else None

    def disable_prompt_weighting(self) -> None:
        """Plain prompts again (diffusers' behaviour: 77 tokens, the rest cut with a warning)."""
        self.prompt_syntax = "plain"
        self.lora_tags = None

    def copy_prompt_settings(self, other: "PromptFeaturesMixin") -> None:
        self.prompt_syntax, self.comma_padding_backtrack = other.prompt_syntax, other.comma_padding_backtrack
        self.lora_tags = other.lora_tags

    def encode_texts(self, texts: Sequence[str], positives: int = 0) -> Any:
        """Native (N, L, D) embeddings of ``texts``; ``positives``: how many of the last texts are prompts
        (their ``<lora:...>`` tags are applied; AUTOMATIC1111 leaves negative prompts' tags as text)."""
        texts = list(texts)
        if self.prompt_syntax != "a1111":
            return self.backend.encode_text(self.tokenizer(texts))
        if positives:
            first = len(texts) - positives
            texts[first:] = self.take_lora_tags(texts[first:])
        return prompt_weighting.encode_weighted(self.backend, self.tokenizer, texts, self.comma_padding_backtrack)

    def take_lora_tags(self, prompts: Sequence[str]) -> list[str]:
        """Under the A1111 syntax: apply the ``<lora:...>`` tags of ``prompts`` and return them without the tags
        (AUTOMATIC1111 takes the batch's LoRAs from its first prompt); plain syntax: unchanged."""
        if self.prompt_syntax != "a1111":
            return list(prompts)
        stripped = [prompt_weighting.extract_lora_tags(t) for t in prompts]
        tags = stripped[0][1] if stripped else []
        if tags or self.lora_tags is not None:
            self._apply_lora_tags(tags)
        return [text for text, _ in stripped]

    def sdxl_prompt_encoder(self) -> Any:
        """The two-encoder prompt encoder of an SDXL model, reading prompts in this pipeline's syntax."""
        from .sdxl_conditioning import SDXLPromptEncoder

        return SDXLPromptEncoder(self.components, self.prompt_syntax, self.comma_padding_backtrack)

    def _apply_lora_tags(self, tags: list) -> None:
        if self.lora_tags is None:
            raise ValueError(f"the prompt has LoRA tags ({', '.join(f'<lora:{t.name}>' for t in tags)}); pass "
                             "enable_prompt_weighting(lora_dir=...) with the folder holding the LoRA files")
        self.lora_tags.apply(self, tags)
