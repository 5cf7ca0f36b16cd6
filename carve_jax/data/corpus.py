"""An English corpus from Debian main, fetched with `apt-get download` and unpacked with `dpkg-deb -x`.

Nothing is installed into the system: packages land in `<root>/debs`, are unpacked into
`<root>/pkgs/<package>`, and their text is extracted (see `extract.py`) into
`<root>/corpus/<size>/{train,val}.jsonl` (one JSON document per line: id, source, text) with a
`manifest.json` (package versions, licenses, .deb and text sha256, document and byte counts).
`<root>` is `$CARVE_DATA_DIR`, else `<repo>/.data` (in a checkout) or `~/.cache/carve_jax`.

Sizes:
  "fixture"  a committed ~64 KB public-domain excerpt (`fixtures/fixture.jsonl`); no network.
  "ci"       Matthew Henry's Concise Commentary (sword-comm-mhcc): 256 KB train / 64 KB val excerpt.
  "full"     groups A + B + C below, ~116 MB of text.

Split (fixed, document level): within each source, documents are ordered by sha256 of their id and
the first ones go to validation until they hold >= `val_fraction` of the source's bytes (at least
one document; at least one stays in train). Train documents are then ordered by sha256 of their id,
which interleaves the sources, so any prefix of the train stream is a uniform sample of documents.
The split depends only on document ids and lengths, never on a random state.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from carve_jax.data import extract as ex

FIXTURE = Path(__file__).parent / "fixtures" / "fixture.jsonl"


class CorpusUnavailableError(RuntimeError):
  """The Debian packages for a corpus size could not be fetched (no apt-get, no network, ...)."""


class Document(NamedTuple):
  id: str
  source: str
  text: str


@dataclasses.dataclass(frozen=True)
class Source:
  """One Debian package and how to get documents out of it."""
  name: str
  package: str
  license: str
  group: str  # "A" prose, "B" technical docs, "C" dictionary
  extract: Callable[[Path], Iterator[ex.Doc]]


def _files(base, patterns, exclude=(), to_text=None):
  return lambda root: ex.file_documents(root, base, patterns, exclude, to_text)


SOURCES: dict[str, Source] = {s.name: s for s in (
    Source("tdavid", "sword-comm-tdavid", "Public Domain (C. H. Spurgeon, The Treasury of David)", "A",
           ex.sword_documents),
    Source("mhcc", "sword-comm-mhcc", "Public Domain (M. Henry, Concise Commentary)", "A", ex.sword_documents),
    Source("kjv", "sword-text-kjv", "Public Domain (King James Version)", "A", ex.sword_documents),
    Source("web", "sword-text-web", "Public Domain (World English Bible)", "A", ex.sword_documents),
    Source("austen", "r-cran-janeaustenr", "Public Domain novels; janeaustenr package MIT", "A",
           ex.austen_documents),
    Source("linux-doc", "linux-doc-6.1", "GPL-2.0", "B",
           _files("usr/share/doc/linux-doc-6.1/Documentation", ("**/*.rst.gz", "**/*.rst"), (r"^translations/",))),
    Source("python-doc", "python3.11-doc", "PSF-2.0", "B",
           _files("usr/share/doc/python3.11/html/_sources", ("**/*.txt",))),
    Source("perl-doc", "perl-doc", "GPL-1.0+ or Artistic-1.0", "B", _files("usr/share/perl/5.36.0/pod", ("*.pod",))),
    Source("postgresql-doc", "postgresql-doc-15", "PostgreSQL", "B",
           _files("usr/share/doc/postgresql-doc-15/html", ("*.html",), to_text=ex.html_to_text)),
    Source("django-doc", "python-django-doc", "BSD-3-Clause", "B",
           _files("usr/share/doc/python-django-doc/html", ("**/*.html",),
                  (r"^_modules/", r"^(genindex|py-modindex|search)\b"), ex.html_to_text)),
    Source("git-doc", "git-doc", "GPL-2.0", "B", _files("usr/share/doc/git-doc", ("**/*.txt",))),
    Source("gcide", "dict-gcide", "GPL-2.0+ (GNU Collaborative International Dictionary of English)", "C",
           ex.gcide_documents),
)}


@dataclasses.dataclass(frozen=True)
class SizeSpec:
  """Which sources a size uses, the validation fraction, and optional byte caps per split."""
  sources: tuple[str, ...]
  val_fraction: float
  max_train_bytes: int | None = None
  max_val_bytes: int | None = None


SIZES: dict[str, SizeSpec] = {
    "fixture": SizeSpec(("fixture",), 0.2),
    "ci": SizeSpec(("mhcc",), 0.02, 256 * 1024, 64 * 1024),
    "full": SizeSpec(tuple(SOURCES), 0.02),
}


@dataclasses.dataclass(frozen=True, eq=False)
class Corpus:
  """A prepared corpus: `path` holds train.jsonl, val.jsonl and manifest.json; `root` is the cache root."""
  size: str
  path: Path
  root: Path
  manifest: dict

  @property
  def sha256(self) -> str:
    """Identifies the corpus content (hash of the train and val files); keys the token caches."""
    return self.manifest["sha256"]

  def documents(self, split: str) -> Iterator[Document]:
    """The documents of `split` ("train" | "val") in stream order."""
    _check_split(split)
    with open(self.path / f"{split}.jsonl", encoding="utf-8") as f:
      for line in f:
        d = json.loads(line)
        yield Document(d["id"], d["source"], d["text"])


def default_root() -> Path:
  """`$CARVE_DATA_DIR`, else `<repo>/.data` (git-ignored) in a checkout, else `~/.cache/carve_jax`."""
  env = os.environ.get("CARVE_DATA_DIR")
  if env:
    return Path(env)
  repo = Path(__file__).resolve().parents[2]
  return repo / ".data" if (repo / "pyproject.toml").exists() else Path.home() / ".cache" / "carve_jax"


def _check_split(split):
  if split not in ("train", "val"):
    raise ValueError(f"split: expected 'train' or 'val', got {split!r}")


def _sha(data: bytes) -> str:
  return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _doc_key(doc_id: str) -> str:
  return _sha(doc_id.encode())


# --------------------------------------------------------------------------------------------- split
def split_documents(docs: Sequence[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
  """Document-level train/val split (module docstring); returns (train, val) in stream order."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction: expected a float in (0, 1), got {val_fraction!r}")
  ids = [d.id for d in docs]
  if len(set(ids)) != len(ids):
    raise ValueError("docs: expected unique document ids, got duplicates")
  train, val = [], []
  for source in sorted({d.source for d in docs}):
    group = sorted((d for d in docs if d.source == source), key=lambda d: _doc_key(d.id))
    total = sum(len(d.text.encode()) for d in group)
    held, k = 0, 0
    while k < len(group) - 1 and (k == 0 or held < val_fraction * total):
      held += len(group[k].text.encode())
      k += 1
    val += group[:k]
    train += group[k:]
  return sorted(train, key=lambda d: _doc_key(d.id)), val


def _cap(docs: list[Document], max_bytes: int | None) -> list[Document]:
  """The first documents up to `max_bytes` of UTF-8; the last one is cut at a line break."""
  if max_bytes is None:
    return docs
  out, n = [], 0
  for d in docs:
    b = d.text.encode()
    if n + len(b) <= max_bytes:
      out.append(d)
      n += len(b)
      continue
    cut = b[:max_bytes - n].decode("utf-8", errors="ignore")
    cut = cut[:cut.rfind("\n")] if "\n" in cut else ""
    if cut.strip():
      out.append(d._replace(text=cut.rstrip()))
    break
  return out


# ------------------------------------------------------------------------------------------------ apt
def _run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)


def fetch_packages(packages: Sequence[str], root: Path) -> dict[str, dict]:
  """Downloads (once) and unpacks the .debs; returns {package: {version, deb, deb_sha256, dir}}.

  Runs `apt-get download` in `<root>/debs` (and `apt-get update` once if a package is unknown) and
  `dpkg-deb -x` into `<root>/pkgs/<package>`; a package whose .deb is already cached is not fetched.
  """
  debs, pkgs = root / "debs", root / "pkgs"
  debs.mkdir(parents=True, exist_ok=True)
  missing = [p for p in packages if not list(debs.glob(f"{p}_*.deb"))]
  if missing:
    for tool in ("apt-get", "dpkg-deb"):
      if shutil.which(tool) is None:
        raise CorpusUnavailableError(
            f"{tool} not found: the 'ci' and 'full' corpora are Debian packages ({', '.join(missing)}) fetched "
            "with apt-get download. Run on a Debian/Ubuntu machine with network access, use size='fixture' "
            "(committed, offline), or copy a token export made elsewhere (python -m carve_jax.data export).")
    res = _run(["apt-get", "download", *missing], cwd=debs)
    if res.returncode != 0:
      upd = _run(["apt-get", "update"])
      res = _run(["apt-get", "download", *missing], cwd=debs)
      if res.returncode != 0:
        raise CorpusUnavailableError(
            f"apt-get download {' '.join(missing)} failed:\n{res.stderr.strip()}\n"
            f"(apt-get update: {upd.stderr.strip() or 'ok'})\nThese packages are in Debian 12 main; enable "
            "network access and the Debian main archive (apt-get update needs root), or use size='fixture', "
            "which works offline, or a token export (python -m carve_jax.data export) made on another machine.")
  info = {}
  for p in packages:
    deb = max(debs.glob(f"{p}_*.deb"), key=lambda f: f.stat().st_mtime)
    version = _run(["dpkg-deb", "-f", str(deb), "Version"]).stdout.strip()
    out = pkgs / p
    stamp = out / ".unpacked"
    if not stamp.exists() or stamp.read_text() != deb.name:
      shutil.rmtree(out, ignore_errors=True)
      out.mkdir(parents=True)
      res = _run(["dpkg-deb", "-x", str(deb), str(out)])
      if res.returncode != 0:
        raise CorpusUnavailableError(f"dpkg-deb -x {deb} failed: {res.stderr.strip()}")
      stamp.write_text(deb.name)
    info[p] = {"version": version, "deb": deb.name, "deb_sha256": _file_sha(deb), "dir": out}
  return info


# -------------------------------------------------------------------------------------------- prepare
def _read_jsonl(path: Path) -> list[Document]:
  with open(path, encoding="utf-8") as f:
    return [Document(d["id"], d["source"], d["text"]) for d in map(json.loads, f)]


def _collect(spec: SizeSpec, root: Path, log) -> tuple[list[Document], list[dict]]:
  if spec.sources == ("fixture",):
    docs = _read_jsonl(FIXTURE)
    meta = json.loads(FIXTURE.with_suffix(".json").read_text())
    return docs, meta["sources"]
  sources = [SOURCES[s] for s in spec.sources]
  pkgs = fetch_packages([s.package for s in sources], root)
  docs, meta = [], []
  for s in sources:
    t0 = time.time()
    p = pkgs[s.package]
    mine = [Document(f"{s.name}/{i}", s.name, text) for i, text in s.extract(p["dir"])]
    if not mine:
      raise CorpusUnavailableError(f"{s.package} {p['version']}: no documents extracted; has its layout changed?")
    docs += mine
    text_sha = hashlib.sha256()
    for d in mine:
      text_sha.update(d.text.encode() + b"\0")
    meta.append({"source": s.name, "package": s.package, "version": p["version"], "license": s.license,
                 "group": s.group, "deb": p["deb"], "deb_sha256": p["deb_sha256"],
                 "text_sha256": text_sha.hexdigest(), "documents": len(mine),
                 "bytes": sum(len(d.text.encode()) for d in mine)})
    log(f"[data] {s.name:15s} {p['version']:22s} {len(mine):5d} docs {meta[-1]['bytes'] / 1e6:7.2f} MB "
        f"({time.time() - t0:.1f}s)")
    copyright_file = p["dir"] / "usr/share/doc" / s.package / "copyright"
    meta[-1]["copyright"] = copyright_file.read_text(errors="replace") if copyright_file.exists() else None
  return docs, meta


def prepare_corpus(size: str = "fixture", root: str | Path | None = None, *, verbose: bool = False) -> Corpus:
  """Fetches, extracts and splits the corpus of `size` once; later calls read the cache.

  Args:
    size: "fixture" (committed, offline) | "ci" (one small package) | "full" (~116 MB).
    root: cache root; default `$CARVE_DATA_DIR` or `<repo>/.data`.
  Raises:
    ValueError: unknown size.  CorpusUnavailableError: apt-get/dpkg-deb missing or the download failed.
  """
  if size not in SIZES:
    raise ValueError(f"size: expected one of {sorted(SIZES)}, got {size!r}")
  root = Path(root) if root is not None else default_root()
  path = root / "corpus" / size
  manifest_path = path / "manifest.json"
  if manifest_path.exists():
    manifest = json.loads(manifest_path.read_text())
    for split in ("train", "val"):
      if _file_sha(path / f"{split}.jsonl") != manifest["splits"][split]["sha256"]:
        raise ValueError(f"{path / f'{split}.jsonl'}: sha256 differs from its manifest; delete {path} to rebuild")
    return Corpus(size, path, root, manifest)

  log = print if verbose else (lambda *_: None)
  t0 = time.time()
  spec = SIZES[size]
  docs, sources = _collect(spec, root, log)
  train, val = split_documents(docs, spec.val_fraction)
  train, val = _cap(train, spec.max_train_bytes), _cap(val, spec.max_val_bytes)

  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{size}-"))
  splits = {}
  for split, part in (("train", train), ("val", val)):
    with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
      for d in part:
        f.write(json.dumps(d._asdict(), ensure_ascii=False) + "\n")
    per_source = {}
    for d in part:
      c = per_source.setdefault(d.source, {"documents": 0, "bytes": 0})
      c["documents"] += 1
      c["bytes"] += len(d.text.encode())
    splits[split] = {"sha256": _file_sha(tmp / f"{split}.jsonl"), "documents": len(part),
                     "bytes": sum(c["bytes"] for c in per_source.values()), "sources": per_source,
                     "document_ids": sorted(d.id for d in part) if split == "val" else None}
  licenses = tmp / "licenses"
  licenses.mkdir()
  for s in sources:
    text = s.pop("copyright", None)
    if text:
      (licenses / f"{s['package']}.copyright").write_text(text)
  manifest = {
      "size": size, "sha256": _sha((splits["train"]["sha256"] + splits["val"]["sha256"]).encode()),
      "split_rule": (f"per source: documents ordered by sha256(id); the first go to val until >= "
                     f"{spec.val_fraction:g} of the source's bytes (>= 1 document, >= 1 left for train); "
                     f"train ordered by sha256(id); caps: train {spec.max_train_bytes}, val {spec.max_val_bytes} "
                     "bytes (last document cut at a line break)"),
      "val_fraction": spec.val_fraction, "sources": sources, "splits": splits,
      "build_seconds": round(time.time() - t0, 1),
  }
  (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
  if path.exists():
    shutil.rmtree(path)
  os.replace(tmp, path)
  log(f"[data] {size}: train {splits['train']['bytes'] / 1e6:.2f} MB ({splits['train']['documents']} docs), "
      f"val {splits['val']['bytes'] / 1e6:.2f} MB ({splits['val']['documents']} docs) in {time.time() - t0:.0f}s")
  return Corpus(size, path, root, manifest)


# -------------------------------------------------------------------------------------------- fixture
FIXTURE_SOURCES = ("austen", "kjv", "mhcc", "tdavid")


def make_fixture(full: Corpus, per_source: int = 5, doc_bytes: int = 4000, path: Path = FIXTURE) -> Path:
  """Writes the committed fixture: `per_source` public-domain excerpts of ~`doc_bytes` from each of
  FIXTURE_SOURCES (first train documents of each, cut at a line break) and its manifest."""
  picked: dict[str, list[Document]] = {s: [] for s in FIXTURE_SOURCES}
  for d in full.documents("train"):
    if d.source in picked and len(picked[d.source]) < per_source:
      picked[d.source].append(_cap([d], doc_bytes)[0])
  docs = [d._replace(id=f"fixture/{d.id}") for s in FIXTURE_SOURCES for d in picked[s]]
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    for d in docs:
      f.write(json.dumps(d._asdict(), ensure_ascii=False) + "\n")
  sources = []
  for s in full.manifest["sources"]:
    if s["source"] in FIXTURE_SOURCES:
      mine = [d for d in docs if d.source == s["source"]]
      sources.append({k: s[k] for k in ("source", "package", "version", "license", "group", "deb", "deb_sha256")}
                     | {"documents": len(mine), "bytes": sum(len(d.text.encode()) for d in mine),
                        "text_sha256": _sha(b"".join(d.text.encode() + b"\0" for d in mine))})
  path.with_suffix(".json").write_text(json.dumps(
      {"made_by": "python -m carve_jax.data fixture", "from_corpus_sha256": full.sha256,
       "excerpt": f"first {per_source} train documents per source, each cut to <= {doc_bytes} bytes at a line break",
       "sources": sources}, indent=1))
  return path
