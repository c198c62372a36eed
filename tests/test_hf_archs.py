"""Qwen3, Gemma 2 and Gemma 3 (text) against Hugging Face transformers (torch CPU, f32).

Oracle: the transformers implementation of each architecture (eager attention), on a tiny
random model it builds from a config in the test (nothing is downloaded). The configs make
every feature act on a 24-token sequence: sliding_window=5 with sliding and full layers
both present, head_dim independent of d_model, query_pre_attn_scalar != head_dim, soft caps
that the logits / scores actually reach (checked: removing each feature moves the logits),
Gemma 3's own RoPE base for sliding layers and linear scaling for full ones.

Tolerances: logits within 1e-4 max abs (f32; measured 3.5e-6 .. 7.3e-6; the export
reloaded by transformers: 0.0); greedy tokens equal.
"""

import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign.models import hf  # noqa: E402
from jaxalign.models import sampling as S  # noqa: E402
from jaxalign.models import transformer as tm  # noqa: E402
from jaxalign.ops import logprobs  # noqa: E402

TOL = 1e-4
T = 24  # test sequence length; > WINDOW so the window masks
WINDOW = 5
# initializer_range 0.15: raw logits reach |z| ~ 7-8 against the final cap of 5, and Gemma 2's
# raw attention scores ~ 5.6 against its cap of 2 (measured), so both caps act.
_SMALL = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_attention_heads=4,
              num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.15)
CASES = {
    # Layer 0 full, layers 1-2 sliding; head_dim 24 * 4 heads != d_model 64.
    "qwen3": (transformers.Qwen3Config, "qwen3",
              dict(_SMALL, num_hidden_layers=3, head_dim=24, use_sliding_window=True,
                   sliding_window=WINDOW, max_window_layers=1)),
    # Layers alternate sliding / full (Gemma 2's default pattern).
    "gemma2": (transformers.Gemma2Config, "gemma2",
               dict(_SMALL, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=24,
                    sliding_window=WINDOW, attn_logit_softcapping=2.0,
                    final_logit_softcapping=5.0)),
    # sliding_window_pattern=3: layers 0, 1, 3 sliding, layer 2 full.
    "gemma3": (transformers.Gemma3TextConfig, "gemma3_text",
               dict(_SMALL, num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=20,
                    sliding_window=WINDOW, sliding_window_pattern=3,
                    final_logit_softcapping=5.0,
                    rope_parameters={
                        "full_attention": {"rope_type": "linear", "factor": 2.0,
                                           "rope_theta": 50000.0},
                        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}})),
}


@dataclasses.dataclass
class Arch:
  name: str
  model_type: str
  model: object  # the transformers model
  cfg: tm.TransformerConfig
  params: dict
  tokens: np.ndarray  # [2, T] int64
  ref: np.ndarray  # transformers' logits [2, T, V]


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.float().numpy()


@functools.lru_cache(maxsize=None)
def _graphdef(cfg):
  return jax.eval_shape(lambda k: tm.init(cfg, k), jax.random.key(0))[0]


_logits_fn = jax.jit(tm.logits, static_argnums=0)


def _jax_logits(cfg, params, tokens):
  pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(_logits_fn(_graphdef(cfg), params, jnp.asarray(tokens, jnp.int32),
                               jnp.asarray(pos, jnp.int32)))


@pytest.fixture(scope="module", params=sorted(CASES))
def arch(request, tmp_path_factory):
  name = request.param
  config_cls, model_type, kwargs = CASES[name]
  torch.manual_seed(sorted(CASES).index(name))
  model = transformers.AutoModelForCausalLM.from_config(
      config_cls(**kwargs), attn_implementation="eager").float().eval()
  # HF initialises norm weights to one (Qwen) or zero (Gemma); randomise them so the
  # test sees every norm, including q_norm / k_norm and Gemma's (1 + w).
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):
        p.add_(0.1 * torch.randn_like(p))
  src = tmp_path_factory.mktemp(name)
  model.save_pretrained(src, safe_serialization=True)
  cfg, params = hf.load_hf(str(src))
  tokens = np.random.default_rng(0).integers(0, kwargs["vocab_size"], (2, T)).astype(np.int64)
  return Arch(name, model_type, model, cfg, params, tokens, _hf_logits(model, tokens))


def test_logits_match_transformers_and_export_roundtrips(arch, tmp_path):
  cfg = arch.cfg
  assert any(cfg.sliding_layers) and not all(cfg.sliding_layers)  # both kinds present
  got = _jax_logits(cfg, arch.params, arch.tokens)
  np.testing.assert_allclose(got, arch.ref, atol=TOL, rtol=0)

  # jaxalign's exporter -> transformers' from_pretrained gives the same logits.
  dst = tmp_path / "out"
  hf.save_hf(str(dst), cfg, arch.params, arch.model_type)
  assert json.loads((dst / "config.json").read_text())["model_type"] == arch.model_type
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(
      dst, dtype=torch.float32, attn_implementation="eager").eval()
  assert type(reloaded) is type(arch.model)
  np.testing.assert_allclose(_hf_logits(reloaded, arch.tokens), arch.ref, atol=TOL, rtol=0)
  # ... and jaxalign reads its own export back to the same config and the same bits.
  cfg2, params2 = hf.load_hf(str(dst))
  assert cfg2 == cfg
  jax.tree.map(np.testing.assert_array_equal, params2, arch.params)


def test_every_feature_moves_the_logits(arch):
  """Each configured feature matters on these inputs: dropping it from the config moves
  the logits by far more than the parity tolerance (so the parity test would catch a
  wrong implementation of it)."""
  cfg = arch.cfg
  ablations = {"sliding windows": cfg.replace(layer_types=None, sliding_window=None)}
  if cfg.attn_logit_softcap is not None:
    ablations["attention soft cap"] = cfg.replace(attn_logit_softcap=None)
  if cfg.final_logit_softcap is not None:
    ablations["final soft cap"] = cfg.replace(final_logit_softcap=None)
  if cfg.local_rope_theta is not None:
    ablations["local RoPE base"] = cfg.replace(local_rope_theta=None)
  if cfg.query_pre_attn_scalar is not None:
    ablations["query_pre_attn_scalar"] = cfg.replace(query_pre_attn_scalar=None)
  assert len(ablations) == {"qwen3": 1, "gemma2": 4, "gemma3": 4}[arch.name]
  for what, ablated in ablations.items():
    moved = np.abs(_jax_logits(ablated, arch.params, arch.tokens) - arch.ref).max()
    assert moved > 100 * TOL, (what, moved)


def _prompts(vocab, seed=1):
  """Two left-padded prompts of 9 and 7 tokens (P = 9 > WINDOW)."""
  rng = np.random.default_rng(seed)
  lens = np.array([9, 7], np.int32)
  prompt = np.zeros((2, 9), np.int32)
  for i, n in enumerate(lens):
    prompt[i, 9 - n:] = rng.integers(3, vocab, n)
  return prompt, lens


def test_greedy_sampler_matches_reforward_and_transformers_generate(arch):
  cfg, params = arch.cfg, arch.params
  n_new = 6
  prompt, lens = _prompts(cfg.vocab_size)
  scfg = S.SamplingConfig(max_new_tokens=n_new, greedy=True, eos_id=-1)  # never stops
  out = S.Sampler(cfg, scfg, batch=2, prompt_len=prompt.shape[1])(
      params, prompt, lens, jax.random.key(0))
  # Oracle 1: argmax of the full (uncached) forward over the whole sequence at every step.
  ref_t, _, ref_lp = jax.jit(lambda p: S.generate_uncached(
      _graphdef(cfg), p, scfg, jnp.asarray(prompt), jnp.asarray(lens), jax.random.key(0)))(params)
  np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref_t))
  np.testing.assert_allclose(np.asarray(out.logp), np.asarray(ref_lp), atol=1e-5)
  # Oracle 2: transformers' greedy generate on each unpadded prompt (its own KV cache,
  # sliding-window cache layers and soft-capped logits).
  arch.model.generation_config.eos_token_id = None
  for row, n in enumerate(lens):
    ids = torch.from_numpy(prompt[row, -n:].astype(np.int64))[None]
    with torch.no_grad():
      gen = arch.model.generate(ids, max_new_tokens=n_new, do_sample=False,
                                pad_token_id=0, attention_mask=torch.ones_like(ids))
    np.testing.assert_array_equal(np.asarray(out.tokens)[row], gen[0, n:].numpy())


@functools.partial(jax.jit, static_argnums=0)
def _row_logprobs(graphdef, params, tokens, positions, segments, branches):
  """Log-probs of each row's next token (targets = tokens shifted left), soft-capped."""
  cfg = tm.config_of(graphdef, params)
  h, u = tm.forward(graphdef, params, tokens, positions, segments, branches)
  return logprobs.token_logprobs(h, u, jnp.roll(tokens, -1, axis=1), chunk_size=16,
                                 logit_softcap=cfg.final_logit_softcap)


def test_packed_and_prefix_shared_logprobs_equal_separate_runs(arch):
  """Segment / branch ids with sliding windows and soft caps give each sequence's
  log-probs alone (windows count positions within a sequence, not row slots); and the
  soft-capped chunked log-probs equal log_softmax of transformers' logits (1e-4).

  All rows are one [7, T] batch (one compile): packed, prefix-shared, then the
  sequences alone (right-padded with segment 0), then the parity tokens.
  """
  cfg = arch.cfg
  rng = np.random.default_rng(3)
  a, b = rng.integers(1, cfg.vocab_size, 11), rng.integers(1, cfg.vocab_size, 9)
  ab = np.concatenate([a[:6], b])  # the prompt a[:6] continued by b

  def padded(x, pos=None, seg=None, br=None):
    n = len(x)
    pad = lambda y: np.concatenate([y, np.zeros(T - n, int)])  # noqa: E731
    return (pad(x), pad(np.arange(n) if pos is None else pos),
            pad(np.ones(n, int) if seg is None else seg), pad(np.zeros(n, int) if br is None
                                                              else br))

  rows = [
      padded(np.concatenate([a, b]), pos=np.concatenate([np.arange(11), np.arange(9)]),
             seg=np.array([1] * 11 + [2] * 9)),  # packed
      padded(np.concatenate([a, b]), pos=np.concatenate([np.arange(11), 6 + np.arange(9)]),
             br=np.array([0] * 6 + [1] * 5 + [2] * 9)),  # prefix-shared
      padded(a), padded(b), padded(ab),
      padded(arch.tokens[0]), padded(arch.tokens[1]),
  ]
  tok, pos, seg, br = (jnp.asarray(np.stack(col), jnp.int32) for col in zip(*rows))
  lp = np.asarray(_row_logprobs(_graphdef(cfg), arch.params, tok, pos, seg, br))
  packed, shared, alone_a, alone_b, alone_ab = lp[:5]
  close = lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5, rtol=0)  # noqa: E731
  close(packed[:10], alone_a[:10])
  close(packed[11:19], alone_b[:8])
  close(shared[:10], alone_a[:10])
  close(shared[11:19], alone_ab[6:14])
  # transformers' logits, soft-capped by the model, through a float64 log-softmax.
  ref = arch.ref.astype(np.float64)
  ref = ref - ref.max(-1, keepdims=True)
  ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
  want = np.take_along_axis(ref[:, :-1], arch.tokens[:, 1:, None], -1)[..., 0]
  np.testing.assert_allclose(lp[5:, :-1], want, atol=TOL, rtol=0)


# ----------------------------------------------------------------------------- config.json


def _raw(model_type, **kw):
  return dict(model_type=model_type, hidden_size=64, num_attention_heads=4,
              num_hidden_layers=4, intermediate_size=128, vocab_size=256, **kw)


def test_gemma3_legacy_config_fields():
  """transformers 4.x Gemma 3 configs: rope_theta / rope_scaling for full layers,
  rope_local_base_freq for sliding ones, sliding_window_pattern instead of layer_types."""
  cfg = hf.config_from_hf(_raw(
      "gemma3_text", head_dim=16, sliding_window=512, sliding_window_pattern=2,
      rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling={"rope_type": "linear",
                                                              "factor": 8.0}))
  assert cfg.layer_types == ("sliding_attention", "full_attention") * 2
  assert (cfg.rope_theta, cfg.rope_scaling.factor, cfg.local_rope_theta) == (1e6, 8.0, 1e4)
  assert cfg.attention_scale == 256 ** -0.5  # query_pre_attn_scalar's default
  assert (cfg.final_logit_softcap, cfg.attn_logit_softcap) == (None, None)
  assert cfg.qk_norm and cfg.post_norms and cfg.norm_offset == 1.0 and cfg.tie_embeddings
  # Gemma 2 defaults: caps 50 / 30, every other layer sliding.
  g2 = hf.config_from_hf(_raw("gemma2", sliding_window=8))
  assert (g2.attn_logit_softcap, g2.final_logit_softcap) == (50.0, 30.0)
  assert g2.sliding_layers == (True, False, True, False)
  # transformers 5.24 ignores Gemma 3's attn_logit_softcapping; so does jaxalign.
  assert hf.config_from_hf(_raw("gemma3_text", attn_logit_softcapping=50.0)
                           ).attn_logit_softcap is None
  # Qwen3 without use_sliding_window: every layer attends to everything (as in HF).
  q3 = hf.config_from_hf(_raw("qwen3", sliding_window=8, layer_types=[
      "full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]))
  assert q3.sliding_window is None and not any(q3.sliding_layers)


def test_errors_name_the_key_and_the_fix():
  with pytest.raises(ValueError, match=r"unsupported architecture.*'gemma3_text'.*'qwen3'"):
    hf.config_from_hf(_raw("gpt_neox"))
  with pytest.raises(ValueError, match="text-only gemma3_text layout"):
    hf.config_from_hf(_raw("gemma3"))
  with pytest.raises(ValueError, match="rope scaling on sliding layers"):
    hf.config_from_hf(_raw("gemma3_text", rope_parameters={
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}))
  with pytest.raises(ValueError, match="attention_bias=true"):
    hf.config_from_hf(_raw("qwen3", attention_bias=True))

  gemma2 = hf.config_from_hf(_raw("gemma2", sliding_window=8))
  with pytest.raises(ValueError, match=r"qk_norm=False cannot be written as gemma3_text.*"
                     r"save as architecture='gemma2'"):
    hf.config_to_hf(gemma2, "gemma3_text")
  gemma3 = hf.config_from_hf(_raw("gemma3_text"))
  with pytest.raises(ValueError, match=r"attn_logit_softcap=50\.0 cannot be written as "
                     r"gemma3_text: transformers does not soft-cap.*fits \['gemma2'\]"):
    hf.config_to_hf(gemma3.replace(attn_logit_softcap=50.0), "gemma3_text")
  with pytest.raises(ValueError, match=r"qk_norm=False cannot be written as qwen3.*"
                     r"save as architecture='gemma2'"):
    hf.config_to_hf(gemma2, "qwen3")
  mixed = tm.TransformerConfig.tiny(layer_types=("sliding_attention", "full_attention"),
                                    sliding_window=4)
  with pytest.raises(ValueError, match=r"layer_types=.*cannot be written as mistral.*"
                     r"one attention rule.*qwen3"):
    hf.config_to_hf(mixed, "mistral")
  with pytest.raises(ValueError, match="final_logit_softcap=5.0 cannot be written as llama"):
    hf.config_to_hf(tm.TransformerConfig.tiny(final_logit_softcap=5.0), "llama")
  with pytest.raises(ValueError, match=r"local_rope_theta=100.0 cannot be written as "
                     r"qwen3.*fits \['gemma3_text'\]"):
    hf.config_to_hf(mixed.replace(local_rope_theta=100.0, qk_norm=True), "qwen3")


def test_transformer_config_validates_new_fields():
  with pytest.raises(ValueError, match=r"layer_types=.*n_layers=2 entries"):
    tm.TransformerConfig.tiny(layer_types=("sliding_attention",))
  with pytest.raises(ValueError, match=r"layer_types=.*'full_attention', 'sliding_attention'"):
    tm.TransformerConfig.tiny(layer_types=("global", "local"))
  with pytest.raises(ValueError, match="final_logit_softcap must be positive"):
    tm.TransformerConfig.tiny(final_logit_softcap=0.0)
  # Lists from config files become tuples (the config stays hashable).
  cfg = tm.TransformerConfig.tiny(layer_types=["full_attention", "sliding_attention"],
                                  sliding_window=3)
  assert cfg.layer_types == ("full_attention", "sliding_attention") and hash(cfg)
  assert cfg.sliding_layers == (False, True)
  assert tm.TransformerConfig.tiny().attention_scale == 1 / math.sqrt(16)
