"""Parity of jaxalign's transformer with Hugging Face transformers (torch CPU, f32).

Oracle: the transformers implementation of each architecture, on a tiny random model
it creates itself. Tolerance: max |logit diff| <= 1e-4 in float32.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from jaxalign.models import hf  # noqa: E402
from jaxalign.models import transformer as tm  # noqa: E402

TOL = 1e-4
_SMALL = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5)
_LLAMA3_ROPE = dict(rope_type="llama3", rope_theta=500000.0, factor=8.0, low_freq_factor=1.0,
                    high_freq_factor=4.0, original_max_position_embeddings=16)

CASES = {
    "llama": (transformers.LlamaConfig, dict(_SMALL)),
    "llama_tied_llama3": (transformers.LlamaConfig,
                          dict(_SMALL, tie_word_embeddings=True, rope_parameters=_LLAMA3_ROPE)),
    "llama_untied_llama3_sharded": (transformers.LlamaConfig,
                                    dict(_SMALL, rope_parameters=_LLAMA3_ROPE)),
    # A window shorter than the test sequence, so the sliding mask is exercised.
    "mistral_window": (transformers.MistralConfig, dict(_SMALL, sliding_window=5)),
    "qwen2": (transformers.Qwen2Config, dict(_SMALL, tie_word_embeddings=True)),
    # Gemma: GeGLU, (1 + w) norms, sqrt(d)-scaled embeddings, explicit head_dim.
    "gemma": (transformers.GemmaConfig, dict(_SMALL, head_dim=16,
                                              hidden_act="gelu_pytorch_tanh")),
}


def _tokens(vocab, b=2, t=24, seed=0):
  return np.random.default_rng(seed).integers(0, vocab, (b, t)).astype(np.int64)


def _hf_logits(model, tokens):
  with torch.no_grad():
    return model(torch.from_numpy(tokens)).logits.float().numpy()


def _jax_logits(cfg, params, tokens):
  graphdef, template = tm.init(cfg, jax.random.key(0))
  assert jax.tree.structure(template) == jax.tree.structure(params)
  pos = np.broadcast_to(np.arange(tokens.shape[1]), tokens.shape)
  return np.asarray(tm.logits(graphdef, params, jnp.asarray(tokens, jnp.int32),
                              jnp.asarray(pos, jnp.int32)))


def _make_hf(config_cls, kwargs, seed):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config_cls(**kwargs))
  model = model.float().eval()
  # HF initialises norms to one and biases to zero; randomise them so the test sees them.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight") or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


@pytest.mark.parametrize("name", sorted(CASES))
def test_load_parity_and_roundtrip(name, tmp_path):
  config_cls, kwargs = CASES[name]
  model = _make_hf(config_cls, kwargs, seed=sorted(CASES).index(name))
  src = tmp_path / "hf"
  shard = "20KB" if name.endswith("sharded") else "1GB"
  model.save_pretrained(src, safe_serialization=True, max_shard_size=shard)
  if name.endswith("sharded"):
    assert os.path.exists(src / "model.safetensors.index.json")

  tokens = _tokens(kwargs["vocab_size"])
  ref = _hf_logits(model, tokens)
  cfg, params = hf.load_hf(str(src))
  assert cfg.tie_embeddings == kwargs.get("tie_word_embeddings", name == "gemma")
  got = _jax_logits(cfg, params, tokens)
  np.testing.assert_allclose(got, ref, atol=TOL, rtol=0)

  # save_hf -> transformers reload gives the same logits.
  arch = name.split("_")[0]
  dst = tmp_path / "out"
  hf.save_hf(str(dst), cfg, params, arch)
  reloaded = transformers.AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32).eval()
  np.testing.assert_allclose(_hf_logits(reloaded, tokens), ref, atol=TOL, rtol=0)


def test_config_parsing_legacy_rope_scaling():
  # transformers 4.x style: top-level rope_theta + rope_scaling with "type"/"rope_type".
  raw = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
         "rope_theta": 123.0, "rope_scaling": {"rope_type": "llama3", "factor": 4.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                              "original_max_position_embeddings": 32}}
  cfg = hf.config_from_hf(raw)
  assert cfg.rope_theta == 123.0 and cfg.rope_scaling.factor == 4.0
  assert cfg.n_kv_heads == 4 and cfg.head_dim == 16


def _write_small_llama(tmp_path):
  model = _make_hf(transformers.LlamaConfig, dict(_SMALL, num_hidden_layers=1), seed=7)
  model.save_pretrained(tmp_path, safe_serialization=True)
  return tmp_path


def test_errors_name_the_problem(tmp_path):
  src = _write_small_llama(tmp_path / "ok")
  cfg_path = src / "config.json"
  raw = json.loads(cfg_path.read_text())

  bad = dict(raw, model_type="gpt2", architectures=["GPT2LMHeadModel"])
  cfg_path.write_text(json.dumps(bad))
  with pytest.raises(ValueError, match=r"config\.json.*unsupported architecture.*gpt2"):
    hf.load_hf(str(src))

  # Claim two layers while the weights hold one: layer 1's tensors are missing.
  cfg_path.write_text(json.dumps(dict(raw, num_hidden_layers=2)))
  with pytest.raises(ValueError, match=r"missing tensor 'model\.layers\.1\.input_layernorm"):
    hf.load_hf(str(src))

  # Wrong intermediate size: the message names the tensor and both shapes.
  cfg_path.write_text(json.dumps(dict(raw, intermediate_size=96)))
  with pytest.raises(ValueError, match=r"model\.safetensors.*mlp\.gate_proj\.weight.*\(128, 64\)"):
    hf.load_hf(str(src))

  cfg_path.write_text(json.dumps(dict(raw, rope_parameters={"rope_type": "yarn", "factor": 2.0})))
  with pytest.raises(ValueError, match="rope type 'yarn' is not supported"):
    hf.load_hf(str(src))

  cfg_path.write_text(json.dumps(dict(raw, attention_bias=True)))
  with pytest.raises(ValueError, match="attention_bias"):
    hf.load_hf(str(src))

  # A tensor the layout does not use (Llama-style o_proj bias) is reported, not dropped.
  cfg_path.write_text(json.dumps(raw))
  from safetensors.numpy import load_file, save_file
  tensors = load_file(src / "model.safetensors")
  tensors["model.layers.0.self_attn.o_proj.bias"] = np.zeros(64, np.float32)
  save_file(tensors, src / "model.safetensors")
  with pytest.raises(ValueError, match=r"not used by the llama layout.*o_proj\.bias"):
    hf.load_hf(str(src))

  with pytest.raises(ValueError, match="needs config.json"):
    hf.load_hf(str(tmp_path))  # an empty directory
  (tmp_path / "config.json").write_text(json.dumps(raw))
  with pytest.raises(ValueError, match="no model.safetensors"):
    hf.load_hf(str(tmp_path))


def test_unrepresentable_configs_rejected(tmp_path):
  raw = {"model_type": "qwen2", "hidden_size": 64, "num_attention_heads": 4,
         "num_hidden_layers": 2, "intermediate_size": 128, "vocab_size": 256,
         "sliding_window": 8, "layer_types": ["full_attention", "sliding_attention"]}
  with pytest.raises(ValueError, match="mixes sliding and full attention"):
    hf.config_from_hf(raw)
  with pytest.raises(ValueError, match="qkv_bias=True cannot be written as llama"):
    hf.config_to_hf(tm.TransformerConfig.tiny(qkv_bias=True), "llama")
  cfg = tm.TransformerConfig.tiny()
  _, params = tm.init(cfg, jax.random.key(0))
  with pytest.raises(ValueError, match=r"params\[layers/wo\] has shape \(2, 4, 16, 64\)"):
    hf.save_hf(str(tmp_path), cfg.replace(n_heads=8, head_dim=16), params, "llama")
  with pytest.raises(ValueError, match=r"params\[root\] has keys"):
    hf.save_hf(str(tmp_path), cfg.replace(tie_embeddings=True), params, "llama")
  with pytest.raises(ValueError, match="cannot be written as gemma"):
    hf.config_to_hf(tm.TransformerConfig.tiny(), "gemma")  # SwiGLU, unscaled embeddings
  with pytest.raises(ValueError, match="architecture='gpt2'"):
    hf.config_to_hf(tm.TransformerConfig.tiny(), "gpt2")
