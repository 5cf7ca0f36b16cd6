"""Data: an offline English corpus from Debian packages, byte/GPT-2 tokenizers, and a grain pipeline.

  corpus = prepare_corpus("full")                 # or "ci", or "fixture" (committed, offline)
  tok = get_tokenizer("byte")                     # or "gpt2"
  train = load_tokens(corpus, tok, "train")       # 1-D uint8/uint16 stream, docs joined by EOS
  it = make_batches(train, seq_len=512, batch_size=8, seed=0,
                    shard_index=jax.process_index(), shard_count=jax.process_count())
  batch = next(it)                                # {"inputs": int32 [8, 512], "targets": int32 [8, 512]}
  state = it.get_state()                          # it.set_state(state) resumes at the next batch

See docs/DATA.md for sources, licenses, sizes and the split.
"""

from carve_jax.data.corpus import SIZES, SOURCES, Corpus, CorpusUnavailableError, Document, prepare_corpus
from carve_jax.data.pipeline import document_index, export_tokens, load_tokens, make_batches, num_windows
from carve_jax.data.tokenizer import TOKENIZERS, Tokenizer, get_tokenizer

__all__ = [
    "SIZES", "SOURCES", "TOKENIZERS", "Corpus", "CorpusUnavailableError", "Document", "Tokenizer",
    "document_index", "export_tokens", "get_tokenizer", "load_tokens", "make_batches", "num_windows",
    "prepare_corpus",
]
