"""DPO on HH-RLHF for Llama-3 8B on a TPU v5p-64 slice (32 chips, 8 hosts).

A v5p-N slice has N TensorCores and N/2 chips; JAX sees each chip (two cores as one
megacore) as one device: 32 devices with 95 GiB of HBM each, 4 per host.

Launch on every host of the slice (the same command; jax.distributed reads the TPU
topology, see docs/scale_out.md):

  python -m jaxalign.main --config experiments/pod/llama3_8b_dpo_v5p64.py:\
path=/data/hh-rlhf/train.jsonl.gz,eval_path=/data/hh-rlhf/test.jsonl.gz,\
hf_path=/ckpt/llama3-8b-sft \
      --workdir gs://bucket/runs/llama3-8b-dpo-hh

  NOTE (docs/scale_out.md, "What is not there yet"): ``jaxalign.train.loop.run`` is
  single-process today; this file is the validated target config. The tokenizer is the
  checkpoint's own (``tokenizer=auto``).

Memory per chip (N = 8.03e9 parameters, counted in tests/test_pod_configs.py):

  policy master params f32          4 B/param
  gradients f32                     4 B/param   (grad_step returns f32 grads)
  AdamW m and v f32                 8 B/param
  frozen reference f32              4 B/param   (reference_placement="policy")
  -------------------------------------------
  20 B/param * 8.03e9 = 160.6 GB, sharded by FSDP over 32 chips = 5.0 GB/chip.

  Activations: 64 pairs/step, padded layout = 128 rows of <= 1024 tokens, 4 rows =
  4096 tokens per chip. remat="dots_with_no_batch_dims" keeps the outputs of the
  weight matmuls (q 4096 + k 1024 + v 1024 + o 4096 + gate 14336 + up 14336 + down
  4096 = 43,008 values/token/layer, bf16) and recomputes the rest:
  43,008 * 2 B * 4096 tokens * 32 layers = 11.3 GB, plus the bf16 residual stream at
  each layer boundary (4096 * 4096 * 2 B * 32 = 1.1 GB). One layer's attention
  probabilities in f32 with attention_chunk=256 queries: 4 rows * 32 heads * 256 *
  1024 * 4 B = 0.13 GB. One FSDP-gathered layer (218M params, f32, x2 to overlap the
  next gather) 1.7 GB; the chunked log-prob (128 tokens x 128,256 vocab x 4 rows x
  4 B, with its gradient) ~0.5 GB.
  Total ~20 GB of 95 GB: v5p-64 is roomy for 8B DPO, so we buy speed with memory
  (saving the matmul outputs avoids recomputing ~1/3 of the FLOPs that full remat
  would), and keep the same global batch as the 8 x H100 config so the two runs are
  the same experiment. Doubling data.batch_size still fits (~35 GB).

Measured (`python experiments/pod/_memory_analysis.py llama3_8b_dpo_v5p64 layers=2`,
XLA:CPU, docs/scale_out.md section 8 item 4): with activations pinned batch-sharded
(`transformer.ActivationSharding`) temporaries are 9.7 GB per chip with 2 layers,
11.3 GB with 4 (+0.85 GB per layer, ~35 GB with 32: XLA:CPU appears to hold the
saved matmul outputs in f32, twice the bf16 figure above); unconstrained the
partitioner gathers the global batch's activations (65.5 GB with 2 layers, 96.1 GB
with 4). `jaxalign.train.loop.run` does not pass the sharding yet (section 8).

Mesh: fsdp=32 (data=1, tensor=1). Pure FSDP is the cheapest layout for an 8B model
on ICI: each layer's weights are all-gathered once in the forward and once in the
backward (218M params) and gradients reduce-scattered, all on the 3D torus; tensor
parallelism would add two all-reduces of activations per layer and buys nothing
when the model already fits. data.batch_size must divide by data*fsdp = 32.

No micro-batching (``data.micro_batches`` stays 1): the whole batch fits anyway.
"""

from experiments import _common
from jaxalign import config as config_lib

NUM_DEVICES = 32  # v5p-64: 32 chips
HBM_BYTES_PER_DEVICE = 95 * 2**30


def get_config(arg=None):
  a = _common.parse_arg(arg, path="/data/hh-rlhf/train.jsonl.gz",
                           eval_path="/data/hh-rlhf/test.jsonl.gz",
                           hf_path="/ckpt/llama3-8b-sft",
                           tokenizer="auto")
  c = config_lib.base_config()
  c.seed = 0
  # One epoch of the full HH-RLHF train split (160.8k pairs) at 64 pairs per step.
  c.num_steps = 2500

  # With hf_path the architecture comes from its config.json; these fields are the
  # same shape (and are what a random-init dry run with hf_path="" builds).
  c.model.update(_common.LLAMA3_8B_MODEL)
  c.model.hf_path = a.hf_path
  # bf16 matmuls on f32 master weights (norms, softmax, RoPE and log-probs stay f32).
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.model.remat = "dots_with_no_batch_dims"
  # Query-chunked attention: the [rows, heads, T, T] f32 scores become [.., 256, T].
  c.model.attention_chunk = 256
  # Fused attention kernel by backend (cuDNN on GPU, splash on TPU; ops/attention.py):
  # no [rows, heads, T, T] scores in HBM at all. attention_chunk is the xla fallback's.
  c.model.attention_impl = "auto"

  # DPO hyperparameters of Rafailov et al. 2023 on HH: beta 0.1, lr 1e-6, batch 64.
  c.loss = "dpo"
  c.loss_hparams.beta = 0.1
  c.reference.kind = "initial"  # the SFT checkpoint itself, frozen

  c.data.source = "file"
  c.data.format = "hh"
  c.data.path = a.path
  c.data.eval_path = a.eval_path
  c.data.tokenizer = a.tokenizer
  c.data.on_error = "skip"  # counted by reason in the logs
  # HH-RLHF prompt + longer response: p99 ~2,900 chars (~740 Llama-3 tokens at ~4
  # chars/token), max 4,300: 1024 keeps >99% whole; prompts keep their last 768.
  c.data.max_length = 1024
  c.data.max_prompt_length = 768
  # Three static shapes -> three compiled train steps; most pairs land in 512.
  c.data.buckets = (256, 512, 1024)
  c.data.layout = "padded"  # memory above is for 2 rows per pair at the 1024 bucket
  c.data.batch_size = 64

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-6
  c.optimizer.schedule = "linear"
  c.optimizer.warmup_steps = 150
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0

  c.mesh.data = 1
  c.mesh.fsdp = 32
  c.mesh.tensor = 1
  c.mesh.reference_placement = "policy"  # reference sharded like the policy: 1/32 each

  # ~96 GB per checkpoint (f32 params 32 GB + Adam moments 64 GB), written in 1/32
  # shards by every host; async so the steps do not wait on storage. Preemption
  # (SIGTERM) saves at once, so every_steps bounds only the loss on a hard crash.
  c.checkpoint.every_steps = 250
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True

  c.eval.every_steps = 250
  c.eval.num_examples = 1024  # only used to split path when eval_path is empty
  c.eval.batch_size = 64  # divisible by the data-parallel size 32
  c.log.every_steps = 10
  c.log.progress_bar = False
  return c
