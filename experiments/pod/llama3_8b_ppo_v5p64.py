"""PPO RLHF on HH-RLHF prompts for Llama-3 8B on a TPU v5p-64 slice (32 chips).

Four 8B models share the mesh: the policy (trained), its frozen reference, the value
model (trained; initialised from the reward model, value_init="reward") and the
frozen reward model (an experiments/reward.py run with the same architecture).

Launch on every host of the slice:

  python -m jaxalign.main --config experiments/pod/llama3_8b_ppo_v5p64.py:\
path=/data/hh-rlhf/train.jsonl.gz,hf_path=/ckpt/llama3-8b-sft,\
reward_path=/runs/llama3-8b-rm \
      --workdir gs://bucket/runs/llama3-8b-ppo-hh

  NOTE (docs/scale_out.md, "What is not there yet"): the RL driver runs in one
  process today; this file is the validated target config. The tokenizer is the
  checkpoint's own (``tokenizer=auto``).

Memory per chip (N = 8.03e9 parameters each):

  policy  f32 params + f32 grads + AdamW m, v     16 B/param
  value   f32 params + f32 grads + AdamW m, v     16 B/param
  reference f32 (frozen)                          4 B/param
  reward    f32 (frozen)                          4 B/param
  40 B/param * 8.03e9 = 321 GB, FSDP over 32 chips = 10.0 GB/chip.

  Rollouts: 256 prompts per iteration = 8 per chip, left-padded to 512 tokens plus
  256 new tokens; the bf16 KV cache is 32 layers * 8 kv heads * 128 * (k, v) * 2 B
  = 131 KB per token, * 768 * 8 rows = 0.8 GB.
  Updates: 4 minibatches of 64 rows = 2 rows * 768 tokens per chip. With
  remat="dots_with_no_batch_dims" each trained model keeps 43,008 bf16 matmul
  outputs per token and layer: 43,008 * 2 B * 1,536 * 32 = 4.2 GB, 8.5 GB for policy
  and value; one gathered layer per model in flight ~1.7 GB.
  Total ~21 GB of 95 GB. The headroom is deliberate: generation is the slow phase
  (memory-bound decoding), and a larger data.batch_size (512 prompts = 16 rows per
  chip, ~23 GB) raises decode throughput more than anything else.

Caveat: the activation figures assume batch-sharded activations; see the
measurement in llama3_8b_dpo_8xh100.py. The model pins them when given
`transformer.ActivationSharding`, which online RL's programs pass
(`rl_steps.build_programs`).

Mesh: fsdp=32 as in the DPO config; every model role uses the policy's rules
(reference_placement="policy"), so each model costs 1/32 of its size per chip.
``rows = data.batch_size * group_size`` must split into ``num_minibatches`` parts
each divisible by data*fsdp = 32: 256 = 4 * 64.
"""

import dataclasses

import ml_collections

from experiments import _common
from jaxalign import config as config_lib

NUM_DEVICES = 32  # v5p-64: 32 chips
HBM_BYTES_PER_DEVICE = 95 * 2**30


def get_config(arg=None):
  a = _common.parse_arg(arg, path="/data/hh-rlhf/train.jsonl.gz",
                           hf_path="/ckpt/llama3-8b-sft",
                           reward_path="/runs/llama3-8b-rm",
                           tokenizer="auto")
  c = config_lib.base_config()
  c.seed = 0
  c.num_steps = 400  # iterations: 400 * 256 = 102k prompts, ~2.4 passes of harmless

  c.model.update(_common.LLAMA3_8B_MODEL)
  c.model.hf_path = a.hf_path
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "dots_with_no_batch_dims"
  c.model.attention_chunk = 256
  # Fused attention kernel by backend (cuDNN on GPU, splash on TPU; ops/attention.py):
  # no [rows, heads, T, T] scores in HBM at all. attention_chunk is the xla fallback's.
  c.model.attention_impl = "auto"

  c.loss = "dpo"  # unused by RL; keeps the shared validator's defaults consistent
  c.reference.kind = "initial"

  c.data.source = "file"
  c.data.format = "hh"
  c.data.path = a.path
  c.data.tokenizer = a.tokenizer
  c.data.on_error = "skip"
  c.data.max_length = 1024
  c.data.max_prompt_length = 512
  c.data.buckets = (256, 512, 1024)
  c.data.batch_size = 256  # prompts per iteration

  # PPO fine-tuning of an 8B policy: InstructGPT-style small lr, no weight decay.
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-6
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.optimizer.grad_clip_norm = 1.0

  c.mesh.data = 1
  c.mesh.fsdp = 32
  c.mesh.tensor = 1
  c.mesh.reference_placement = "policy"

  c.checkpoint.every_steps = 25  # an iteration is minutes (generation-bound)
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True
  c.eval.enabled = False  # RL metrics come from the rollouts themselves
  c.eval.batch_size = 32
  c.eval.num_examples = 64
  c.log.every_steps = 1
  c.log.progress_bar = False

  rl = {f.name: f.default for f in dataclasses.fields(config_lib.RLConfig)}
  rl.update(
      algorithm="ppo", group_size=1,
      prompt_len=512,  # HH prompts: p99 ~550 Llama-3 tokens; longer keep their end
      max_new_tokens=256,  # HH assistant turns are short; p99 well under 256
      temperature=1.0, top_k=0, top_p=1.0,
      ppo_epochs=2, num_minibatches=4,
      clip_eps=0.2, clip_value=0.2, vf_coef=0.5, gamma=1.0, lam=0.95,
      kl_coef=0.05, kl_estimator="k1",
      reward="checkpoint", reward_path=a.reward_path, value_init="reward",
      logprob_chunk_size=128,  # 128 tokens x 128,256 vocab f32 logits at a time
  )
  c.rl = ml_collections.ConfigDict(rl)
  return c
