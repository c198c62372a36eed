"""Reference log-prob cache: cached == live, invalidation, no params loaded on a hit."""

import functools
import json

import jax
import numpy as np
import optax
import pytest

from jaxalign.data import batching
from jaxalign.data.examples import PairExample
from jaxalign.data.tokenizer import ByteTokenizer
from jaxalign.losses import dpo
from jaxalign.models import transformer as tr
from jaxalign.parallel import mesh as ml
from jaxalign.train import objectives as ob
from jaxalign.train import refcache
from jaxalign.train import state as st
from jaxalign.train import steps

TOK = ByteTokenizer()
CFG = tr.TransformerConfig.tiny(vocab_size=TOK.vocab_size, d_model=32, n_layers=1,
                                n_heads=4, n_kv_heads=2, mlp_dim=64)
LAYOUT = batching.LayoutConfig(kind="prefix_shared", buckets=(32,),
                               examples_per_batch=2)
RECORDS = [("Hi?", "Hello.", "Go away."), ("2+2?", "4", "5"),
           ("Sky?", "Blue", "Green"), ("Bye", "Bye!", "No.")]


class _ProtoTokenizer(ByteTokenizer):
  """Same ids as ByteTokenizer but a different model (stands in for a new SP model)."""
  model_proto = b"another tokenizer model"


def _write_data(path, records):
  path.write_text("\n".join(json.dumps({"p": p, "c": c, "r": r})
                            for p, c, r in records))


def _batches(path, tokenizer):
  records = [json.loads(line) for line in path.read_text().splitlines()]
  examples = [PairExample(tokenizer.encode(r["p"]), tokenizer.encode(r["c"]),
                          tokenizer.encode(r["r"])) for r in records]
  return list(batching.iter_batches(examples, LAYOUT))


def _key(data_path, tokenizer, reference="ref-v1"):
  return refcache.cache_key(reference=reference,
                            tokenizer=refcache.fingerprint_tokenizer(tokenizer),
                            data=refcache.fingerprint_files([data_path]),
                            layout=LAYOUT)


@functools.lru_cache(maxsize=None)
def _setup():
  graphdefs = []  # captured from an abstract trace: no eager init
  jax.eval_shape(lambda k: graphdefs.append(tr.init(CFG, k)[0]), jax.random.key(0))
  graphdef = graphdefs[0]
  init_fn = lambda k: tr.init(CFG, k)[1]
  ref_params = jax.device_get(jax.jit(init_fn)(jax.random.key(7)))
  forward_fn = ob.model_forward_fn(graphdef)
  objective = ob.make_objective("pairwise", loss_fn=functools.partial(dpo, beta=0.1),
                                forward_fn=forward_fn, needs_reference=True,
                                chunk_size=32)
  logprob = jax.jit(functools.partial(steps.logprob_step, forward_fn=forward_fn,
                                      chunk_size=32))
  return init_fn, ref_params, objective, logprob


@functools.lru_cache(maxsize=None)
def _initial_state():
  init_fn = _setup()[0]
  mesh = ml.make_mesh(ml.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  state, _ = st.init_train_state(init_fn, optax.sgd(0.05), tr.logical_axes(CFG),
                                 mesh, jax.random.key(1))
  return state


def _train(batches, ref_params):
  objective = _setup()[2]
  # Not donated: both runs start from the same initial state object.
  step = jax.jit(functools.partial(steps.train_step, objective=objective,
                                   optimizer=optax.sgd(0.05)))
  state = _initial_state()
  losses = []
  for batch in batches:
    state, metrics = step(state, ref_params, batch)
    losses.append(float(metrics["loss"]))
  return losses


def test_cached_reference_losses_equal_live_and_invalidate(tmp_path):
  _, ref_params, _, logprob = _setup()
  data = tmp_path / "pairs.jsonl"
  _write_data(data, RECORDS)
  batches = _batches(data, TOK)
  assert len(batches) == 2
  loads = []

  def load_reference():
    loads.append(1)
    return ref_params

  def must_not_load():
    raise AssertionError("reference params loaded despite a valid cache")

  key = _key(data, TOK)
  cache, computed = refcache.build_or_load(tmp_path / "cache", key,
                                           lambda: batches, load_reference, logprob)
  assert computed and len(loads) == 1 and len(cache) == 2

  live = _train(batches, ref_params)
  cached = _train([cache.attach(b) for b in batches], None)
  # Same reference forward, run in a separate program: f32 rtol 1e-5.
  np.testing.assert_allclose(cached, live, rtol=1e-5)

  # Same key: served from disk, the loader is never called.
  again, computed = refcache.build_or_load(tmp_path / "cache", key, lambda: batches,
                                           must_not_load, logprob)
  assert not computed
  for b in batches:
    np.testing.assert_array_equal(again.lookup(b), cache.lookup(b))

  # A different tokenizer model -> a different key -> recomputed.
  key_tok = _key(data, _ProtoTokenizer())
  assert key_tok != key
  _, computed = refcache.build_or_load(tmp_path / "cache", key_tok, lambda: batches,
                                       load_reference, logprob)
  assert computed and len(loads) == 2

  # Edited data -> a different key; the old cache does not know the new batches.
  _write_data(data, RECORDS[:3] + [("Bye", "Bye!", "Nope.")])
  key_data = _key(data, TOK)
  assert key_data not in (key, key_tok)
  new_batches = _batches(data, TOK)
  with pytest.raises(KeyError, match="no entry for this batch"):
    again.lookup(new_batches[1])
  fresh, computed = refcache.build_or_load(tmp_path / "cache", key_data,
                                           lambda: new_batches, load_reference,
                                           logprob)
  assert computed and len(loads) == 3
  np.testing.assert_array_equal(fresh.lookup(new_batches[0]), cache.lookup(batches[0]))


def test_unfinished_cache_is_recomputed(tmp_path):
  _, ref_params, _, logprob = _setup()
  data = tmp_path / "pairs.jsonl"
  _write_data(data, RECORDS[:2])
  batches = _batches(data, TOK)
  key = _key(data, TOK)
  # A crashed write: a shard with garbage values but no meta.json.
  partial = tmp_path / "cache" / key
  partial.mkdir(parents=True)
  np.savez(partial / "shard_00000.npz",
           digests=np.asarray([refcache.batch_digest(batches[0])]),
           ref_logps=np.full((1, 4), 123.0, np.float32))
  cache, computed = refcache.build_or_load(tmp_path / "cache", key, lambda: batches,
                                           lambda: ref_params, logprob)
  assert computed
  want = np.asarray(logprob(ref_params, batches[0])[0])
  np.testing.assert_array_equal(cache.lookup(batches[0]), want)
  assert np.all(want < 0)  # log-prob sums of non-empty completions


def test_fingerprints_track_content(tmp_path):
  a = {"w": np.arange(4, dtype=np.float32)}
  b = {"w": np.arange(4, dtype=np.float32) + 1e-7}
  assert refcache.fingerprint_params(a) == refcache.fingerprint_params(
      {"w": np.arange(4, dtype=np.float32)})
  assert refcache.fingerprint_params(a) != refcache.fingerprint_params(b)
  assert refcache.fingerprint_tokenizer(TOK) != refcache.fingerprint_tokenizer(
      _ProtoTokenizer())
  layout2 = batching.LayoutConfig(kind="padded", buckets=(32,), examples_per_batch=2)
  k1 = refcache.cache_key(reference="r", tokenizer="t", data="d", layout=LAYOUT)
  k2 = refcache.cache_key(reference="r", tokenizer="t", data="d", layout=layout2)
  assert k1 != k2
  with pytest.raises(ValueError, match="missing part 'layout'"):
    refcache.cache_key(reference="r", tokenizer="t", data="d")
  with pytest.raises(ValueError, match="does not exist"):
    refcache.fingerprint_files([tmp_path / "nope"])
