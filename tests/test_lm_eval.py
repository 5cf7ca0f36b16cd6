"""lm-evaluation-harness adapter (`carve_jax.train.lm_eval_adapter`, `carve-eval --tasks`) on a tiny model.

Every number is checked against a hand computation: log-softmax of one parallel forward, summed over
the continuation's tokens; generation (the adapter's batched recurrent-cache decoding) against greedy
decoding by repeated parallel forwards of one row.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

lm_eval = pytest.importorskip("lm_eval", reason="lm-evaluation-harness is not installed (pip install 'carve_jax[eval]')")

from lm_eval.api.instance import Instance  # noqa: E402

from carve_jax.configs import preset  # noqa: E402
from carve_jax.data.tokenizer import ByteTokenizer  # noqa: E402
from carve_jax.model import LM  # noqa: E402
from carve_jax.train.lm_eval_adapter import CarveLM  # noqa: E402

TASKS = Path(__file__).parent / "lm_eval_tasks"
TOK = ByteTokenizer()


@pytest.fixture(scope="module")
def model():
  cfg = preset("tiny", mixer="gdn2", n_layers=1, init_std=0.2, impl="chunk")
  return LM(cfg, rngs=nnx.Rngs(3))


def _docs():
  return [json.loads(line) for line in (TASKS / "tiny.jsonl").read_text().splitlines() if line.strip()]


PAD = 64
_FWD = {}


def hand_logits(model, ids) -> np.ndarray:
  """float64 logits [len(ids), V] of one row: the parallel forward, right-padded to PAD tokens (causal, so the
  padding never changes them) and jitted once per model."""
  assert len(ids) <= PAD
  if id(model) not in _FWD:
    graphdef, state = nnx.split(model)
    _FWD[id(model)] = (jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)), state)
  fwd, state = _FWD[id(model)]
  row = np.zeros((1, PAD), np.int32)
  row[0, :len(ids)] = ids
  return np.asarray(fwd(state, jnp.asarray(row))[0, :len(ids)], np.float64)


def hand_greedy(model, ids, n: int) -> list[int]:
  """Greedy continuation by re-running the parallel forward on the whole prefix (no cache), up to n tokens or EOS."""
  ids, out = list(ids), []
  for _ in range(n):
    nxt = int(np.argmax(hand_logits(model, ids)[-1]))
    if nxt == TOK.eos_id:
      break
    out.append(nxt)
    ids.append(nxt)
  return out


def hand_ll(model, ctx_ids, cont_ids) -> tuple[float, bool]:
  ids = list(ctx_ids) + list(cont_ids)
  logits = hand_logits(model, ids[:-1])
  lp = logits - np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1, keepdims=True)) - logits.max(-1, keepdims=True)
  n = len(cont_ids)
  pos = range(len(ids) - 1 - n, len(ids) - 1)
  return float(sum(lp[p, ids[p + 1]] for p in pos)), all(int(np.argmax(logits[p])) == ids[p + 1] for p in pos)


def _enc(s):
  return [int(i) for i in TOK.encode(s)]


def test_loglikelihood_matches_hand_computation(model):
  lm = CarveLM(model=model, tokenizer=TOK, batch_size=3, max_length=64)
  reqs, want = [], []
  for i, doc in enumerate(_docs()):
    for choice in doc["choices"]:
      reqs.append(Instance("loglikelihood", doc, (doc["question"], choice), i))
      ctx = _enc(doc["question"]) if doc["question"] else [TOK.eos_id]
      want.append(hand_ll(model, ctx, _enc(choice)))
  got = lm.loglikelihood(reqs, disable_tqdm=True)
  np.testing.assert_allclose([g[0] for g in got], [w[0] for w in want], rtol=1e-5, atol=1e-4)
  assert [g[1] for g in got] == [w[1] for w in want]


def test_loglikelihood_left_truncates_to_max_length(model):
  lm = CarveLM(model=model, tokenizer=TOK, batch_size=2, max_length=8)
  ctx, cont = _enc("abcdefghijklmnop"), _enc("xyz")
  full = ctx + cont
  got = lm.loglikelihood([Instance("loglikelihood", {}, ("abcdefghijklmnop", "xyz"), 0)], disable_tqdm=True)[0]
  want = hand_ll(model, full[-9:-3], cont)  # the last 9 tokens: 8 inputs
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)


@pytest.mark.parametrize("max_length", [64, 16])
def test_loglikelihood_rolling_matches_hand_windows(model, max_length):
  text = "It was the best of times, it was the worst of times."
  x = _enc(text)
  L = max_length
  want, a = 0.0, 0
  while a < len(x):  # lm-eval's disjoint windows: tokens [a, b) predicted from x[b-L-1 : b-1]
    if a == 0:
      b = min(L, len(x))
      want += hand_ll(model, [TOK.eos_id], x[:b])[0]
    else:
      b = min(len(x), a + L)
      want += hand_ll(model, x[max(0, b - L - 1):a], x[a:b])[0]
    a = b
  lm = CarveLM(model=model, tokenizer=TOK, batch_size=4, max_length=L)
  got = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)], disable_tqdm=True)[0]
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_generate_until_batched_equals_row_by_row(model):
  prompts = ["The cat sat on the", "Water is", "It was a dark and stormy", "One"]
  kw = {"until": ["e"], "max_gen_toks": 7, "do_sample": False}
  lm = CarveLM(model=model, tokenizer=TOK, batch_size=3, max_length=128)
  got = lm.generate_until([Instance("generate_until", {}, (p, kw), i) for i, p in enumerate(prompts)],
                          disable_tqdm=True)
  for p, g in zip(prompts, got):
    assert g == TOK.decode(np.asarray(hand_greedy(model, _enc(p), 7), np.int32)).split("e")[0]
  # Sampling at a vanishing temperature is greedy; at temperature 1 it differs somewhere.
  cold = lm.generate_until([Instance("generate_until", {}, (p, {**kw, "do_sample": True, "temperature": 1e-4}), i)
                            for i, p in enumerate(prompts)], disable_tqdm=True)
  assert cold == got
  hot = lm.generate_until([Instance("generate_until", {}, (p, {"max_gen_toks": 7, "do_sample": True}), i)
                           for i, p in enumerate(prompts)], disable_tqdm=True)
  assert [h[:len(g)] for h, g in zip(hot, got)] != got


def test_carve_eval_tasks_cli_matches_hand(model, tmp_path, monkeypatch):
  from carve_jax.interop.cli import write_checkpoint
  from carve_jax.train import eval as eval_cli
  ckpt = write_checkpoint(model, str(tmp_path / "run"), tokenizer="byte")
  monkeypatch.chdir(TASKS)
  monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
  out = tmp_path / "res.json"
  assert eval_cli.main(["--ckpt_dir", ckpt, "--tasks", "carve_tiny_mc,carve_tiny_gen,carve_tiny_ppl", "--include_path",
                        str(TASKS), "--batch_size", "4", "--max_length", "64", "--output", str(out)]) == 0
  res = json.loads(out.read_text())["results"]
  acc, acc_norm, em, ll, n_bytes = [], [], [], 0.0, 0
  for doc in _docs():
    text = doc["question"] + " " + doc["choices"][doc["answer"]]  # tiny_ppl's doc_to_target
    ll += hand_ll(model, [TOK.eos_id], _enc(text))[0]  # one rolling window: every text is < 64 bytes
    n_bytes += len(text.encode("utf-8"))
    ctx = _enc(doc["question"]) if doc["question"] else [TOK.eos_id]
    lls = np.asarray([hand_ll(model, ctx, _enc(c))[0] for c in doc["choices"]])
    acc.append(int(np.argmax(lls)) == doc["answer"])
    acc_norm.append(int(np.argmax(lls / [len(c) for c in doc["choices"]])) == doc["answer"])
    gen = hand_greedy(model, ctx, 6)
    em.append(TOK.decode(np.asarray(gen, np.int32)).split("\n")[0] == doc["choices"][doc["answer"]])
  assert res["carve_tiny_mc"]["acc,none"] == pytest.approx(np.mean(acc))
  assert res["carve_tiny_mc"]["acc_norm,none"] == pytest.approx(np.mean(acc_norm))
  assert res["carve_tiny_gen"]["exact_match,none"] == pytest.approx(np.mean(em))
  assert res["carve_tiny_ppl"]["bits_per_byte,none"] == pytest.approx(-ll / n_bytes / np.log(2), rel=1e-5)
  assert res["carve_tiny_ppl"]["byte_perplexity,none"] == pytest.approx(np.exp(-ll / n_bytes), rel=1e-5)


def test_carve_eval_tasks_bad_input(tmp_path, capsys):
  from carve_jax.train.lm_eval_adapter import main
  with pytest.raises(SystemExit):
    main(["--ckpt_dir", str(tmp_path), "--tasks", "no_such_task_xyz"])
  assert "unknown lm-eval task" in capsys.readouterr().err
  with pytest.raises(ValueError, match="exactly one of"):
    CarveLM()
