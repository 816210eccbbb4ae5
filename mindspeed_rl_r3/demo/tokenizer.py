"""A byte-level tokenizer with Qwen-style chat markers: no vocabulary files, nothing to download."""

from __future__ import annotations

from typing import ClassVar

import torch


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; special tokens follow. The vocabulary is padded to ``vocab_size``."""

    PAD, EOS, IM_START, IM_END = 256, 257, 258, 259
    SPECIALS: ClassVar[dict[int, str]] = {
        PAD: "<|endoftext|>",
        EOS: "<|eos|>",
        IM_START: "<|im_start|>",
        IM_END: "<|im_end|>",
    }

    def __init__(self, vocab_size: int = 512) -> None:
        if vocab_size <= max(self.SPECIALS):
            raise ValueError(f"vocab_size must exceed {max(self.SPECIALS)}, got {vocab_size}")
        self.vocab_size = vocab_size
        self.pad_id = self.PAD
        self.eos_id = self.IM_END

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int] | torch.Tensor, skip_special: bool = True) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        out, chunk = [], []
        for i in ids:
            if i < 256:
                chunk.append(i)
                continue
            out.append(bytes(chunk).decode("utf-8", errors="replace"))
            chunk = []
            if not skip_special:
                out.append(self.SPECIALS.get(i, f"<|{i}|>"))
        out.append(bytes(chunk).decode("utf-8", errors="replace"))
        return "".join(out)

    def chat_prompt(self, question: str) -> list[int]:
        """``<|im_start|>user\\n{question}<|im_end|>\\n<|im_start|>assistant\\n`` as ids."""
        user = self.encode("user\n" + question)
        return [self.IM_START, *user, self.IM_END, *self.encode("\n"), self.IM_START, *self.encode("assistant\n")]
