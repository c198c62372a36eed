"""LoRA (jaxalign.models.lora and the offline trainer's adapter-only training).

Oracles: the base model itself (B = 0), W + (alpha / r) A B merged in NumPy float64,
the gradient through the merged weights, a plain forward of the seed's initial params
with per-sequence sums gathered in NumPy, peft / transformers on the exported
directories, and buffer identity for "one copy of the base". Tolerances are stated per
test (float32 throughout).
"""

import dataclasses
import gc
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.models import lora as lora_lib
from jaxalign.models import transformer as tm
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import build
from jaxalign.train import logging as log_lib
from jaxalign.train import loop
from jaxalign.train import stream

sys.path.insert(0, os.path.dirname(__file__))
from test_config import _load_flags  # noqa: E402
from test_loop import _tiny_run_config  # noqa: E402

NUM_DEVICES = 8
# Jitted once per shape: eager op-by-op dispatch of the layer scan dominates otherwise.
_logits = jax.jit(tm.logits, static_argnums=0)
_forward_cached = jax.jit(tm.forward_cached, static_argnums=0)
_lora_init = jax.jit(lora_lib.init, static_argnums=(0, 1))


def _init(cfg, seed=0):
  """(graphdef, params): `tm.init`'s structure filled from NumPy (norm weights near
  their identity value); a compiled init would spend seconds per threefry program."""
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda k: tm.init(cfg, k)[1], jax.random.key(0))
  offset = 1.0 - cfg.norm_offset

  def fill(path, x):
    norm = "norm" in jax.tree_util.keystr(path)
    value = (offset if norm else 0.0) + (0.1 if norm else 0.05) * rng.normal(size=x.shape)
    return value.astype(np.float32)
  return build.graphdef(cfg), jax.tree_util.tree_map_with_path(fill, abstract)


def _tokens(cfg, b=2, t=12, seed=0):
  tok = np.random.default_rng(seed).integers(0, cfg.vocab_size, (b, t)).astype(np.int32)
  return tok, np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))


def _random_adapters(cfg, lcfg, seed, scale=0.3):
  """Adapters with B != 0 (a trained-looking update), from NumPy."""
  rng = np.random.default_rng(seed)
  return {n: {"a": (rng.uniform(-1, 1, s["a"]) / np.sqrt(np.prod(s["a"][1:-1]))
                    ).astype(np.float32),
              "b": (scale * rng.normal(size=s["b"])).astype(np.float32)}
          for n, s in lora_lib.shapes(cfg, lcfg).items()}


def _numpy_merge(params, adapters, scale):
  """W + scale * A B per layer in float64, from the weight layouts alone."""
  layers = {k: np.asarray(v, np.float64) for k, v in params["layers"].items()}
  for name, ad in adapters.items():
    a, b, w = np.asarray(ad["a"], np.float64), np.asarray(ad["b"], np.float64), layers[name]
    for i in range(w.shape[0]):
      ab = a[i].reshape(-1, a.shape[-1]) @ b[i].reshape(b.shape[1], -1)
      w[i] += scale * ab.reshape(w.shape[1:])
  return {**params, "layers": {k: v.astype(np.float32) for k, v in layers.items()}}


# --- the model-level maths ---------------------------------------------------------


@pytest.mark.parametrize("variant", ["qwen2_bias", "gemma2_norms"])
def test_zero_b_is_the_base_and_merged_equals_unmerged(variant):
  overrides = {"qwen2_bias": {"qkv_bias": True},
               "gemma2_norms": {"post_norms": True, "norm_offset": 1.0,
                                "mlp_activation": "gelu_tanh", "qk_norm": True}}[variant]
  cfg = tm.TransformerConfig.tiny(**overrides)
  graphdef, params = _init(cfg)
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0)
  tok, pos = _tokens(cfg)
  base = np.asarray(_logits(graphdef, params, tok, pos))
  fresh = _lora_init(cfg, lcfg, jax.random.key(1))
  assert all(np.all(np.asarray(v["b"]) == 0) and np.any(np.asarray(v["a"]) != 0)
             for v in fresh.values())
  zero = np.asarray(_logits(graphdef, params, tok, pos,
                              lora=lora_lib.Adapters(fresh, lcfg)))
  np.testing.assert_array_equal(zero, base)  # exactly: x A 0 adds +0.0

  ad = _random_adapters(cfg, lcfg, seed=2)
  unmerged = np.asarray(_logits(graphdef, params, tok, pos,
                                  lora=lora_lib.Adapters(ad, lcfg)))
  merged_np = _numpy_merge(params, ad, lcfg.scale)
  # lora.merge (f32) against the float64 NumPy transcription of W + (alpha/r) A B.
  for name, w in lora_lib.merge(params, ad, lcfg)["layers"].items():
    np.testing.assert_allclose(np.asarray(w), merged_np["layers"][name], atol=1e-6, rtol=0)
  merged = np.asarray(_logits(graphdef, merged_np, tok, pos))
  assert np.abs(unmerged - base).max() > 0.1  # the update is not negligible
  np.testing.assert_allclose(unmerged, merged, atol=1e-5, rtol=0)


def test_target_subset_and_the_cached_forward():
  """Only q and v adapted: merging just those matches; the KV-cache forward (prefill
  then one token) applies the same adapters as the full forward (<= 1e-5)."""
  cfg = tm.TransformerConfig.tiny()
  graphdef, params = _init(cfg)
  lcfg = lora_lib.LoraConfig(rank=2, alpha=4.0, targets=("q", "v"))
  ad = _random_adapters(cfg, lcfg, seed=3)
  assert sorted(ad) == ["wq", "wv"]
  tok, pos = _tokens(cfg, t=10)
  lora = lora_lib.Adapters(ad, lcfg)
  full = np.asarray(_logits(graphdef, params, tok, pos, lora=lora))
  np.testing.assert_allclose(
      full, np.asarray(_logits(graphdef, _numpy_merge(params, ad, lcfg.scale), tok, pos)),
      atol=1e-5, rtol=0)
  cache = tm.init_cache(cfg, 2, 10)
  _, _, cache = _forward_cached(graphdef, params, tok[:, :9], pos[:, :9], cache, 0,
                                  lora=lora)
  hidden, unembed, _ = _forward_cached(graphdef, params, tok[:, 9:], pos[:, 9:], cache, 9,
                                         lora=lora)
  last = np.asarray(tm.final_logits(cfg, hidden, unembed))[:, 0]
  np.testing.assert_allclose(last, full[:, 9], atol=1e-5, rtol=0)


@pytest.mark.parametrize("remat", ["dots", "dots_with_no_batch_dims"])
def test_remat_policies_save_projections_once(remat):
  """Under the "dots" remat policies a layer with adapters keeps each projection's
  sum x W + (alpha/r)(x A) B (named), never the (x A) B dot beside it -- as many
  [tokens, out] residuals as the base layer keeps -- and its gradient equals the
  un-rematerialised one (<= 1e-6 of the largest entry)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  import io  # pylint: disable=g-import-not-at-top
  cfg = tm.TransformerConfig.tiny(n_layers=1, remat=remat)
  _, params = _init(cfg)
  layer = jax.tree.map(lambda x: x[0], params["layers"])
  lcfg = lora_lib.LoraConfig(rank=4)
  ad = jax.tree.map(lambda x: x[0], _random_adapters(cfg, lcfg, seed=0))
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, cfg.d_model)), jnp.float32)
  pos = np.broadcast_to(np.arange(16), (2, 16))
  mask, rope = tm.layer_inputs(cfg, jnp.tril(jnp.ones((2, 16, 16), bool)), pos,
                               pos).for_layer(None)

  def loss(ad, x, lora_policy):
    def f(ad, x):
      lora = lora_lib.LayerAdapters(ad, lcfg.scale, 0.0, None)
      return tm.decoder_layer(cfg, layer, x, rope, mask, lora)
    if lora_policy is not None:
      f = jax.checkpoint(f, policy=lora_policy)
    return jnp.sum(f(ad, x) ** 2)

  policy = lora_lib.remat_policy(remat)
  out = io.StringIO()
  with contextlib.redirect_stdout(out):  # jax's public residual listing prints
    jax.ad_checkpoint.print_saved_residuals(lambda a, x: loss(a, x, policy), ad, x)
  lines = out.getvalue().splitlines()
  # No rank-r product nor bare x W is kept, only the named sums: q, k, v, o, gate and
  # up (down's output is only added to the residual). ("dots" also keeps attention's.)
  assert not [line for line in lines if "dot_general" in line and (
      "lora.py" in line or "_matmul_2d" in line)], out.getvalue()
  assert len([line for line in lines if lora_lib.PROJECTION_NAME in line]) == 6
  g_remat = jax.jit(jax.grad(lambda a: loss(a, x, policy)))(ad)
  g_plain = jax.jit(jax.grad(lambda a: loss(a, x, None)))(ad)
  for got, want in zip(jax.tree.leaves(g_remat), jax.tree.leaves(g_plain)):
    scale = float(np.abs(np.asarray(want)).max())
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-6 * scale, rtol=0)


def test_dropout_masks_the_adapter_input_only():
  """rng None: no dropout. With a key: y = x W + s ((m * x / (1 - p)) A) B with a
  Bernoulli(1 - p) mask m, transcribed from the mask the same key draws."""
  lcfg = lora_lib.LoraConfig(rank=3, alpha=6.0, dropout=0.5)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(4, 5, 8)), jnp.float32)
  a = jnp.asarray(rng.normal(size=(8, 3)), jnp.float32)
  b = jnp.asarray(rng.normal(size=(3, 6)), jnp.float32)
  y = jnp.zeros((4, 5, 6), jnp.float32)
  params = {"wq": {"a": a, "b": b}}
  off = lora_lib.LayerAdapters(params, lcfg.scale, lcfg.dropout, None).project("wq", x, y, 1)
  np.testing.assert_allclose(off, lcfg.scale * (np.asarray(x) @ a @ b), rtol=1e-5)
  key = jax.random.key(7)
  on = lora_lib.LayerAdapters(params, lcfg.scale, lcfg.dropout, key).project("wq", x, y, 1)
  mask = np.asarray(jax.random.bernoulli(jax.random.fold_in(key, 0), 0.5, x.shape))
  assert 0.3 < mask.mean() < 0.7
  want = lcfg.scale * ((np.asarray(x) * mask / 0.5) @ a @ b)
  np.testing.assert_allclose(on, want, rtol=1e-5, atol=1e-5)
  # Untargeted weights pass through.
  assert lora_lib.LayerAdapters(params, 1.0, 0.5, key).project("wk", x, y, 1) is y


def test_adapters_shard_like_their_weights():
  cfg = tm.TransformerConfig.tiny()
  lcfg = lora_lib.LoraConfig(rank=4)
  mesh = mesh_lib.make_mesh(mesh_lib.MeshConfig(data=1, fsdp=4, tensor=2))
  w_specs = mesh_lib.param_specs(tm.logical_axes(cfg), mesh_lib.DEFAULT_RULES,
                                 jax.eval_shape(lambda k: tm.init(cfg, k)[1],
                                                jax.random.key(0)), mesh)["layers"]
  shapes = jax.tree.map(jax.ShapeDtypeStruct, lora_lib.shapes(cfg, lcfg),
                        jax.tree.map(lambda _: jnp.float32, lora_lib.shapes(cfg, lcfg),
                                     is_leaf=lambda x: isinstance(x, tuple)),
                        is_leaf=lambda x: isinstance(x, tuple))
  specs = mesh_lib.param_specs(lora_lib.logical_axes(cfg, lcfg), mesh_lib.DEFAULT_RULES,
                               shapes, mesh)
  n_in = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
  for name, w_spec in w_specs.items():
    if name not in n_in:
      continue
    w = tuple(w_spec) + (None,) * 4
    a, b = tuple(specs[name]["a"]) + (None,) * 4, tuple(specs[name]["b"]) + (None,) * 4
    k = n_in[name]
    assert a[:1 + k] == w[:1 + k] and a[1 + k] is None, name  # input axes, rank replicated
    assert b[0] == w[0] and b[1] is None and b[2:2 + 2] == w[1 + k:3 + k], name
  assert specs["wq"]["a"] == jax.sharding.PartitionSpec(None, "fsdp")
  assert specs["wq"]["b"] == jax.sharding.PartitionSpec(None, None, "tensor")


# --- config --------------------------------------------------------------------------


def test_config_lora_section():
  c = _load_flags("experiments/dpo.py:tiny", "--config.model.lora.rank=16",
                  "--config.model.lora.targets=q,v,down", "--config.model.lora.alpha=32")
  lcfg = config_lib.validate(c, NUM_DEVICES).model.lora
  assert (lcfg.rank, lcfg.alpha, lcfg.targets) == (16, 32.0, ("q", "v", "down"))
  assert lcfg.scale == 2.0 and lcfg.weights == ("wq", "wv", "w_down")
  # Off by default: every existing config trains every weight.
  assert not config_lib.validate(config_lib.base_config(), NUM_DEVICES).model.lora.enabled

  def err(**lora):
    c = config_lib.base_config()
    c.model.lora.update(lora)
    with pytest.raises(ValueError) as e:
      config_lib.validate(c, NUM_DEVICES)
    return str(e.value)

  msg = err(rank=8, targets=("q", "query"))
  assert "config.model.lora.targets" in msg and "'query'" in msg
  assert "('q', 'k', 'v', 'o', 'gate', 'up', 'down')" in msg
  assert "config.model.lora.dropout" in err(rank=8, dropout=1.0)
  assert "config.model.lora.base_dtype" in err(rank=8, base_dtype="float16")
  c = config_lib.base_config()
  c.model.lora.ranks = 4
  with pytest.raises(ValueError, match=r"config.model.lora.ranks: unknown key"):
    config_lib.validate(c, NUM_DEVICES)
  c = config_lib.base_config()
  c.model.lora.rank = 4
  c.reference.kind, c.reference.hf_path = "hf", "/some/dir"
  with pytest.raises(ValueError, match=r"config.reference.kind.*second model"):
    config_lib.validate(c, NUM_DEVICES)


def test_online_rl_takes_lora_but_not_adapter_dropout():
  """Online RL trains adapters (tests/test_rl_lora.py); dropout would make the
  sampling and the updated policy differ by noise, so it is refused by name."""
  from experiments import _common  # pylint: disable=g-import-not-at-top
  c = _common.rl_config("grpo", "tiny")
  c.model.lora.rank = 4
  config_lib.validate_rl(c, NUM_DEVICES)
  c.model.lora.dropout = 0.1
  with pytest.raises(ValueError, match=r"config.model.lora.dropout: 0.1: online RL"):
    config_lib.validate_rl(c, NUM_DEVICES)


# --- training: adapters only, the base as the reference -----------------------------


def _same_buffers(reference_leaf) -> int:
  """How many live device arrays hold exactly ``reference_leaf`` (shape, dtype, values)."""
  gc.collect()
  want = np.asarray(reference_leaf)
  return sum(1 for x in jax.live_arrays()
             if x.shape == want.shape and x.dtype == want.dtype
             and np.array_equal(np.asarray(x), want))


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory, request):
  """loop.run of LoRA DPO (3 steps, live reference, bf16-stored base, adapter
  dropout), with what loop.setup built and what it held before the first step."""
  workdir = str(tmp_path_factory.mktemp("lora_dpo"))
  cfg = _tiny_run_config(**{"model.lora": {"rank": 4, "alpha": 8.0, "dropout": 0.1,
                                           "base_dtype": "bfloat16"},
                            "optimizer.learning_rate": 3e-2})
  seen = {}
  setup = loop.setup

  def recording_setup(*args, **kwargs):
    run = setup(*args, **kwargs)
    seen.update(run=run, base=jax.tree.map(np.asarray, run.ref_params),
                adapters=jax.tree.map(np.asarray, run.state.params),
                copies=[_same_buffers(run.ref_params["layers"]["wq"]),
                        _same_buffers(run.ref_params["embed"])])
    return run
  mp = pytest.MonkeyPatch()
  mp.setattr(loop, "setup", recording_setup)
  try:
    result = loop.run(cfg, workdir)
  finally:
    mp.undo()
  return cfg, result, workdir, seen


def test_the_run_holds_one_copy_of_the_base(dpo_run):
  """One set of base buffers serves the policy and the reference (a full fine-tune
  holds two: the policy and its frozen copy); the state and the optimizer hold
  adapters only."""
  _, result, _, seen = dpo_run
  run = seen["run"]
  assert seen["copies"] == [1, 1]
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(run.ref_params))
  trained = result.state.params
  assert set(trained) == {"lora"} and set(trained["lora"]) == set(lora_lib.TARGETS.values())
  opt_shapes = {x.shape for x in jax.tree.leaves(result.state.opt_state) if x.ndim > 0}
  assert opt_shapes == {x.shape for x in jax.tree.leaves(trained)}
  assert run.eval_ref_params is run.ref_params  # eval's reference: the base itself


def test_base_is_untouched_after_optimizer_steps(dpo_run):
  """After the run's 3 updates (the compiled step, dropout on) every base leaf is
  bit-identical to the copy taken before the first step; every A and B moved."""
  _, result, _, seen = dpo_run
  jax.tree.map(np.testing.assert_array_equal,
               jax.tree.map(np.asarray, seen["run"].ref_params), seen["base"])
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()),
                       result.state.params, seen["adapters"])
  assert all(v > 0 for v in jax.tree.leaves(moved))


def test_adapter_gradient_equals_the_gradient_through_the_merged_weights(dpo_run):
  """d loss / d (A, B) of the LoRA objective == the gradient of the same loss as a
  function of the merged weights W + (alpha/r) A B run as a plain model (<= 1e-5 of
  the largest entry), on an f32 copy of the base, dropout off."""
  cfg, _, _, seen = dpo_run
  run = seen["run"]
  model = dataclasses.replace(run.model, lora=dataclasses.replace(run.model.lora,
                                                                  dropout=0.0))
  forward = build.make_forward(model)
  objective = loop.make_objective(cfg, model, forward)
  plain = loop.make_objective(cfg, dataclasses.replace(model, lora=None), forward)
  batch = stream.build_data(cfg, loop.objective_kind(cfg)).train.peek()
  base = jax.tree.map(lambda x: x.astype(np.float32), seen["base"])
  ad = {"lora": _random_adapters(model.arch, model.lora, seed=5, scale=0.05)}

  @jax.jit
  def grads(base, ad):
    g_lora = jax.grad(lambda t: objective(t, base, batch)[0])(ad)
    g_merge = jax.grad(lambda t: plain(lora_lib.merge(base, t["lora"], model.lora),
                                       base, batch)[0])(ad)
    return g_lora, g_merge
  g_lora, g_merge = grads(base, ad)
  for got, want in zip(jax.tree.leaves(g_lora), jax.tree.leaves(g_merge)):
    scale = float(np.abs(np.asarray(want)).max())
    assert scale > 0
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5 * scale, rtol=0)


def _oracle_sums(cfg, params, batch) -> np.ndarray:
  """Per-sequence completion log-prob sums of a plain forward, gathered in NumPy."""
  graphdef = build.graphdef(cfg.model.arch)
  logits = np.asarray(_logits(graphdef, params, batch["tokens"], batch["positions"],
                              batch.get("segment_ids"), batch.get("branch_ids")),
                      np.float64)
  top = logits.max(-1, keepdims=True)
  logp = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  sums = np.zeros(np.shape(batch["seq_last"])[-1])
  rows, slots = np.nonzero(np.asarray(batch["seq_ids"]) >= 0)
  for r, t in zip(rows, slots):
    sums[batch["seq_ids"][r, t]] += logp[r, batch["logit_pos"][r, t], batch["targets"][r, t]]
  return sums


def test_lora_dpo_run_references_the_base_and_trains_adapters_only(dpo_run):
  """The step's reference log-probs (logps/chosen - rewards/chosen / beta, from the
  logged metrics) equal a plain forward of the base (its bf16 values as held before
  the first step) on the same batches at every step -- the base, unchanged, with the
  adapters off -- while the policy moves away from it."""
  cfg, result, workdir, seen = dpo_run
  assert result.status == "done" and result.step == 3
  rows = [r for r in log_lib.read_metrics(os.path.join(workdir, "metrics.jsonl"))
          if r.get("split", "train") == "train" and "loss" in r]
  assert len(rows) == 3
  # The run's base (bf16) as copied before its first step, run as a plain f32 model.
  base = jax.tree.map(lambda x: np.asarray(x, np.float32), seen["base"])
  batches = stream.build_data(cfg, loop.objective_kind(cfg)).train
  beta = cfg.loss.hparams_dict()["beta"]
  for row in rows:
    batch = next(batches)
    valid = np.asarray(batch["example_valid"], bool)
    ref = _oracle_sums(cfg, base, batch)
    # Masked means over valid pairs of f32 sums of ~20 token log-probs.
    ref_chosen = row["logps/chosen"] - row["rewards/chosen"] / beta
    ref_rejected = row["logps/rejected"] - row["rewards/rejected"] / beta
    assert ref_chosen == pytest.approx(ref[0::2][valid].mean(), abs=1e-3)
    assert ref_rejected == pytest.approx(ref[1::2][valid].mean(), abs=1e-3)
  # Step 1 starts at B = 0, policy == reference (not bit-exact: the policy's forward
  # is fused for the backward pass); later steps have moved the policy.
  assert abs(rows[0]["rewards/chosen"]) < 1e-6 and abs(rows[0]["rewards/rejected"]) < 1e-6
  assert abs(rows[-1]["rewards/margins"]) > 1e-3
  assert any(np.any(np.asarray(v["b"]) != 0) for v in result.state.params["lora"].values())


def test_eval_scores_the_policy_with_adapters_and_the_reference_without(dpo_run):
  """The run's eval scorer (what eval.evaluate calls with the state's params and the
  reference): adapters -> the merged model's sums, the reference -> the base's."""
  cfg, result, _, seen = dpo_run
  run = seen["run"]
  batch = stream.build_data(cfg, loop.objective_kind(cfg)).train.peek()
  base = jax.tree.map(lambda x: np.asarray(x, np.float32), seen["base"])
  adapters = jax.tree.map(np.asarray, result.state.params["lora"])
  merged = _numpy_merge(base, adapters, cfg.model.lora.scale)
  np.testing.assert_allclose(run.score_fn(result.state.params, batch),
                             _oracle_sums(cfg, merged, batch), atol=1e-3, rtol=0)
  np.testing.assert_allclose(run.score_fn(run.eval_ref_params, batch),
                             _oracle_sums(cfg, base, batch), atol=1e-3, rtol=0)


def test_resume_against_another_base_names_both_fingerprints(dpo_run, tmp_path):
  """The run's checkpoints carry its base's fingerprint: restoring them for another
  base (e.g. model.hf_path's files replaced) is an error naming both."""
  from jaxalign import checkpoint as ckpt_lib  # pylint: disable=g-import-not-at-top
  cfg, _, workdir, _ = dpo_run
  data = stream.build_data(cfg, loop.objective_kind(cfg))
  model = build.build_model(cfg.model, data.vocab_size)
  optimizer = build.make_optimizer(cfg.optimizer, cfg.num_steps)
  mesh = mesh_lib.make_mesh(cfg.mesh)
  theirs = build.base_fingerprint(cfg.model, cfg.model.arch, cfg.seed)
  other = {"lora_base": "0123456789abcdef" * 2, "lora_base_source": "model.hf_path='/x'"}
  with ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"), save_every=1,
                             keep=10) as ck:
    restore = lambda base_id: loop._restore_or_init(  # noqa: E731
        cfg, model, optimizer, mesh, jax.random.key(0), ck, data.train, base_id)
    assert restore(theirs)[2] == 3  # its own base: resumes at step 3
    with pytest.raises(ValueError) as e:
      restore(other)
  msg = str(e.value)
  for part in (theirs["lora_base"], theirs["lora_base_source"], other["lora_base"],
               other["lora_base_source"]):
    assert part in msg
  # A file-backed base: its fingerprint follows the bytes of model.hf_path's files.
  (tmp_path / "model.safetensors").write_bytes(b"weights-1")
  hf_model = dataclasses.replace(cfg.model, hf_path=str(tmp_path))
  first = build.base_fingerprint(hf_model, cfg.model.arch, 0)
  (tmp_path / "model.safetensors").write_bytes(b"weights-2")
  assert build.base_fingerprint(hf_model, cfg.model.arch, 0) != first


def test_reward_model_trains_its_adapters_and_its_head():
  """A scalar-head (reward) model with LoRA trains {"lora", "head"} on a frozen
  {"model": base}; its loss equals the plain reward objective on the merged weights
  with the same head (<= 1e-5), and the adapters and the head's weights get
  gradients."""
  from experiments import _common  # pylint: disable=g-import-not-at-top
  c = _common.apply_variant(config_lib.base_config(), _common.experiment_arg("tiny"),
                            num_steps=2)
  c.loss, c.model.head = "bradley_terry", "scalar"
  c.model.update(d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, mlp_dim=64)
  c.model.lora.update(rank=2, alpha=4.0)
  cfg = config_lib.validate(c, NUM_DEVICES)
  data = stream.build_data(cfg, loop.objective_kind(cfg))
  model = build.build_model(cfg.model, data.vocab_size)
  shapes = jax.eval_shape(build.trainable_init(model), jax.random.key(0))
  assert set(shapes) == {"lora", "head"}
  assert set(build.trainable_axes(model)) == {"lora", "head"}
  rng = np.random.default_rng(0)
  base = {"model": _init(model.arch)[1]}
  trainable = {"lora": _random_adapters(model.arch, model.lora, seed=1, scale=0.1),
               "head": {"w": rng.normal(size=(model.arch.d_model,)).astype(np.float32),
                        "b": np.float32(0.3)}}
  forward = build.make_forward(model)
  objective = loop.make_objective(cfg, model, forward)
  plain = loop.make_objective(cfg, dataclasses.replace(model, lora=None), forward)
  batch = data.train.peek()
  loss, grads = jax.jit(jax.value_and_grad(lambda t: objective(t, base, batch)[0]))(
      trainable)
  merged = {"model": _numpy_merge(base["model"], trainable["lora"], model.lora.scale),
            "head": trainable["head"]}
  want = jax.jit(lambda p: plain(p, None, batch)[0])(merged)
  assert float(loss) == pytest.approx(float(want), abs=1e-5)
  assert set(grads) == {"lora", "head"}
  # (The head's bias cancels in chosen - rejected: its gradient is 0.)
  assert all(np.any(np.asarray(g) != 0)
             for g in jax.tree.leaves((grads["lora"], grads["head"]["w"])))


# --- export: PEFT layout and merged weights vs transformers --------------------------


_HF_SMALL = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma"])
def test_peft_and_merged_exports_match_transformers(arch, tmp_path):
  """peft.PeftModel on the transformers base with the exported adapters, and the merged
  HF directory in transformers, give jaxalign's LoRA logits (f32, <= 1e-4)."""
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  peft = pytest.importorskip("peft")
  config_cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
                "gemma": transformers.GemmaConfig}[arch]
  extra = {"gemma": dict(head_dim=8, hidden_act="gelu_pytorch_tanh")}.get(arch, {})
  torch.manual_seed(0)
  hf_model = transformers.AutoModelForCausalLM.from_config(config_cls(**_HF_SMALL, **extra))
  hf_model.float().eval().save_pretrained(tmp_path / "base", safe_serialization=True)
  from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
  cfg, params = hf.load_hf(str(tmp_path / "base"))
  lcfg = lora_lib.LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "o", "gate", "down"))
  ad = _random_adapters(cfg, lcfg, seed=11, scale=0.5)
  tok, pos = _tokens(cfg, t=16)
  graphdef = build.graphdef(cfg)
  want = np.asarray(_logits(graphdef, params, tok, pos, lora=lora_lib.Adapters(ad, lcfg)))
  assert np.abs(want - np.asarray(_logits(graphdef, params, tok, pos))).max() > 1e-2

  lora_lib.save_peft(str(tmp_path / "adapter"), cfg, ad, lcfg,
                     base_model=str(tmp_path / "base"))
  base_pt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base",
                                                              dtype=torch.float32)
  peft_model = peft.PeftModel.from_pretrained(base_pt, str(tmp_path / "adapter")).eval()
  with torch.no_grad():
    got = peft_model(torch.from_numpy(tok.astype(np.int64))).logits.float().numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)

  lora_lib.save_merged(str(tmp_path / "merged"), cfg, params, ad, lcfg, arch)
  merged_pt = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged",
                                                                dtype=torch.float32).eval()
  with torch.no_grad():
    got = merged_pt(torch.from_numpy(tok.astype(np.int64))).logits.float().numpy()
  np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


def test_save_peft_checks_shapes_and_targets(tmp_path):
  cfg = tm.TransformerConfig.tiny()
  lcfg = lora_lib.LoraConfig(rank=2, targets=("q",))
  ad = _lora_init(cfg, lcfg, jax.random.key(0))
  with pytest.raises(ValueError, match="targets"):
    lora_lib.save_peft(str(tmp_path), cfg, ad, lora_lib.LoraConfig(rank=2, targets=("k",)))
  with pytest.raises(ValueError, match="shapes"):
    lora_lib.save_peft(str(tmp_path), cfg, ad, lora_lib.LoraConfig(rank=3, targets=("q",)))


def test_smollm2_recipe_lora_variant_validates():
  from experiments.smollm2 import dpo  # pylint: disable=g-import-not-at-top
  # 4 devices: the recipe's 4-pair batches split over them (8 would not divide).
  cfg = config_lib.validate(dpo.get_config("path=hh.jsonl,hf_path=/ckpt,lora=16"), 4)
  assert (cfg.model.lora.rank, cfg.model.lora.alpha) == (16, 32.0)
  assert cfg.optimizer.learning_rate == 1e-4 and cfg.reference.kind == "initial"
  full = config_lib.validate(dpo.get_config("path=hh.jsonl,hf_path=/ckpt"), 4)
  assert not full.model.lora.enabled and full.optimizer.learning_rate == 1e-5
