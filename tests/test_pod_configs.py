"""The pod-scale configs (experiments/pod/*.py) validate for their pod and are the
model, the placement and the memory their docstrings claim; the HH recipe's stage
configs (experiments/hh/recipe.py) validate and its held-out split is sound.

Independent figures: Meta's model card gives Llama-3 8B as 8.03B parameters; the
closed-form count of a Llama block (attention 2*D*H*K + 2*D*KV*K, SwiGLU 3*D*F, two
norms) must equal the `jax.eval_shape` count exactly. Per-device state bytes come from
the PartitionSpecs the mesh rules give each parameter (nothing is allocated) and are
checked against the docstrings' hand arithmetic (20 B/param for DPO, 40 for PPO).
"""

import glob
import importlib.util
import math
import os
import sys

import jax
import numpy as np
import pytest

from jaxalign import config as config_lib
from jaxalign.models import transformer
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POD_CONFIGS = sorted(os.path.basename(p)[:-3] for p in
                     glob.glob(os.path.join(ROOT, "experiments", "pod", "*.py"))
                     if not os.path.basename(p).startswith("_"))

LLAMA3_8B_MODEL_CARD = 8.03e9  # "8.03B params", meta-llama/Meta-Llama-3-8B
# Trained-model bytes per parameter: f32 master params, f32 grads, AdamW m and v.
TRAINED_BYTES = 4 + 4 + 8
FROZEN_BYTES = 4  # f32 reference / reward model


def _load(name: str):
  spec = importlib.util.spec_from_file_location(
      f"pod_{name}", os.path.join(ROOT, "experiments", "pod", f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _validate(module, num_devices: int):
  c = module.get_config()
  if "rl" in c:
    cfg, rl = config_lib.validate_rl(c, num_devices)
    return cfg, rl
  return config_lib.validate(c, num_devices), None


@pytest.fixture(scope="module")
def validated():
  out = {}
  for name in POD_CONFIGS:
    module = _load(name)
    out[name] = (module, *_validate(module, module.NUM_DEVICES))
  return out


@pytest.fixture(scope="module")
def llama_shapes(validated):
  """eval_shape of the (shared) 8B architecture: one abstract init for all configs."""
  # Remat, compute dtype and attention chunking change no parameter.
  archs = {v[1].model.arch.replace(remat="none", dtype="float32", attention_chunk=None)
           for v in validated.values()}
  assert len(archs) == 1, "every pod config uses the same Llama-3 8B shape"
  arch, = archs
  shapes = jax.eval_shape(lambda k: transformer.init(arch, k)[1], jax.random.key(0))
  return arch, shapes


def test_there_are_dpo_and_ppo_pod_configs():
  assert {"llama3_8b_dpo_v5p64", "llama3_8b_dpo_8xh100",
          "llama3_8b_ppo_v5p64"} <= set(POD_CONFIGS)


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_validates_for_its_pod_and_not_for_another(validated, name):
  module, cfg, _ = validated[name]
  assert "python -m jaxalign.main --config experiments/pod/" in module.__doc__
  sizes = cfg.mesh.axis_sizes(module.NUM_DEVICES)
  assert math.prod(sizes) == module.NUM_DEVICES
  assert cfg.model.arch.dtype == "bfloat16" and cfg.model.arch.remat != "none"
  other = 16 if module.NUM_DEVICES != 16 else 8
  with pytest.raises(ValueError, match=r"mesh"):
    _validate(module, other)


def test_llama3_8b_parameter_count(llama_shapes):
  arch, shapes = llama_shapes
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  d, v, f, n = arch.d_model, arch.vocab_size, arch.mlp_dim, arch.n_layers
  h, kv, k = arch.n_heads, arch.n_kv_heads, arch.head_dim
  per_layer = 2 * d * h * k + 2 * d * kv * k + 3 * d * f + 2 * d
  closed_form = 2 * v * d + n * per_layer + d  # embed + untied lm_head + final norm
  assert count == closed_form
  # The model card rounds to 0.01B: |count - 8.03e9| < 0.005e9.
  assert abs(count - LLAMA3_8B_MODEL_CARD) < 0.005e9, count


def _bytes_per_device(shapes, axes, rules, axis_sizes: dict[str, int],
                      bytes_per_param: int) -> int:
  """Bytes one device holds of a model stored at ``bytes_per_param`` per element."""
  specs = mesh_lib.param_specs(axes, rules)  # no mesh: the rules as written
  spec_leaves = jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  total = 0
  for sds, spec in zip(jax.tree.leaves(shapes), spec_leaves):
    local = list(sds.shape)
    for i, entry in enumerate(spec):
      names = () if entry is None else (entry,) if isinstance(entry, str) else entry
      div = math.prod(axis_sizes[a] for a in names)
      assert local[i] % div == 0, (sds.shape, spec)  # placed as written, not replicated
      local[i] //= div
    total += math.prod(local) * bytes_per_param
  return total


@pytest.mark.parametrize("name", POD_CONFIGS)
def test_model_state_per_device_matches_the_docstring(validated, llama_shapes, name):
  module, cfg, rl = validated[name]
  _, shapes = llama_shapes
  axes = transformer.logical_axes(cfg.model.arch)
  sizes = dict(zip(mesh_lib.MESH_AXES, cfg.mesh.axis_sizes(module.NUM_DEVICES)))
  assert cfg.mesh.reference_placement == "policy"
  ref_rules = mesh_lib.reference_rules(cfg.mesh.rules, cfg.mesh.reference_placement)
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  # The optimizer's own state: AdamW moments mirror the f32 params (8 B/param).
  opt = build.make_optimizer(cfg.optimizer, cfg.num_steps)
  f32 = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, np.float32), shapes)
  opt_bytes = sum(x.size * x.dtype.itemsize
                  for x in jax.tree.leaves(jax.eval_shape(opt.init, f32)))
  assert abs(opt_bytes - 8 * count) < 1024

  trained = 2 if rl is not None and rl.uses_value else 1  # policy (+ value)
  frozen = 2 if rl is not None else 1  # reference (+ reward)
  got = (trained * _bytes_per_device(shapes, axes, cfg.mesh.rules, sizes, TRAINED_BYTES)
         + frozen * _bytes_per_device(shapes, axes, ref_rules, sizes, FROZEN_BYTES))
  per_param = trained * TRAINED_BYTES + frozen * FROZEN_BYTES
  assert per_param == (40 if rl is not None else 20)  # the docstrings' arithmetic
  ideal = per_param * count / module.NUM_DEVICES
  # Only the norms (0.03% of the bytes) stay replicated: within 0.1% of ideal.
  assert ideal <= got < 1.001 * ideal, (got, ideal)
  # The docstrings' figures: 5.0 GB (DPO v5p-64), 20.1 GB (DPO 8xH100), 10.0 GB (PPO).
  stated = {"llama3_8b_dpo_v5p64": 5.0e9, "llama3_8b_dpo_8xh100": 20.1e9,
            "llama3_8b_ppo_v5p64": 10.0e9}[name]
  assert abs(got - stated) < 0.06e9, got
  # With the docstrings' activation estimates (<= 16 GB) it leaves room in HBM.
  assert got + 16e9 < 0.5 * module.HBM_BYTES_PER_DEVICE


def test_global_batch_splits_over_data_parallel_devices(validated):
  for name, (module, cfg, rl) in validated.items():
    dp = math.prod(cfg.mesh.axis_sizes(module.NUM_DEVICES)[:2])
    assert cfg.data.batch_size % dp == 0, name
    assert cfg.data.max_length <= cfg.data.buckets[-1], name
    if rl is not None:
      assert cfg.data.batch_size * rl.group_size % (rl.num_minibatches * dp) == 0


# ----------------------------------------------------------------------------
# experiments/hh/recipe.py: stage configs and the seeded 80/20 split.


def _recipe():
  spec = importlib.util.spec_from_file_location(
      "hh_recipe", os.path.join(ROOT, "experiments", "hh", "recipe.py"))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("size", ["tiny", "small"])
def test_recipe_stage_configs_validate(tmp_path, size):
  recipe = _recipe()
  for stage in recipe.STAGES:
    c = recipe.get_config(f"stage={stage},root={tmp_path},size={size}")
    if stage == "ppo":
      cfg, rl = config_lib.validate_rl(c, jax.device_count())
      assert rl.reward_path == str(tmp_path / "reward")
    else:
      cfg = config_lib.validate(c, jax.device_count())
      assert cfg.data.eval_path == str(tmp_path / "data" / "eval.jsonl.gz")
    assert cfg.data.tokenizer == str(tmp_path / "data" / "spm.model")
    # The reward model the PPO stage rebuilds from model.* has the SFT export's shape.
    assert cfg.model.arch.d_model == recipe.SIZES[size]["arch"]["d_model"]
    assert (cfg.model.hf_path == "") == (stage == "sft")
  with pytest.raises(ValueError, match="root="):
    recipe.get_config("stage=sft")
  with pytest.raises(ValueError, match="stage="):
    recipe.get_config(f"stage=kto,root={tmp_path}")


def test_recipe_split_is_seeded_disjoint_and_order_free(tmp_path):
  import gzip
  import json
  recipe = _recipe()
  records = [json.dumps({"chosen": f"\n\nHuman: q{i}\n\nAssistant: a",
                         "rejected": f"\n\nHuman: q{i}\n\nAssistant: b"})
             for i in range(400)]

  def split(lines, seed, name):
    src = tmp_path / f"{name}.jsonl"
    src.write_text("\n".join(lines) + "\n")
    tr, ev = tmp_path / f"{name}-tr.jsonl.gz", tmp_path / f"{name}-ev.jsonl.gz"
    n_tr, n_ev = recipe.split_pairs(str(src), str(tr), str(ev), seed=seed)
    read = lambda p: gzip.open(p, "rt").read().splitlines()  # noqa: E731
    assert (len(read(tr)), len(read(ev))) == (n_tr, n_ev)
    return set(read(tr)), set(read(ev))

  train, held = split(records, 0, "a")
  assert not train & held and train | held == set(records)
  # Binomial(400, 0.2): mean 80, sd 8; 5 sd either side.
  assert 40 <= len(held) <= 120, len(held)
  assert split(records[::-1], 0, "b") == (train, held)  # the order does not matter
  assert split(records, 1, "c")[1] != held  # the seed does
  bad = tmp_path / "bad.jsonl"
  bad.write_text(records[0] + "\n{not json\n")
  with pytest.raises(ValueError, match=r"bad.jsonl:2"):
    recipe.split_pairs(str(bad), str(tmp_path / "x.gz"), str(tmp_path / "y.gz"))
