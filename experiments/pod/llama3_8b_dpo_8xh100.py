"""DPO on HH-RLHF for Llama-3 8B on one 8 x H100 (80 GB) box.

The same experiment as ``llama3_8b_dpo_v5p64.py`` (same data, global batch, loss,
optimizer); only the placement and the rematerialisation differ.

Launch (one process drives the 8 local GPUs):

  python -m jaxalign.main --config experiments/pod/llama3_8b_dpo_8xh100.py:\
path=/data/hh-rlhf/train.jsonl.gz,eval_path=/data/hh-rlhf/test.jsonl.gz,\
hf_path=/ckpt/llama3-8b-sft \
      --workdir /runs/llama3-8b-dpo-hh

  The tokenizer and chat template are the checkpoint's own (``tokenizer=auto``:
  ``tokenizer.json`` of hf_path, checked against its bos / eos ids before compiling).

Memory per GPU (N = 8.03e9 parameters, counted in tests/test_pod_configs.py):

  policy master params f32 + grads f32 + AdamW m, v f32    16 B/param
  frozen reference f32 (reference_placement="policy")       4 B/param
  20 B/param * 8.03e9 = 160.6 GB, FSDP over 8 GPUs = 20.1 GB/GPU.

  Activations: 64 pairs/step = 128 padded rows of <= 1024 tokens, 16 rows = 16,384
  tokens per GPU. Saving the matmul outputs as on the v5p would cost 43,008 values *
  2 B * 16,384 tokens * 32 layers = 45 GB: with the 20 GB of state that leaves no
  room, so remat="full" keeps only the bf16 residual stream at each layer boundary,
  16,384 * 4096 * 2 B * 32 = 4.3 GB, and recomputes each layer in the backward.
  One layer being differentiated holds its matmul outputs, 43,008 * 2 B * 16,384 =
  1.4 GB, and its attention probabilities: f32 [16 rows, 32 heads, 256-query chunk,
  1024] = 0.54 GB with attention_chunk=256 (2.1 GB unchunked). One FSDP-gathered
  layer (218M params, f32, x2 to overlap) 1.7 GB; the chunked log-prob (16 rows x
  128 tokens x 128,256 vocab x 4 B, with its gradient) ~2.1 GB.
  Total ~30 GB of 80 GB, leaving room for XLA's temporaries and NCCL buffers; full
  remat costs ~1/3 more FLOPs (one extra forward) than no remat.

MEASURED (XLA's compiled memory analysis of this config's train step on 8 fake CPU
devices, `python experiments/pod/_memory_analysis.py llama3_8b_dpo_8xh100 layers=2`,
docs/scale_out.md section 8 item 4): with activations pinned batch-sharded
(`transformer.ActivationSharding`) the partitioner all-gathers each layer's weights
and no activations; temporaries 10.7 GB per device with 2 layers, 11.5 GB with 4
(+0.41 GB per layer, so ~23 GB with 32), plus ~16 GB of state and reference as
arguments: ~39 GB of 80 GB. Unconstrained (`pin=0`, which is what `jaxalign.train.
loop.run` builds until it passes the sharding) it gathers the whole global batch's
activations (f32[131072 tokens, 4096]) in the layer scan: 51.9 GB with 2 layers,
over 80 GB with 32. XLA:CPU assigns buffers differently from XLA:GPU, but the
collectives come from the partitioner both share.

Mesh: fsdp=8 (data=1, tensor=1): NVLink/NVSwitch all-gathers of one layer (0.9 GB
f32) overlap with the previous layer's compute. Tensor parallelism (tensor=8) would
keep weights local but all-reduce activations twice per layer; it pays off only
when the state does not fit FSDP (e.g. 70B). data.batch_size must divide by 8.

No micro-batching (``data.micro_batches`` stays 1): the whole batch fits anyway.
"""

from experiments import _common
from jaxalign import config as config_lib

NUM_DEVICES = 8
HBM_BYTES_PER_DEVICE = 80 * 10**9


def get_config(arg=None):
  a = _common.parse_arg(arg, path="/data/hh-rlhf/train.jsonl.gz",
                           eval_path="/data/hh-rlhf/test.jsonl.gz",
                           hf_path="/ckpt/llama3-8b-sft",
                           tokenizer="auto")
  c = config_lib.base_config()
  c.seed = 0
  # One epoch of the full HH-RLHF train split (160.8k pairs) at 64 pairs per step.
  c.num_steps = 2500

  c.model.update(_common.LLAMA3_8B_MODEL)
  c.model.hf_path = a.hf_path
  c.model.dtype = "bfloat16"  # H100 bf16 tensor cores; master weights stay f32
  c.model.param_dtype = "float32"
  c.model.remat = "full"
  c.model.attention_chunk = 256
  # Fused attention kernel by backend (cuDNN on GPU, splash on TPU; ops/attention.py):
  # no [rows, heads, T, T] scores in HBM at all. attention_chunk is the xla fallback's.
  c.model.attention_impl = "auto"

  c.loss = "dpo"
  c.loss_hparams.beta = 0.1
  c.reference.kind = "initial"

  c.data.source = "file"
  c.data.format = "hh"
  c.data.path = a.path
  c.data.eval_path = a.eval_path
  c.data.tokenizer = a.tokenizer
  c.data.on_error = "skip"
  c.data.max_length = 1024
  c.data.max_prompt_length = 768
  c.data.buckets = (256, 512, 1024)
  c.data.layout = "padded"
  c.data.batch_size = 64

  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 1e-6
  c.optimizer.schedule = "linear"
  c.optimizer.warmup_steps = 150
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip_norm = 1.0

  c.mesh.data = 1
  c.mesh.fsdp = 8
  c.mesh.tensor = 1
  c.mesh.reference_placement = "policy"

  c.checkpoint.every_steps = 250  # ~96 GB each (f32 params + Adam moments)
  c.checkpoint.keep = 2
  c.checkpoint.async_save = True

  c.eval.every_steps = 250
  c.eval.num_examples = 1024  # only used to split path when eval_path is empty
  c.eval.batch_size = 64
  c.log.every_steps = 10
  c.log.progress_bar = False
  return c
