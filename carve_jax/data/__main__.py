"""Command line: prepare a corpus, print its statistics, export token streams, rebuild the fixture.

  python -m carve_jax.data prepare --size full
  python -m carve_jax.data stats --size full --tokenizer gpt2
  python -m carve_jax.data export --size full --tokenizer byte --max-mb 40 --out .data/gpu
  python -m carve_jax.data fixture          # rewrites carve_jax/data/fixtures/ from the "full" corpus
"""

from __future__ import annotations

import argparse
import json
import time

from carve_jax.data.corpus import SIZES, make_fixture, prepare_corpus
from carve_jax.data.pipeline import export_tokens, load_tokens
from carve_jax.data.tokenizer import TOKENIZERS, get_tokenizer


def main(argv=None):
  p = argparse.ArgumentParser(prog="python -m carve_jax.data", description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("command", choices=("prepare", "stats", "export", "fixture"))
  p.add_argument("--size", default="fixture", choices=sorted(SIZES))
  p.add_argument("--tokenizer", default="byte", choices=TOKENIZERS)
  p.add_argument("--root", default=None, help="cache root (default $CARVE_DATA_DIR or <repo>/.data)")
  p.add_argument("--out", default=".data/gpu", help="export folder")
  p.add_argument("--max-mb", type=float, default=40.0, help="export size limit in MB (both splits, compressed)")
  args = p.parse_args(argv)

  if args.command == "fixture":
    path = make_fixture(prepare_corpus("full", args.root, verbose=True))
    print(f"[data] wrote {path}")
    return
  t0 = time.time()
  corpus = prepare_corpus(args.size, args.root, verbose=True)
  if args.command == "prepare":
    print(json.dumps({k: {kk: v[kk] for kk in ("documents", "bytes", "sha256")}
                      for k, v in corpus.manifest["splits"].items()}, indent=1))
  elif args.command == "stats":
    tok = get_tokenizer(args.tokenizer)
    for split in ("train", "val"):
      t = time.time()
      stream = load_tokens(corpus, tok, split)
      print(f"[data] {args.size}/{split}: {corpus.manifest['splits'][split]['bytes']:,} bytes, "
            f"{len(stream):,} {tok.name} tokens ({stream.dtype}), {time.time() - t:.1f}s")
  else:
    meta = export_tokens(corpus, args.tokenizer, args.out, max_mb=args.max_mb, verbose=True)
    total = sum(s["file_bytes"] for s in meta["splits"].values())
    print(f"[data] exported to {args.out}: {total / 1e6:.1f} MB; on a machine without apt: "
          f"load_tokens({args.out!r}, {args.tokenizer!r}, 'train')")
  print(f"[data] done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
  main()
