"""Config validation: every impossible config is a ValueError naming the key."""

import dataclasses
import re

import ml_collections
import pytest

from experiments import _common
from jaxalign import config as config_lib

NUM_DEVICES = 8


def _tiny() -> ml_collections.ConfigDict:
  c = config_lib.base_config()
  return _common.apply_variant(c, _common.experiment_arg("tiny"), num_steps=20)


def _raises(c, *patterns):
  with pytest.raises(ValueError) as info:
    config_lib.validate(c, NUM_DEVICES)
  for p in patterns:
    assert re.search(p, str(info.value)), str(info.value)
  return str(info.value)


def test_valid_tiny_config_is_typed_and_frozen():
  cfg = config_lib.validate(_tiny(), NUM_DEVICES)
  assert cfg.num_steps == 20
  # Synthetic data cannot be bounded by the config: () = derived from the examples.
  assert cfg.data.buckets == () and cfg.data.layout == "prefix_shared"
  assert cfg.loss.terms == (("dpo", 1.0),)
  assert cfg.loss.input_kind == "pairwise" and cfg.loss.needs_reference
  assert cfg.model.arch.d_model == 64
  assert cfg.mesh.axis_sizes(NUM_DEVICES) == (1, 8, 1)
  with pytest.raises(dataclasses.FrozenInstanceError):
    cfg.num_steps = 3  # type: ignore[misc]


@pytest.mark.parametrize("section,key", [("", "num_stepz"), ("data", "bach_size"),
                                         ("optimizer", "lr"), ("data.task", "vocab"),
                                         ("debug", "sigterm")])
def test_unknown_key_is_named(section, key):
  c = _tiny()
  target = c
  for part in filter(None, section.split(".")):
    target = target[part]
  target[key] = 1
  full = f"{section}.{key}" if section else key
  _raises(c, re.escape(f"config.{full}"), "unknown key")


def test_unknown_model_key_is_named():
  c = _tiny()
  c.model.n_layer = 2
  _raises(c, r"config\.model\.n_layer", "unknown key")


def test_bad_type_and_choice():
  c = _tiny().to_dict()  # a plain dict: ConfigDict itself would refuse the type
  c["num_steps"] = "10"
  _raises(c, r"config\.num_steps", "int")
  c = _tiny()
  c.data.layout = "zigzag"
  _raises(c, r"config\.data\.layout", "zigzag")
  c = _tiny()
  c.checkpoint.keep = 0
  _raises(c, r"config\.checkpoint\.keep", ">= 1")


def test_mesh_larger_than_devices():
  c = _tiny()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 4, 4, 1
  _raises(c, r"mesh", "16", "8 are available")


def test_mesh_axis_size_invalid():
  c = _tiny()
  c.mesh.tensor = 0
  _raises(c, r"mesh\.tensor")


def test_batch_not_divisible_by_data_parallel_size():
  c = _tiny()
  c.data.batch_size = 12  # fsdp = 8 devices
  _raises(c, r"config\.data\.batch_size", "not divisible", "8")
  c = _tiny()
  c.eval.batch_size = 4
  _raises(c, r"config\.eval\.batch_size", "not divisible")


def test_batch_divisible_with_tensor_parallel_mesh():
  c = _tiny()
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, 4, 2
  c.data.batch_size = 12  # 12 % (1 * 4) == 0
  cfg = config_lib.validate(c, NUM_DEVICES)
  assert cfg.mesh.axis_sizes(NUM_DEVICES) == (1, 4, 2)


def test_loss_needing_reference_without_one():
  c = _tiny()
  c.loss = "kto"
  c.reference.kind = "none"
  msg = _raises(c, r"config\.reference\.kind", "needs a reference")
  assert "kto" in msg
  # A reference-free loss is fine without one.
  c = _tiny()
  c.loss = "simpo"
  c.reference.kind = "none"
  assert not config_lib.validate(c, NUM_DEVICES).loss.needs_reference


def test_weighted_loss_list_and_cli_string_agree():
  c = _tiny()
  c.loss = [("dpo", 1.0), ("nll", 0.2)]
  a = config_lib.validate(c, NUM_DEVICES)
  c = _tiny()
  c.loss = "dpo:1.0, nll:0.2"
  b = config_lib.validate(c, NUM_DEVICES)
  assert a.loss.terms == b.loss.terms == (("dpo", 1.0), ("nll", 0.2))
  assert a.loss.needs_reference  # any part needing one
  assert config_lib.loss_arg(a.loss.terms) == [("dpo", 1.0), ("nll", 0.2)]
  assert config_lib.loss_arg((("ipo", 1.0),)) == "ipo"


def test_unknown_loss_and_hparam():
  c = _tiny()
  c.loss = "dpoo"
  _raises(c, r"config\.loss", "dpoo")
  c = _tiny()
  c.loss_hparams.betta = 0.3
  _raises(c, r"config\.loss", "betta")
  c = _tiny()
  c.loss = [("dpo", 1.0), ("kto", 1.0)]  # different input kinds
  _raises(c, r"config\.loss", "input kinds")


def test_head_must_match_loss():
  c = _tiny()
  c.model.head = "scalar"  # with the DPO loss
  _raises(c, r"config\.model\.head")
  c = _tiny()
  c.loss = "bradley_terry"
  c.reference.kind = "none"
  _raises(c, r"config\.model\.head")
  c.model.head = "scalar"
  assert config_lib.validate(c, NUM_DEVICES).loss.input_kind == "reward"


def test_packed_layout_needs_rows():
  c = _tiny()
  c.data.layout = "packed"
  _raises(c, r"config\.data\.rows_per_batch")
  c.data.rows_per_batch = 8
  assert config_lib.validate(c, NUM_DEVICES).data.layout == "packed"


def test_file_source_needs_path_and_hf_reference_needs_path():
  c = _tiny()
  c.data.source = "file"
  _raises(c, r"config\.data\.path")
  c = _tiny()
  c.reference.kind = "hf"
  _raises(c, r"config\.reference\.hf_path")


def test_transformer_error_is_reported_under_model():
  c = _tiny()
  c.model.n_heads = 3  # 64 % 3 != 0
  _raises(c, r"config\.model", "n_heads")


def test_experiment_arg_parsing():
  a = _common.experiment_arg("hh,path=/x.jsonl,steps=7,runlocal")
  assert (a.variant, a.path, a.steps, a.runlocal) == ("hh", "/x.jsonl", 7, True)
  with pytest.raises(ValueError, match="path="):
    _common.experiment_arg("hh")
  with pytest.raises(ValueError, match="stepz"):
    _common.experiment_arg("stepz=3")
  with pytest.raises(ValueError, match="variant"):
    _common.experiment_arg("big")


def test_micro_batches_must_divide_batch_by_data_parallel_size():
  c = _tiny()  # batch 16 on fsdp=8
  c.data.micro_batches = 2  # 16 % (2 * 8) == 0
  assert config_lib.validate(c, NUM_DEVICES).data.micro_batches == 2
  c.data.micro_batches = 4  # 16 % (4 * 8) != 0
  _raises(c, r"config\.data\.micro_batches", "16", "4 x the data-parallel size 8",
          "multiple of 32")
  c.data.micro_batches = 0
  _raises(c, r"config\.data\.micro_batches", ">= 1")
  raw = c.to_dict()  # a plain dict: ConfigDict itself would refuse the float
  raw["data"]["micro_batches"] = 1.5
  _raises(raw, r"config\.data\.micro_batches", "expected an int")


def test_logprob_chunk_is_a_positive_model_key():
  c = _tiny()
  assert config_lib.validate(c, NUM_DEVICES).model.logprob_chunk == 128
  c.model.logprob_chunk = 64
  assert config_lib.validate(c, NUM_DEVICES).model.logprob_chunk == 64
  c.model.logprob_chunk = 0
  _raises(c, r"config\.model\.logprob_chunk", ">= 1")
  raw = c.to_dict()
  raw["model"]["logprob_chunk"] = "big"
  _raises(raw, r"config\.model\.logprob_chunk", "expected an int")


def test_reference_cache_dir_needs_a_reference_loss():
  c = _tiny()
  c.reference.cache_dir = "/tmp/refcache"
  assert config_lib.validate(c, NUM_DEVICES).reference.cache_dir == "/tmp/refcache"
  c.loss = "sft"
  c.reference.kind = "none"
  _raises(c, r"config\.reference\.cache_dir", "no reference", "cache_dir=''")


# --- derived defaults and layout bounds (issue 17) ------------------------------


def _load_flags(config_arg, *overrides):
  """The ConfigDict as ``jaxalign.main`` builds it: the config file, then the
  ``--config.*`` overrides of ml_collections' config_flags on the locked config."""
  import os  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  argv = ["main", f"--config={os.path.join(root, config_arg)}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=values,
                                  lock_config=True, sys_argv=argv)
  values(argv)
  return values.config


def test_head_dim_follows_overridden_d_model_and_n_heads():
  c = _load_flags("experiments/dpo.py:tiny", "--config.model.d_model=256",
                  "--config.model.n_heads=4")
  arch = config_lib.validate(c, NUM_DEVICES).model.arch
  assert (arch.d_model, arch.n_heads, arch.head_dim) == (256, 4, 64)
  # An explicit head_dim is honoured even where it differs from d_model // n_heads.
  c = _load_flags("experiments/dpo.py:tiny", "--config.model.d_model=256",
                  "--config.model.n_heads=4", "--config.model.head_dim=32")
  assert config_lib.validate(c, NUM_DEVICES).model.arch.head_dim == 32
  # The presets that change d_model / n_heads get d_model // n_heads wide heads.
  hh = config_lib.validate(_load_flags("experiments/dpo.py:hh,path=/x.jsonl"),
                           NUM_DEVICES).model.arch
  assert (hh.d_model, hh.n_heads, hh.head_dim) == (256, 8, 32)


def test_head_dim_zero_with_indivisible_d_model_names_the_keys():
  c = _tiny()
  c.model.d_model, c.model.n_heads = 100, 8
  _raises(c, r"config\.model\.d_model=100", r"config\.model\.n_heads=8",
          r"config\.model\.head_dim")
  c.model.head_dim = 16  # explicit: fine (q/k/v project 100 -> 8 x 16)
  assert config_lib.validate(c, NUM_DEVICES).model.arch.head_dim == 16
  c.model.head_dim = -2
  _raises(c, r"config\.model\.head_dim", ">= 0")


def test_optional_model_ints_can_be_overridden_on_the_command_line():
  c = _load_flags("experiments/dpo.py:tiny", "--config.model.sliding_window=16",
                  "--config.model.attention_chunk=8")
  arch = config_lib.validate(c, NUM_DEVICES).model.arch
  assert (arch.sliding_window, arch.attention_chunk) == (16, 8)
  assert config_lib.validate(_tiny(), NUM_DEVICES).model.arch.sliding_window is None


def _hh(**data):
  c = _common.apply_variant(config_lib.base_config(),
                               _common.experiment_arg("hh,path=/x.jsonl"),
                               num_steps=20)
  # The explicit layout and buckets these checks were written against (the preset
  # now derives both).
  c.data.layout, c.data.buckets = "padded", (128, 256)
  for k, v in data.items():
    c.data[k] = v
  return c


def test_prefix_shared_buckets_must_hold_prompt_and_all_completions():
  # Worst case under truncation: a 1-token prompt, two 511-token completions.
  c = _hh(layout="prefix_shared", max_length=512, max_prompt_length=384,
          buckets=(128, 256, 512))
  msg = _raises(c, r"config\.data\.buckets", "prefix_shared", r"data\.max_length=512",
                "1023 tokens", r"bucket >= 1023", r"\(128, 256, 512, 1024\)",
                r"lower data\.max_length to 256")
  assert "mid-training" in msg
  c.data.buckets = (128, 256, 512, 1024)
  assert config_lib.validate(c, NUM_DEVICES).data.layout == "prefix_shared"
  # The largest max_length the message names does fit.
  c = _hh(layout="prefix_shared", max_length=256, max_prompt_length=192,
          buckets=(128, 256, 512))
  assert config_lib.validate(c, NUM_DEVICES).data.max_length == 256
  # SFT lays one completion per prompt: max_length is enough.
  c = _hh(layout="prefix_shared", max_length=256, max_prompt_length=192)
  c.loss, c.reference.kind = "sft", "none"
  assert config_lib.validate(c, NUM_DEVICES).data.buckets == (128, 256)
  # No truncation: nothing to bound here (the loop checks the loaded examples).
  c = _hh(layout="prefix_shared", max_length=0, max_prompt_length=0)
  assert config_lib.validate(c, NUM_DEVICES).data.max_length == 0


def test_kto_padded_buckets_must_hold_the_mismatched_kl_sequence():
  c = _hh()  # max_length 256, max_prompt_length 192, buckets (128, 256)
  c.loss = "kto"
  _raises(c, r"config\.data\.buckets", "KTO", "KL", "447 tokens", r"bucket >= 447")
  c.data.buckets = (128, 256, 512)
  assert config_lib.validate(c, NUM_DEVICES).loss.input_kind == "unpaired"


def test_packed_rows_must_hold_one_example():
  c = _hh(layout="packed", rows_per_batch=1)  # a pair: 2 rows of up to 256 tokens
  _raises(c, r"config\.data\.rows_per_batch", "rows_per_batch to 2",
          r"bucket >= 512")
  c.data.rows_per_batch = 6  # what does not fit a batch is carried, not an error
  assert config_lib.validate(c, NUM_DEVICES).data.rows_per_batch == 6


def test_lengths_are_checked():
  _raises(_hh(max_prompt_length=256), r"config\.data\.max_prompt_length",
          "smaller than data.max_length=256")
  _raises(_hh(max_length=-1), r"config\.data\.max_length", ">= 0")
  _raises(_hh(buckets=(256, 128)), r"config\.data\.buckets", "strictly increasing")
  _raises(_hh(buckets=(0, 128)), r"config\.data\.buckets", "positive")


@pytest.mark.parametrize("arg,steps,warmup,eval_every,ckpt_every,log_every", [
    ("tiny", 300, 10, 60, 75, 10),
    ("tiny,steps=40", 40, 4, 8, 10, 4),
    ("tiny,runlocal", 10, 1, 5, 5, 1),
    ("tiny,runlocal,steps=40", 40, 4, 20, 20, 1),
])
def test_schedule_follows_the_steps_actually_run(arg, steps, warmup, eval_every,
                                                 ckpt_every, log_every):
  c = _common.apply_variant(config_lib.base_config(),
                               _common.experiment_arg(arg), num_steps=300)
  assert (c.num_steps, c.optimizer.warmup_steps, c.eval.every_steps,
          c.checkpoint.every_steps, c.log.every_steps) == (
              steps, warmup, eval_every, ckpt_every, log_every)


def test_optional_float_model_fields_can_be_overridden_on_the_command_line():
  """Gemma's soft-caps and attention scalar are float-or-None: typed references, so
  the flag parses (a bare None field cannot be set from the command line)."""
  c = _load_flags("experiments/dpo.py:tiny", "--config.model.final_logit_softcap=30",
                  "--config.model.query_pre_attn_scalar=256")
  arch = config_lib.validate(c, NUM_DEVICES).model.arch
  assert (arch.final_logit_softcap, arch.query_pre_attn_scalar) == (30.0, 256.0)
  assert config_lib.validate(_tiny(), NUM_DEVICES).model.arch.final_logit_softcap is None


def test_auto_layout_shares_prompts_of_multi_completion_losses_only():
  """data.layout='auto' (the default) is the fastest exact layout per input kind."""
  for loss, kind, want in (("dpo", "pairwise", "prefix_shared"),
                           ("kto", "unpaired", "prefix_shared"),
                           ("rrhf", "ranked", "prefix_shared"),
                           ("sft", "sft", "padded")):
    c = _common.apply_variant(config_lib.base_config(),
                              _common.experiment_arg("hh,path=/x.jsonl"), num_steps=20)
    c.loss = loss
    if loss == "sft":
      c.reference.kind = "none"
    cfg = config_lib.validate(c, NUM_DEVICES)
    assert (cfg.loss.input_kind, cfg.data.layout) == (kind, want)
  c = _hh(layout="packed", rows_per_batch=6)  # an explicit layout is kept
  assert config_lib.validate(c, NUM_DEVICES).data.layout == "packed"


@pytest.mark.parametrize("max_length,layout,want", [
    (256, "prefix_shared", (128, 256, 384, 512)),  # 1 + 2 x 255 = 511
    (512, "prefix_shared", (256, 512, 768, 1024)),  # 1 + 2 x 511 = 1023
    (256, "padded", (64, 128, 192, 256)),
    (64, "padded", (64,)),
])
def test_buckets_follow_max_length_and_layout(max_length, layout, want):
  """A user who sets data.max_length gets buckets that hold the layout's worst case;
  the oracle is `layout_need`'s formula, checked by hand in the ids above."""
  c = _hh(layout=layout, max_length=max_length, max_prompt_length=max_length // 2,
          buckets=())
  cfg = config_lib.validate(c, NUM_DEVICES)
  assert cfg.data.buckets == want
  need = 1 + 2 * (max_length - 1) if layout == "prefix_shared" else max_length
  assert cfg.data.buckets[-1] >= need


def test_derive_buckets_rounds_up_and_caps_programs():
  for need in (1, 37, 127, 128, 129, 255, 256, 511, 1000, 4097):
    b = config_lib.derive_buckets(need)
    grain = 16 if need < 256 else 64
    assert b[-1] >= need and b[-1] - need < grain, (need, b)
    assert all(x % grain == 0 for x in b) and list(b) == sorted(set(b))
    assert len(b) == (1 if b[-1] <= 128 else 4) or len(set(b)) < 4, (need, b)


def test_rl_runlocal_keeps_an_explicit_step_count():
  """``steps=`` wins over runlocal's 4 iterations, as it does for offline configs
  (it used to be replaced without a word)."""
  assert _common.rl_config("grpo", "tiny,runlocal").num_steps == 4
  c = _common.rl_config("grpo", "tiny,runlocal,steps=9")
  assert (c.num_steps, c.checkpoint.every_steps) == (9, 4)
  cfg, rl = config_lib.validate_rl(c, NUM_DEVICES)
  assert cfg.num_steps == 9 and rl.algorithm == "grpo"


def test_rl_lora_refuses_a_reward_copy_value_model():
  """LoRA RL trains adapters (jaxalign/train/rl_lora.py); its value model is the base
  with its own adapters, so value_init='reward' (a full copy) is refused by name."""
  c = _common.rl_config("ppo", "tiny")
  c.model.lora.rank = 8
  config_lib.validate_rl(c, NUM_DEVICES)
  c.rl.reward, c.rl.reward_path, c.rl.value_init = "checkpoint", "/rm", "reward"
  c.data.source = "synthetic"
  with pytest.raises(ValueError, match=r"config\.rl\.value_init: 'reward' with "
                     r"model\.lora\.rank=8"):
    config_lib.validate_rl(c, NUM_DEVICES)


def test_rl_configs_skip_the_offline_batch_layout_check():
  """RL lays out no offline batches: the pod PPO config's buckets (up to 1024 under
  max_length 1024) would not hold a prefix-shared pair, and must not matter."""
  c = _common.rl_config("ppo", "hh,path=/x.jsonl,reward_path=/rm")
  c.data.max_length, c.data.buckets = 1024, (256, 512, 1024)
  cfg, _ = config_lib.validate_rl(c, NUM_DEVICES)
  assert cfg.data.buckets == (256, 512, 1024)
