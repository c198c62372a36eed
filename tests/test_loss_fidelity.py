"""Loss fidelity against TRL (issue 18): the NLL reduction, f-DPO's alpha convention.

Oracles: NumPy float64 transcriptions of each formula, and per-sequence log-prob sums
from independent plain causal forwards (no batch layout), in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _common
from jaxalign import config as config_lib
from jaxalign import losses
from jaxalign.data import batching
from jaxalign.data.examples import PairExample, SFTExample
from jaxalign.models import transformer as tr
from jaxalign.parallel import mesh as ml
from jaxalign.train import objectives as ob
from jaxalign.train import steps

CFG = tr.TransformerConfig.tiny(vocab_size=64, d_model=16, n_layers=1, n_heads=2,
                                n_kv_heads=1, mlp_dim=32)
BETA = 0.1


# --- loss level ----------------------------------------------------------------


def _pair_inputs(seed=0, n=6):
  rng = np.random.default_rng(seed)
  sums = -rng.uniform(1.0, 20.0, (4, n))
  tokens = rng.integers(1, 12, (2, n)).astype(np.float64)
  return sums, tokens


def test_nll_token_and_sequence_forms_match_numpy():
  """RPO's NLL term: "sequence" = mean_i(-s_i / n_i) (RPO paper), "token" =
  -sum_i s_i / sum_i n_i (TRL's cross-entropy over the batch's chosen tokens)."""
  sums, tokens = _pair_inputs()
  x = losses.PairwiseLogps(jnp.asarray(sums[0], jnp.float32),
                           jnp.asarray(sums[1], jnp.float32),
                           jnp.asarray(tokens[0]), jnp.asarray(tokens[1]))
  seq = float(jnp.mean(losses.nll(x)[0]))
  tok = float(jnp.mean(losses.nll(x, nll_reduction="token")[0]))
  want_seq = np.mean(-sums[0] / tokens[0])
  want_tok = -sums[0].sum() / tokens[0].sum()
  # f32 arithmetic on O(1) values against float64: rtol 1e-6.
  np.testing.assert_allclose(seq, want_seq, rtol=1e-6)
  np.testing.assert_allclose(tok, want_tok, rtol=1e-6)
  assert abs(want_seq - want_tok) > 1e-2  # the two forms really differ here
  # CPO / ORPO share the term: their "token" NLL metric averages to the same value.
  for fn in (losses.cpo, losses.orpo):
    metric = fn(x, nll_reduction="token")[1]["nll"]
    np.testing.assert_allclose(float(jnp.mean(metric)), want_tok, rtol=1e-6)


def test_sft_token_form_uses_the_given_batch_totals():
  """With nll_tokens / num_examples of a larger batch, this slice's losses sum to its
  share: sum_i(-s_i) / T * E / E_total = the slice's part of the batch token mean."""
  sums, tokens = _pair_inputs(seed=1)
  x = losses.SequenceLogps(jnp.asarray(sums[0], jnp.float32), jnp.asarray(tokens[0]),
                           nll_tokens=jnp.float32(100.0), num_examples=jnp.float32(10.0))
  got = float(jnp.sum(losses.sft(x, nll_reduction="token")[0])) / 10.0
  np.testing.assert_allclose(got, -sums[0].sum() / 100.0, rtol=1e-6)


def test_nll_reduction_errors_name_the_value():
  x = losses.SequenceLogps(jnp.array([-1.0]), jnp.array([1.0]))
  with pytest.raises(ValueError, match="nll_reduction='mean'"):
    losses.resolve("sft", {"nll_reduction": "mean"})
  # From the config: rejected at validation, naming the key and the choices.
  c = _common.apply_variant(config_lib.base_config(), _common.experiment_arg("tiny"),
                            num_steps=2)
  c.loss = "dpo:1.0,nll:0.5"
  c.loss_hparams.nll_reduction = "tokens"
  with pytest.raises(ValueError, match=r"config\.loss_hparams.*nll_reduction='tokens'"
                     r".*\('sequence', 'token'\)"):
    config_lib.validate(c, 8)
  c.loss_hparams.nll_reduction = "token"
  assert ("nll_reduction", "token") in config_lib.validate(c, 8).loss.hparams
  with pytest.raises(ValueError, match="length_power=0.0 has no meaning"):
    losses.sft(x, nll_reduction="token", length_power=0.0)


def _trl_alpha_logits(rho_w, rho_l, alpha_trl):
  """TRL >= 0.29 (dpo_trainer.py, alpha_divergence): f'(t) = (t^(a-1) - 1)/(a-1),
  scores t^(a-1)/(a-1) with t = exp(rho), logits = score_w - score_l."""
  coef = 1.0 / (alpha_trl - 1.0)
  return (np.exp((alpha_trl - 1.0) * rho_w) * coef
          - np.exp((alpha_trl - 1.0) * rho_l) * coef)


@pytest.mark.parametrize("alpha", [0.2, 0.5, 0.7])
def test_alpha_divergence_is_trl_at_one_minus_alpha(alpha):
  """jaxalign's f' = (1 - u^-alpha)/alpha (Wang et al., 2023) is TRL's
  (u^(a-1) - 1)/(a-1) at a = 1 - alpha."""
  rng = np.random.default_rng(2)
  pc, pr, rc, rr = rng.normal(-10.0, 2.0, (4, 8))
  x = losses.PairwiseLogps(*(jnp.asarray(v, jnp.float32) for v in (pc, pr)),
                           jnp.ones(8), jnp.ones(8),
                           *(jnp.asarray(v, jnp.float32) for v in (rc, rr)))
  got = losses.f_dpo(x, beta=BETA, divergence="alpha", alpha=alpha)[0]
  z = BETA * _trl_alpha_logits(pc - rc, pr - rr, 1.0 - alpha)
  want = np.logaddexp(0.0, -z)  # TRL's sigmoid loss, -log sigmoid(z)
  # |rho| <~ 6 keeps the exponentials O(1): f32 vs float64 at rtol 1e-5.
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)


# --- through the objective and the step ------------------------------------------


@functools.lru_cache(maxsize=None)
def _graphdef():
  out = []
  jax.eval_shape(lambda k: out.append(tr.init(CFG, k)[0]), jax.random.key(0))
  return out[0]


@functools.lru_cache(maxsize=None)
def _params(seed):
  return jax.device_get(jax.jit(lambda k: tr.init(CFG, k)[1])(jax.random.key(seed)))


@jax.jit
def _plain_logits(params, tokens_BxT):
  positions = jnp.broadcast_to(jnp.arange(tokens_BxT.shape[1]), tokens_BxT.shape)
  return tr.logits(_graphdef(), params, tokens_BxT, positions)


def _seq_logp(params, prompt, completion):
  """Sum of completion log-probs from a plain causal forward (float64 numpy)."""
  seq = np.concatenate([prompt, completion])
  padded = np.zeros((1, 16), np.int32)
  padded[0, :len(seq)] = seq
  logits = np.asarray(_plain_logits(params, padded), np.float64)[0]
  m = logits.max(-1, keepdims=True)
  logp = logits - (np.log(np.exp(logits - m).sum(-1, keepdims=True)) + m)
  return sum(logp[t - 1, seq[t]] for t in range(len(prompt), len(seq)))


def _pairs(n, seed):
  rng = np.random.default_rng(seed)
  tok = lambda k: rng.integers(1, CFG.vocab_size, k).astype(np.int32)
  # Chosen lengths 1..8: the token mean and the mean of sequence means differ.
  return [PairExample(tok(rng.integers(2, 5)), tok(rng.integers(1, 9)),
                      tok(rng.integers(2, 7))) for _ in range(n)]


def _layout(n):
  return batching.LayoutConfig(kind="padded", buckets=(16,), examples_per_batch=n)


def _objective(loss, hparams, kind="pairwise", needs_reference=True):
  fn, _ = losses.resolve(loss, hparams)
  return ob.make_objective(kind, loss_fn=fn, forward_fn=ob.model_forward_fn(_graphdef()),
                           needs_reference=needs_reference, chunk_size=16)


RPO_TOKEN = ([("dpo", 1.0), ("nll", 0.5)], {"beta": BETA, "nll_reduction": "token"})


def test_rpo_token_objective_matches_numpy():
  """DPO + 0.5 * batch token-mean NLL, over 5 pairs in 6 slots (one empty)."""
  examples = _pairs(5, seed=4)
  policy, ref = _params(1), _params(2)
  batch = batching.make_batch(examples, _layout(6))
  loss, metrics = jax.jit(_objective(*RPO_TOKEN))(policy, ref, batch)
  pc = np.array([_seq_logp(policy, e.prompt, e.chosen) for e in examples])
  pr = np.array([_seq_logp(policy, e.prompt, e.rejected) for e in examples])
  rc = np.array([_seq_logp(ref, e.prompt, e.chosen) for e in examples])
  rr = np.array([_seq_logp(ref, e.prompt, e.rejected) for e in examples])
  n_w = np.array([len(e.chosen) for e in examples])
  dpo = np.mean(np.logaddexp(0.0, -BETA * ((pc - rc) - (pr - rr))))
  token_nll = -pc.sum() / n_w.sum()
  # f32 forward vs float64 oracle: rtol 1e-5.
  np.testing.assert_allclose(float(metrics["nll"]), token_nll, rtol=1e-5)
  np.testing.assert_allclose(float(loss), dpo + 0.5 * token_nll, rtol=1e-5)
  # The sequence form would miss the tolerance above by over 20x: the test tells
  # the two apart (a random model's token log-probs are all near -log V).
  assert abs(token_nll - np.mean(-pc / n_w)) > 20 * 1e-5 * abs(token_nll)


def test_sft_token_objective_matches_numpy():
  rng = np.random.default_rng(5)
  tok = lambda k: rng.integers(1, CFG.vocab_size, k).astype(np.int32)
  examples = [SFTExample(tok(3), tok(k)) for k in (1, 2, 7, 4)]
  policy = _params(1)
  batch = batching.make_batch(examples, _layout(4))
  objective = _objective("sft", {"nll_reduction": "token"}, kind="sft",
                         needs_reference=False)
  loss, _ = jax.jit(objective)(policy, None, batch)
  sums = np.array([_seq_logp(policy, e.prompt, e.completion) for e in examples])
  np.testing.assert_allclose(float(loss), -sums.sum() / 14.0, rtol=1e-5)


def _grad_step(mesh, batch, microbatched=False):
  shs = ml.param_shardings(tr.logical_axes(CFG), mesh, ml.DEFAULT_RULES,
                           jax.eval_shape(lambda k: tr.init(CFG, k)[1], jax.random.key(0)))
  params = jax.device_put(_params(1), shs)
  ref = jax.device_put(_params(2), shs)
  step = steps.make_grad_step(objective=_objective(*RPO_TOKEN), mesh=mesh,
                              param_shardings=shs, ref_shardings=shs,
                              batch_ndims=steps.batch_signature(batch),
                              microbatched=microbatched)
  loss, metrics, grads = step(params, ref, batch)
  return float(loss), float(metrics["nll"]), jax.device_get(grads)


@pytest.fixture(scope="module")
def full_batch_run():
  examples = _pairs(7, seed=6)  # 7 pairs in 8 slots
  mesh = ml.make_mesh(ml.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  return examples, _grad_step(mesh, batching.make_batch(examples, _layout(8)))


def _assert_same(got, want):
  # Same f32 sums in another order: rtol 1e-5.
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  np.testing.assert_allclose(got[1], want[1], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               got[2], want[2])


def test_token_nll_with_two_microbatches_equals_one_batch(full_batch_run):
  """The token count is the whole batch's: micro-batches of unequal token counts
  (a per-micro-batch token mean would weigh them wrongly) give the same step."""
  examples, want = full_batch_run
  micro = steps.stack_microbatches(
      [batching.make_batch(examples[:4], _layout(4)),
       batching.make_batch(examples[4:], _layout(4))])
  mesh = ml.make_mesh(ml.MeshConfig(data=1, fsdp=1, tensor=1), jax.devices()[:1])
  _assert_same(_grad_step(mesh, micro, microbatched=True), want)


def test_token_nll_sharded_over_8_devices_equals_single_device(full_batch_run):
  examples, want = full_batch_run
  mesh = ml.make_mesh(ml.MeshConfig(data=4, fsdp=2, tensor=1))
  _assert_same(_grad_step(mesh, batching.make_batch(examples, _layout(8))), want)
