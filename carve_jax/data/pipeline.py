"""Token streams on disk and the grain pipeline that packs them into training batches.

Stream: the documents of a split, tokenized and joined as doc_1 EOS doc_2 EOS ... into one 1-D array
(uint8 for "byte", uint16 for "gpt2"), cached as `<root>/tokens/<size>-<tokenizer>-<corpus sha[:16]>/
<split>.npy` and memory-mapped.

Packing: with L = seq_len, window w covers stream[w*L : w*L + L + 1] (windows share one boundary
token) and gives inputs = window[:-1], targets = window[1:], both int32 [L]; windows cross document
boundaries (the EOS between them is a normal target). Given `eos_id` (the training default,
`DataConfig.reset_documents`), each window also carries segment_ids = cumsum(inputs == eos_id),
int32 [L]: a document begins at each EOS of the inputs (the EOS acts as the next document's BOS;
the last token of a document still predicts it), so the model resets there (`LM(tokens,
segment_ids)`); the window's first document is whatever part of one it starts in. Of the n = (len - 1) // L windows, the first
floor(n / shard_count) * shard_count are used.

Order: the window indices are shuffled by `seed` (grain's index shuffle, a fresh permutation each
epoch), then process `shard_index` takes every `shard_count`-th one, so within an epoch the shards
are disjoint and equally long; then consecutive windows form batches of `batch_size` (per process).
Everything is a function of (seed, shard_index, shard_count, step), so `get_state()` (a small dict)
and `set_state()` resume at exactly the next batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
import time
import zipfile
from pathlib import Path

import grain
import numpy as np

from carve_jax.data.corpus import Corpus, _check_split
from carve_jax.data.tokenizer import Tokenizer, get_tokenizer

EXPORT_META = "export.json"


def _tokenizer(tokenizer: Tokenizer | str) -> Tokenizer:
  return get_tokenizer(tokenizer) if isinstance(tokenizer, str) else tokenizer


def token_cache_dir(corpus: Corpus, tokenizer: Tokenizer | str) -> Path:
  """Where the token streams of `corpus` under `tokenizer` are cached (keyed by corpus sha256)."""
  return corpus.root / "tokens" / f"{corpus.size}-{_tokenizer(tokenizer).name}-{corpus.sha256[:16]}"


def _encode_split(corpus: Corpus, tok: Tokenizer, split: str) -> tuple[np.ndarray, dict]:
  """Stream of `split` and its document index {"sources": [...], "source": int [D], "start": int [D]}."""
  docs = list(corpus.documents(split))
  parts, starts, source_ids, n = [], [], [], 0
  sources = sorted({d.source for d in docs})
  eos = np.asarray([tok.eos_id], tok.dtype)
  for i in range(0, len(docs), 256):
    chunk = docs[i:i + 256]
    for d, ids in zip(chunk, tok.encode_batch([d.text for d in chunk])):
      starts.append(n)
      source_ids.append(sources.index(d.source))
      parts += [ids.astype(tok.dtype), eos]
      n += len(ids) + 1
  stream = np.concatenate(parts) if parts else np.zeros((0,), tok.dtype)
  return stream, {"sources": sources, "source": source_ids, "start": starts}


def _atomic_write(path: Path, write):
  """Writes via a temporary file in the same folder and renames it (readers never see a partial file)."""
  fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-")
  with os.fdopen(fd, "wb") as f:
    write(f)
  os.replace(tmp, path)


def load_tokens(corpus: Corpus | str | Path, tokenizer: Tokenizer | str = "byte", split: str = "train"
                ) -> np.ndarray:
  """The token stream of `split`: 1-D, uint8 ("byte") or uint16 ("gpt2"), read-only.

  Args:
    corpus: a prepared `Corpus` (encoded once, cached as .npy and memory-mapped), or the folder of an
      `export_tokens` export (no corpus or apt needed; its tokenizer must equal `tokenizer`).
    tokenizer: a `Tokenizer` or its name.
    split: "train" | "val".
  """
  _check_split(split)
  tok = _tokenizer(tokenizer)
  if not isinstance(corpus, Corpus):
    return _load_export(Path(corpus), tok, split)
  cache = token_cache_dir(corpus, tok)
  path = cache / f"{split}.npy"
  if not path.exists():
    cache.mkdir(parents=True, exist_ok=True)
    stream, index = _encode_split(corpus, tok, split)
    _atomic_write(cache / f"{split}.docs.json", lambda f: f.write(json.dumps(index).encode()))
    _atomic_write(path, lambda f: np.save(f, stream))
  return np.load(path, mmap_mode="r")


def document_index(corpus: Corpus | str | Path, tokenizer: Tokenizer | str, split: str) -> dict[str, np.ndarray]:
  """{source: int64 [D, 2]} start/stop (EOS excluded) of each document of `split` in its token stream."""
  _check_split(split)
  tok = _tokenizer(tokenizer)
  if isinstance(corpus, Corpus):
    stream = load_tokens(corpus, tok, split)
    index = json.loads((token_cache_dir(corpus, tok) / f"{split}.docs.json").read_text())
  else:
    stream = _load_export(Path(corpus), tok, split)
    index = json.loads((Path(corpus) / EXPORT_META).read_text())["splits"][split]["docs"]
  starts = np.asarray(index["start"] + [len(stream)], np.int64)
  spans = np.stack([starts[:-1], starts[1:] - 1], axis=1)
  src = np.asarray(index["source"], np.int64)
  return {name: spans[src == i] for i, name in enumerate(index["sources"])}


# ----------------------------------------------------------------------------------------- batching
@dataclasses.dataclass(frozen=True)
class _Window:
  tokens: np.ndarray
  seq_len: int
  eos_id: int | None = None

  def __call__(self, w: int) -> dict[str, np.ndarray]:
    x = np.asarray(self.tokens[w * self.seq_len: (w + 1) * self.seq_len + 1], np.int32)
    out = {"inputs": x[:-1], "targets": x[1:]}
    if self.eos_id is not None:
      out["segment_ids"] = np.cumsum(out["inputs"] == self.eos_id, dtype=np.int32)
    return out


def num_windows(n_tokens: int, seq_len: int, shard_count: int = 1) -> int:
  """Windows of seq_len + 1 tokens used per shard and epoch (see module docstring)."""
  return max(n_tokens - 1, 0) // seq_len // shard_count


def make_batches(tokens: np.ndarray, *, seq_len: int, batch_size: int, seed: int, shard_index: int = 0,
                 shard_count: int = 1, shuffle: bool = True, num_epochs: int | None = None,
                 num_threads: int = 2, prefetch: int = 8, eos_id: int | None = None) -> grain.DatasetIterator:
  """Iterator of {"inputs": int32 [B, T], "targets": int32 [B, T]} with B = batch_size, T = seq_len,
  and "segment_ids" int32 [B, T] when `eos_id` is given.

  Args:
    tokens: 1-D integer token stream (`load_tokens`).
    seq_len: tokens per sequence T; each window holds T + 1 tokens.
    batch_size: sequences per batch on this process (global batch = batch_size * shard_count).
    seed: shuffle seed (0 <= seed < 2**32); the same seed gives the same batches.
    shard_index, shard_count: this process's shard (e.g. jax.process_index(), jax.process_count()).
    shuffle: False keeps stream order (for evaluation).
    num_epochs: passes over the windows; None repeats forever (epochs reshuffled). A last batch
      with fewer than batch_size windows is dropped.
    num_threads, prefetch: grain read threads and batches prefetched ahead.
    eos_id: the tokenizer's EOS id: also emit per-token document ids (a new one at each EOS of
      the inputs, see the module docstring); None emits none (windows mix documents).
  Returns:
    a grain `DatasetIterator`; `get_state()` is a small dict, `set_state(state)` on an iterator made
    with the same arguments continues with exactly the next batch.
  """
  tokens = np.asarray(tokens) if not isinstance(tokens, np.ndarray) else tokens
  if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
    raise ValueError(f"tokens: expected a 1-D integer array, got {tokens.dtype} of shape {tokens.shape}")
  for name, value, low in (("seq_len", seq_len, 1), ("batch_size", batch_size, 1), ("shard_count", shard_count, 1),
                           ("num_threads", num_threads, 0), ("prefetch", prefetch, 0)):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
      raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
  if not isinstance(shard_index, (int, np.integer)) or not 0 <= shard_index < shard_count:
    raise ValueError(f"shard_index: expected an int in [0, {shard_count}), got {shard_index!r}")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**32:
    raise ValueError(f"seed: expected an int in [0, 2**32), got {seed!r}")
  if num_epochs is not None and (not isinstance(num_epochs, (int, np.integer)) or num_epochs < 1):
    raise ValueError(f"num_epochs: expected None or an int >= 1, got {num_epochs!r}")
  if eos_id is not None and (isinstance(eos_id, bool) or not isinstance(eos_id, (int, np.integer)) or eos_id < 0):
    raise ValueError(f"eos_id: expected None or an int >= 0, got {eos_id!r}")
  per_shard = num_windows(len(tokens), seq_len, shard_count)
  if per_shard < batch_size:
    raise ValueError(f"tokens: expected at least {batch_size * seq_len * shard_count + 1} tokens for one batch "
                     f"of {batch_size} x {seq_len} on each of {shard_count} shard(s), got {len(tokens)}")
  ds = grain.MapDataset.range(per_shard * shard_count)
  if shuffle:
    ds = ds.shuffle(seed=int(seed))
  ds = ds[int(shard_index)::int(shard_count)].repeat(num_epochs)
  ds = ds.map(_Window(tokens, int(seq_len), None if eos_id is None else int(eos_id))).batch(int(batch_size), drop_remainder=True)
  opts = grain.ReadOptions(num_threads=int(num_threads), prefetch_buffer_size=int(prefetch))
  return iter(ds.to_iter_dataset(opts))


# ------------------------------------------------------------------------------------------ export
def _npz_bytes(array: np.ndarray) -> int:
  with tempfile.TemporaryFile() as f:
    np.savez_compressed(f, tokens=array)
    return f.tell()


def export_tokens(corpus: Corpus, tokenizer: Tokenizer | str, out: str | Path, *, max_mb: float = 40.0,
                  verbose: bool = False) -> dict:
  """Writes `out/{train,val}.npz` (zlib-compressed streams) and `out/export.json` for machines without apt.

  Validation is exported whole; the train stream is cut at a document boundary so that both files
  together take at most `max_mb` MB (1e6 bytes). Train documents are in sha256(id) order, so the kept
  prefix is a uniform sample of documents over all sources. `load_tokens(out, tokenizer, split)`
  reads the export.
  """
  tok = _tokenizer(tokenizer)
  if not max_mb > 0:
    raise ValueError(f"max_mb: expected a positive number, got {max_mb!r}")
  out = Path(out)
  out.mkdir(parents=True, exist_ok=True)
  budget = int(max_mb * 1e6)
  t0 = time.time()
  meta = {"tokenizer": tok.name, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": tok.dtype.name,
          "corpus_size": corpus.size, "corpus_sha256": corpus.sha256, "max_mb": max_mb,
          "sources": [{k: s[k] for k in ("source", "package", "version", "license")} for s in corpus.manifest["sources"]],
          "splits": {}}
  used = 0
  for split in ("val", "train"):
    stream = np.asarray(load_tokens(corpus, tok, split))
    index = json.loads((token_cache_dir(corpus, tok) / f"{split}.docs.json").read_text())
    full = len(stream)
    keep_docs = len(index["start"])
    size = _npz_bytes(stream)
    while used + size > budget:
      if split == "val":
        raise ValueError(f"max_mb: the validation split alone needs {size / 1e6:.1f} MB compressed, got {max_mb}")
      target = int(len(stream) * (budget - used) / size * 0.98)  # compressed size is ~linear in length
      keep_docs = int(np.searchsorted(index["start"], target, side="right")) - 1
      if keep_docs < 1:
        raise ValueError(f"max_mb: {max_mb} leaves no room for one train document")
      stream = stream[:index["start"][keep_docs]]
      size = _npz_bytes(stream)
    np.savez_compressed(out / f"{split}.npz", tokens=stream)
    used += (out / f"{split}.npz").stat().st_size
    index = {"sources": index["sources"], "source": index["source"][:keep_docs], "start": index["start"][:keep_docs]}
    meta["splits"][split] = {"tokens": int(len(stream)), "tokens_in_corpus": int(full), "documents": keep_docs,
                             "file_bytes": (out / f"{split}.npz").stat().st_size,
                             "sha256": hashlib.sha256(np.ascontiguousarray(stream).tobytes()).hexdigest(),
                             "docs": index}
    if verbose:
      print(f"[data] export {split}: {len(stream):,} of {full:,} {tok.name} tokens, {keep_docs} documents, "
            f"{meta['splits'][split]['file_bytes'] / 1e6:.1f} MB")
  meta["seconds"] = round(time.time() - t0, 1)
  (out / EXPORT_META).write_text(json.dumps(meta, indent=1))
  return meta


def _load_export(path: Path, tok: Tokenizer, split: str) -> np.ndarray:
  meta_path = path / EXPORT_META
  if not meta_path.exists():
    raise ValueError(f"corpus: expected a Corpus or an export folder with {EXPORT_META}, got {str(path)!r}")
  meta = json.loads(meta_path.read_text())
  if meta["tokenizer"] != tok.name:
    raise ValueError(f"tokenizer: the export at {path} holds {meta['tokenizer']!r} tokens, got {tok.name!r}")
  try:
    with np.load(path / f"{split}.npz") as z:
      stream = z["tokens"]
  except (OSError, KeyError, zipfile.BadZipFile, ValueError) as e:
    raise ValueError(f"{path / f'{split}.npz'}: unreadable token export ({e}); re-run export_tokens") from e
  if hashlib.sha256(np.ascontiguousarray(stream).tobytes()).hexdigest() != meta["splits"][split]["sha256"]:
    raise ValueError(f"{path / f'{split}.npz'}: sha256 differs from {EXPORT_META}; re-run export_tokens")
  stream.flags.writeable = False
  return stream
