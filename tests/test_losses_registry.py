"""Registry: lookup, hyperparameter validation, combinations, vmap over hparams."""

import doctest
import importlib
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxalign import losses as L

N = 4


def _inputs(kind):
  rng = np.random.default_rng(0)
  f = lambda *shape: jnp.asarray(rng.uniform(0.2, 2.0, shape), jnp.float32)
  n = jnp.asarray(rng.integers(1, 6, N), jnp.float32)
  if kind == "pairwise":
    return L.PairwiseLogps(-f(N) * n, -f(N) * n, n, n + 1, -f(N) * n, -f(N) * n)
  if kind == "sft":
    return L.SequenceLogps(-f(N) * n, n)
  if kind == "reward":
    return L.RewardPair(f(N), f(N), f(N))
  if kind == "unpaired":
    return L.UnpairedLogps(-f(N), -f(N), n, jnp.array([1.0, 0, 1, 0]), -f(N), -f(N))
  if kind == "ranked":
    k = jnp.asarray(rng.integers(1, 6, (N, 3)), jnp.float32)
    return L.RankedLogps(-f(N, 3) * k, k, f(N, 3))
  raise AssertionError(kind)


# A numeric hyperparameter per loss that changes its value (beta where it has one).
SWEEP = {"sft": "length_power", "nll": "length_power", "rrhf": "length_penalty",
         "bradley_terry": "center_coef"}


@pytest.mark.parametrize("name", L.list_losses())
def test_vmap_over_hyperparameter(name):
  spec = L.get_loss(name)
  inputs = _inputs(spec.input_kind)
  hp = SWEEP.get(name, "beta")
  assert hp in spec.defaults
  values = jnp.array([0.3, 0.5, 0.9])
  swept, metrics = jax.jit(jax.vmap(lambda v: spec.fn(inputs, **{hp: v})))(values)
  assert swept.shape == (3, N)
  for i, v in enumerate([0.3, 0.5, 0.9]):
    single, _ = spec.fn(inputs, **{hp: v})
    # Same program batched vs unbatched, f32: rtol 1e-5.
    np.testing.assert_allclose(swept[i], single, rtol=1e-5, atol=1e-6)
  assert not np.allclose(swept[0], swept[2]), f"{hp} does not affect {name}"
  for key, value in metrics.items():
    assert value.shape[0] == 3, key


@pytest.mark.parametrize("name", [n for n in L.list_losses()
                                  if L.get_loss(n).input_kind != "pairwise"])
def test_non_pairwise_losses_finite_at_extremes(name):
  spec = L.get_loss(name)
  x = _inputs(spec.input_kind)
  extreme = jax.tree.map(lambda a: a, x)
  field = {"sft": "logps", "reward": "chosen", "unpaired": "policy",
           "ranked": "logps"}[spec.input_kind]
  base = getattr(x, field)
  for big in (-1e4, -1e-9):
    value = jnp.full_like(base, big)
    def total(v):
      return jnp.sum(spec.fn(extreme.replace(**{field: v}))[0])
    val, g = jax.value_and_grad(total)(value)
    assert np.isfinite(float(val)) and np.all(np.isfinite(g)), (name, big)


def test_registry_specs():
  assert L.get_loss("dpo").needs_reference
  assert not L.get_loss("simpo").needs_reference
  assert L.get_loss("kto").input_kind == "unpaired"
  assert L.get_loss("rrhf").input_kind == "ranked"
  assert L.get_loss("dpo").defaults == {"beta": 0.1, "label_smoothing": 0.0,
                                        "reference_free": False}
  for name in L.list_losses():
    spec = L.get_loss(name)
    assert spec.input_kind in L.INPUT_KINDS
    assert spec.fn.__doc__ and spec.name == name
    params = inspect.signature(spec.fn).parameters
    assert set(spec.defaults) == {p for p in params if p != "inputs"}


def test_unknown_names_are_clear_errors():
  with pytest.raises(ValueError, match=r"Unknown loss 'dpoo'.*Valid loss names:.*dpo"):
    L.get_loss("dpoo")
  with pytest.raises(ValueError, match=r"unknown hyperparameter.*'betta'.*'dpo'.*"
                     r"Valid hyperparameters:.*'beta'"):
    L.resolve("dpo", {"betta": 0.1})
  with pytest.raises(ValueError, match="different input kinds"):
    L.resolve([("dpo", 1.0), ("kto", 1.0)])
  with pytest.raises(ValueError, match="'gamma_x'"):
    L.resolve([("dpo", 1.0), ("nll", 1.0)], {"gamma_x": 1.0})
  with pytest.raises(ValueError, match=r"part 'nll'.*'beta'"):
    L.resolve([("dpo", 1.0), ("nll", 1.0)], {"nll": {"beta": 0.1}})
  with pytest.raises(ValueError, match="already exists"):
    L.register_loss("dpo", L.dpo, input_kind="pairwise", needs_reference=True)
  with pytest.raises(ValueError, match="input_kind"):
    L.register_loss("x", L.dpo, input_kind="pairs", needs_reference=True)


def test_resolve_binds_and_combines():
  x = _inputs("pairwise")
  fn, spec = L.resolve("dpo", {"beta": 0.3})
  assert spec is L.get_loss("dpo")
  np.testing.assert_allclose(jax.jit(fn)(x)[0], L.dpo(x, beta=0.3)[0])
  # RPO-style DPO + 0.5 * NLL(chosen); beta goes to DPO only.
  fn, spec = L.resolve([("dpo", 1.0), ("nll", 0.5)], {"beta": 0.3})
  assert spec.name == "dpo+nll" and spec.needs_reference
  losses, metrics = jax.jit(fn)(x)
  expected = L.dpo(x, beta=0.3)[0] + 0.5 * (-x.policy_chosen / x.chosen_tokens)
  np.testing.assert_allclose(losses, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["loss/nll"], -x.policy_chosen / x.chosen_tokens,
                             rtol=1e-6)
  assert "rewards/chosen" in metrics and "nll" in metrics
  # A sweep over beta of the combination runs as one program.
  swept, _ = jax.jit(jax.vmap(lambda b: fn(x, beta=b)))(jnp.array([0.3, 0.7]))
  np.testing.assert_allclose(swept[0], expected, rtol=1e-5)
  np.testing.assert_allclose(
      swept[1], L.dpo(x, beta=0.7)[0] + 0.5 * (-x.policy_chosen / x.chosen_tokens),
      rtol=1e-5)
  # Per-part hyperparameters and overrides at call time (e.g. under vmap).
  fn, _ = L.resolve([("dpo", 1.0), ("simpo", 2.0)],
                    {"dpo": {"beta": 0.3}, "simpo": {"beta": 2.5, "gamma": 0.0}})
  losses, metrics = fn(x)
  np.testing.assert_allclose(
      losses, L.dpo(x, beta=0.3)[0] + 2.0 * L.simpo(x, beta=2.5, gamma=0.0)[0],
      rtol=1e-6)
  assert "simpo/rewards/chosen" in metrics
  # reference_free=True lifts the reference requirement of the bound loss.
  assert not L.resolve("dpo", {"reference_free": True})[1].needs_reference
  assert L.get_loss("dpo").needs_reference
  assert not L.resolve([("ipo", 1.0), ("nll", 1.0)],
                       {"reference_free": True})[1].needs_reference
  assert L.resolve([("ipo", 1.0), ("nll", 1.0)])[1].needs_reference


def test_register_custom_loss():
  def my_loss(inputs, *, beta: float = 1.0):
    """Squared margin."""
    return jnp.square(beta * (inputs.policy_chosen - inputs.policy_rejected)), {}
  L.register_loss("test_only_square", my_loss, input_kind="pairwise",
                  needs_reference=False, overwrite=True)
  try:
    fn, spec = L.resolve("test_only_square", {"beta": 2.0})
    x = _inputs("pairwise")
    np.testing.assert_allclose(
        fn(x)[0], 4.0 * (x.policy_chosen - x.policy_rejected) ** 2, rtol=1e-6)
    assert spec.defaults == {"beta": 1.0}
  finally:
    L.unregister_loss("test_only_square")
  with pytest.raises(ValueError, match="Unknown loss"):
    L.get_loss("test_only_square")


@pytest.mark.parametrize("module", ["_sft", "_reward", "_preference", "_math", "_kto",
                                    "_ranking", "_ppo"])
def test_docstring_examples(module):
  mod = importlib.import_module(f"jaxalign.losses.{module}")
  result = doctest.testmod(mod, optionflags=doctest.ELLIPSIS)
  assert result.failed == 0 and result.attempted > 0


PREFERENCE_KEYS = {"rewards/chosen", "rewards/rejected", "rewards/margins",
                   "rewards/accuracies", "logps/chosen", "logps/rejected"}


@pytest.mark.parametrize("name", L.list_losses())
def test_metric_namespace(name):
  spec = L.get_loss(name)
  _, metrics = spec.fn(_inputs(spec.input_kind))
  if spec.input_kind in ("pairwise", "ranked", "reward") and name != "nll":
    assert PREFERENCE_KEYS <= set(metrics), sorted(metrics)
  if spec.input_kind == "unpaired":
    assert {"rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected",
            "kl"} <= set(metrics)
  for key, value in metrics.items():
    assert value.shape in ((N,), ()), (key, value.shape)
    if value.shape == ():
      assert name == "kto" and key == "kl"  # the one documented scalar metric


@pytest.mark.parametrize("name", ["dpo", "aot", "aot_unpaired", "kto", "rrhf"])
def test_sharded_batch_equals_unsharded(name):
  # Batch-level operations (AOT's sort, KTO's KL mean) must see the global batch
  # when the examples are sharded over 8 devices.
  spec = L.get_loss(name)
  rng = np.random.default_rng(5)
  n = 8
  if spec.input_kind == "pairwise":
    x = L.PairwiseLogps(*(jnp.asarray(-rng.uniform(1, 9, n), jnp.float32)
                          for _ in range(2)), jnp.full((n,), 3.0), jnp.full((n,), 4.0),
                        *(jnp.asarray(-rng.uniform(1, 9, n), jnp.float32)
                          for _ in range(2)))
  elif spec.input_kind == "unpaired":
    x = L.UnpairedLogps(*(jnp.asarray(-rng.uniform(1, 9, n), jnp.float32)
                          for _ in range(2)), jnp.full((n,), 3.0),
                        jnp.asarray(rng.uniform(size=n) < 0.5, jnp.float32),
                        *(jnp.asarray(-rng.uniform(1, 9, n), jnp.float32)
                          for _ in range(2)))
  else:
    x = L.RankedLogps(jnp.asarray(-rng.uniform(1, 9, (n, 3)), jnp.float32),
                      jnp.full((n, 3), 2.0),
                      jnp.asarray(rng.normal(size=(n, 3)), jnp.float32))
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  x_sharded = jax.device_put(x, sharding)
  fn = jax.jit(lambda x: spec.fn(x, beta=0.5) if "beta" in spec.defaults
               else spec.fn(x))
  expected, _ = fn(x)
  got, _ = fn(x_sharded)
  # Same arithmetic, different partitioning: f32 rtol 1e-6.
  np.testing.assert_allclose(got, expected, rtol=1e-6)
