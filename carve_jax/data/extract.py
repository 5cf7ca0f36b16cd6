"""Plain text out of the file formats that Debian's text packages ship; one generator per format.

Every extractor takes the folder a package was unpacked into (`dpkg -x pkg.deb DIR`) and yields
`(doc_id, text)` pairs, one per *document*: the unit the train/val split holds out whole.

  SWORD zText/zCom modules   one document per compressed block (a Bible book, or a chapter for
                             BlockType=CHAPTER). `*.[bc]zs` holds 12-byte records (u32 LE offset,
                             compressed size, raw size) into zlib blocks in `*.[bc]zz`; the block is
                             OSIS XML: notes dropped, div/p/title/chapter/lb become line breaks.
  R lazy-load `Rdata.rdb`    janeaustenr's novels: [BE u32 raw length][zlib] records, each an XDR
                             character vector (one line per element); one document per chapter.
  rst / pod / asciidoc       source files as they are (markup kept), `.gz` read transparently.
  HTML                       visible text of the main content (navigation, scripts, headers dropped).
  dictd (gcide)              entries of `gcide.dict.dz` (gzip), source tags like "[1913 Webster]"
                             and indentation dropped, consecutive entries grouped into ~64 KB documents.

All text is returned NFC-normalised with "\n" line ends, no NUL bytes (NUL is the byte tokenizer's EOS),
no trailing spaces and at most one blank line in a row.
"""

from __future__ import annotations

import gzip
import html
import html.parser
import re
import struct
import unicodedata
import zlib
from collections.abc import Iterator
from pathlib import Path

Doc = tuple[str, str]

_BLANKS = re.compile(r"\n{3,}")
_TRAILING = re.compile(r"[ \t]+\n")


def clean_text(text: str) -> str:
  """NFC, "\n" line ends, no NUL/other C0 controls but tab/newline, no trailing spaces, <= 1 blank line."""
  text = unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n"))
  text = text.translate(_CONTROLS)
  text = _TRAILING.sub("\n", text)
  return _BLANKS.sub("\n\n", text).strip("\n")


_CONTROLS = {c: None for c in range(32) if chr(c) not in "\t\n"} | {0x7F: None}


# ---------------------------------------------------------------------------------------------- SWORD
_NOTE = re.compile(r"<note\b[^>]*?(?:/>|>.*?</note>)", re.S)
_ELEMENT = re.compile(r"<(/?)([A-Za-z]+)\b([^>]*)>")
_PARAGRAPH = {"div", "p", "title", "chapter", "head", "table", "list", "lg"}
_LINE = {"l", "lb", "row", "item"}
_USFM = re.compile(r"\\[a-z]{1,4}\*?\s?")  # stray USFM markers such as "\nd " in some modules
_SPACE_PUNCT = re.compile(r"[ \t]+([,.;:!?])")
_SPACES = re.compile(r"[ \t]+")


def _osis_element(m: re.Match) -> str:
  closing, name, attrs = m.groups()
  if "eID=" in attrs or "x-milestone" in attrs:
    return ""  # end markers of milestone pairs and pre-verse milestones carry no break
  if name in _PARAGRAPH:
    return "\n\n"
  if name in _LINE and not closing:
    return "\n"
  return " " if name == "cell" else ""


def osis_to_text(osis: str) -> str:
  """OSIS XML fragment -> plain text (notes removed; div/p/title -> paragraph, l/lb -> line breaks)."""
  s = _ELEMENT.sub(_osis_element, _NOTE.sub(" ", osis))
  s = _USFM.sub("", html.unescape(s))
  s = _SPACE_PUNCT.sub(r"\1", _SPACES.sub(" ", s))
  return clean_text("\n".join(line.strip() for line in s.split("\n")))


def sword_blocks(index: bytes, data: bytes) -> list[bytes]:
  """Decompresses every block of a SWORD `.bzz`/`.czz` file given its `.bzs`/`.czs` index."""
  if len(index) % 12:
    raise ValueError(f"index: expected a multiple of 12 bytes (u32 offset, size, raw size), got {len(index)}")
  out = []
  for i in range(len(index) // 12):
    off, size, raw = struct.unpack_from("<III", index, 12 * i)
    block = zlib.decompress(data[off:off + size])
    if len(block) != raw:
      raise ValueError(f"block {i}: expected {raw} bytes after zlib, got {len(block)}")
    out.append(block)
  return out


def sword_documents(pkg_root: Path) -> Iterator[Doc]:
  """All SWORD modules under `pkg_root/usr/share/sword`: one document per block, id `module/ot/012`."""
  sword = Path(pkg_root) / "usr/share/sword"
  for conf in sorted((sword / "mods.d").glob("*.conf")):
    fields = dict(line.split("=", 1) for line in conf.read_text(errors="replace").splitlines() if "=" in line)
    data_path = sword / fields["DataPath"].strip().lstrip("./")
    prefix = {"BOOK": "b", "CHAPTER": "c", "VERSE": "v"}[fields.get("BlockType", "CHAPTER").strip()]
    for testament in ("ot", "nt"):
      idx = data_path / f"{testament}.{prefix}zs"
      if not idx.exists() or idx.stat().st_size == 0:
        continue
      blocks = sword_blocks(idx.read_bytes(), (data_path / f"{testament}.{prefix}zz").read_bytes())
      for i, block in enumerate(blocks):
        text = osis_to_text(block.decode("utf-8", errors="replace"))
        if len(text) >= 200:  # skip empty/introductory stubs
          yield f"{conf.stem.lower()}/{testament}/{i:03d}", text


# --------------------------------------------------------------------------------------- R (janeaustenr)
def rdb_character_vectors(path: Path) -> list[list[str]]:
  """The character vectors of an R lazy-load database (`Rdata.rdb`), in file order.

  Each record is [BE u32 raw length][zlib stream] holding an XDR serialisation ("X\n", version 3):
  header, then a STRSXP (type 16) of n CHARSXP elements [u32 flags (type 9)][i32 length][bytes].
  """
  buf, pos, out = Path(path).read_bytes(), 0, []
  while pos < len(buf):
    raw_len, = struct.unpack_from(">I", buf, pos)
    dec = zlib.decompressobj()
    raw = dec.decompress(buf[pos + 4:])
    pos = len(buf) - len(dec.unused_data)
    if len(raw) != raw_len or raw[:2] != b"X\n":
      raise ValueError(f"{path}: expected an XDR record of {raw_len} bytes, got {len(raw)} bytes")
    p = 2 + 12
    enc_len, = struct.unpack_from(">i", raw, p)
    p += 4 + enc_len
    sexp, n = struct.unpack_from(">Ii", raw, p)
    if sexp & 0xFF != 16:
      continue  # not a character vector
    p += 8
    strings = []
    for _ in range(n):
      flags, length = struct.unpack_from(">Ii", raw, p)
      p += 8
      if flags & 0xFF != 9:
        raise ValueError(f"{path}: expected CHARSXP (9), got type {flags & 0xFF}")
      strings.append("" if length < 0 else raw[p:p + length].decode("utf-8", errors="replace"))
      p += max(length, 0)
    out.append(strings)
  return out


_CHAPTER = re.compile(r"^\s*(?:CHAPTER|Chapter)\s+[0-9IVXLC]+\.?\s*$")


def austen_documents(pkg_root: Path) -> Iterator[Doc]:
  """janeaustenr's six novels, one document per chapter, id `persuasion/ch07`."""
  rdb = Path(pkg_root) / "usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"
  for lines in rdb_character_vectors(rdb):
    title = next(line for line in lines if line.strip()).strip()
    book = re.sub(r"[^a-z]", "", title.lower())
    chapters, cur = [], []
    for line in lines:
      if _CHAPTER.match(line) and cur:
        chapters.append(cur)
        cur = []
      cur.append(line)
    chapters.append(cur)
    if len(chapters) > 1:  # the title page goes with chapter 1
      chapters[:2] = [chapters[0] + chapters[1]]
    for i, chapter in enumerate(chapters):
      text = clean_text(_unwrap("\n".join(chapter)))
      if text:
        yield f"{book}/ch{i:02d}", text


def _unwrap(text: str) -> str:
  """Joins hard-wrapped lines within a paragraph (blank lines separate paragraphs)."""
  return "\n\n".join(" ".join(p.split()) for p in re.split(r"\n\s*\n", text))


# ------------------------------------------------------------------------------------- source files
def read_maybe_gz(path: Path) -> str:
  data = Path(path).read_bytes()
  if path.suffix == ".gz":
    data = gzip.decompress(data)
  return data.decode("utf-8", errors="replace")


def file_documents(pkg_root: Path, base: str, patterns: tuple[str, ...], exclude: tuple[str, ...] = (),
                   to_text=None) -> Iterator[Doc]:
  """Files under `pkg_root/base` matching any glob in `patterns` (none of `exclude`), one document each.

  The id is the path relative to `base` without `.gz`; `to_text` (default: identity) converts the
  file's text (e.g. `html_to_text`).
  """
  root = Path(pkg_root) / base
  seen = set()
  for pattern in patterns:
    for path in sorted(root.glob(pattern)):
      rel = path.relative_to(root).as_posix()
      if rel in seen or not path.is_file() or any(re.search(x, rel) for x in exclude):
        continue
      seen.add(rel)
      text = read_maybe_gz(path)
      text = clean_text(to_text(text) if to_text else text)
      if len(text) >= 200:
        yield rel.removesuffix(".gz"), text


# --------------------------------------------------------------------------------------------- HTML
_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}
_BLOCK = {"p", "div", "br", "li", "ul", "ol", "dl", "dt", "dd", "tr", "table", "pre", "blockquote", "section",
          "h1", "h2", "h3", "h4", "h5", "h6", "hr", "title", "caption", "figure", "article", "main"}
_SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg", "button", "form"}
_SKIP_MARKERS = {"navheader", "navfooter", "nav", "sphinxsidebar", "related", "footer", "headerlink",
                 "hd", "ft", "sidebar", "global-nav", "breadcrumbs", "toc-backref", "skip-link"}


class _HTMLText(html.parser.HTMLParser):
  """Collects visible text; drops navigation/sidebars by tag, class or id (see `_SKIP_MARKERS`)."""

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.parts, self.stack, self.skip, self.pre = [], [], 0, 0

  def handle_starttag(self, tag, attrs):
    if tag in _VOID:
      if tag in ("br", "hr") and not self.skip:
        self.parts.append("\n")
      return
    a = dict(attrs)
    markers = set((a.get("class") or "").split()) | {a.get("id") or ""}
    skip = tag in _SKIP_TAGS or bool(markers & _SKIP_MARKERS)
    self.stack.append((tag, skip))
    self.skip += skip
    self.pre += tag == "pre"
    if tag in _BLOCK and not self.skip:
      self.parts.append("\n")

  def handle_endtag(self, tag):
    if tag in _VOID or not any(t == tag for t, _ in self.stack):
      return
    while self.stack:  # close implicitly-closed children too
      t, skip = self.stack.pop()
      self.skip -= skip
      self.pre -= t == "pre"
      if t == tag:
        break
    if tag in _BLOCK and not self.skip:
      self.parts.append("\n")

  def handle_data(self, data):
    if self.skip:
      return
    if not self.pre:
      data = _WS.sub(" ", data)
      if not self.parts or self.parts[-1].endswith("\n"):
        data = data.lstrip(" ")
    self.parts.append(data)


_WS = re.compile(r"\s+")


def html_to_text(source: str) -> str:
  """Visible text of an HTML page's content: block elements become line breaks, <pre> keeps its layout."""
  parser = _HTMLText()
  parser.feed(source)
  parser.close()
  return "\n".join(line.rstrip() for line in "".join(parser.parts).split("\n"))


# -------------------------------------------------------------------------------------------- gcide
_SOURCE_TAG = re.compile(r"^[ \t]*\[[^\]\n]{0,40}\][ \t]*$", re.M)
_INDENT = re.compile(r"^[ \t]+", re.M)
_LICENSE = ("GNU", "ftp://", "Free Software Foundation", "original data", "Begin file", "End of file", "* * *",
            "GCIDE", "00-database")


def gcide_documents(pkg_root: Path, doc_chars: int = 65536) -> Iterator[Doc]:
  """GCIDE entries (alphabetical) grouped into documents of >= `doc_chars` characters, id `gcide/0042`.

  An entry starts at column 0 with "headword \\pro*nun"ci*a`tion\\"; paragraphs without that header
  continue the previous entry, except the dictd metadata and the per-letter license banners (dropped).
  """
  raw = gzip.decompress((Path(pkg_root) / "usr/share/dictd/gcide.dict.dz").read_bytes())
  text = _SOURCE_TAG.sub("", raw.decode("utf-8", errors="replace"))
  entries: list[str] = []
  for para in re.split(r"\n\s*\n(?=\S)", text):
    head = para.split("\n", 1)[0]
    if "\\" in head:
      entries.append(para)
    elif entries and not any(x in para for x in _LICENSE):
      entries[-1] += "\n\n" + para
  doc, n, k = [], 0, 0
  for entry in entries:
    entry = clean_text(_SPACES.sub(" ", _INDENT.sub("", entry)))
    doc.append(entry)
    n += len(entry)
    if n >= doc_chars:
      yield f"gcide/{k:04d}", "\n\n".join(doc)
      doc, n, k = [], 0, k + 1
  if doc:
    yield f"gcide/{k:04d}", "\n\n".join(doc)
