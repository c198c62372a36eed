"""Online DPO and on-policy distillation (GKD) on the online-RL sampler: their
minibatch losses (entries of `rl_steps.ALGORITHMS`) and GKD's frozen teacher.

* ``online_dpo`` (Guo et al. 2024, OAIF): each prompt's ``group_size`` (2) completions
  are sampled from the current policy and ordered by the run's reward (the synthetic
  oracle, reward functions or a reward model: the "judge"); the DPO loss
  (`jaxalign.losses.online_dpo`, beta = the traced ``kl_coef``) against the reference
  (the initial policy, scored with the rollout). Equal scores are ties: masked, and
  their fraction logged. With ``group_size`` G > 2 the pair is the best- and the
  worst-scored sample of the G (`jaxalign.losses.best_worst_pairs`); the others are
  not trained on.
* ``gkd`` (Agarwal et al. 2024): the token-level generalised JSD(``rl.gkd_beta``)
  between the teacher's and the student's full-vocabulary next-token distributions
  on the student's own samples (`jaxalign.ops.divergence`: chunked over time, no
  [B, N, V]), token mean over completion tokens; gradients reach the student only.
  Only on-policy data (the paper's lambda = 1): the RL prompt sources carry no
  reference completions to mix in. Both models' logits are read at
  ``rl.temperature`` (TRL's GKDTrainer divides both by its temperature too).

The teacher (`load_teacher`): ``rl.teacher`` is ``WORKDIR[:STEP]`` of a jaxalign run
(its policy; a LoRA run's adapters merged) or an HF checkpoint directory. It may be
wider or deeper than the student but must share its vocabulary and tokenizer: checked
before anything compiles, the errors naming ``rl.teacher``. Its params are built once,
placed like a reference model, never updated and never saved: checkpoints record its
fingerprint, and a resume with another teacher is refused.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxalign import losses
from jaxalign.models import transformer as tfm
from jaxalign.ops import divergence
from jaxalign.ops import logprobs as lp_lib
from jaxalign.parallel import mesh as mesh_lib
from jaxalign.train import build
from jaxalign.train import refcache
from jaxalign.train import rundir

KEY = "config.rl.teacher"


# ----------------------------------------------------------------------------- losses


def _hidden(forward, params, mb: dict, prompt_len: int):
  """(hidden [B, N, D] at the slots predicting the completion, unembed [D, V])."""
  hidden, unembed = forward(params, mb)
  n = mb["mask"].shape[1]
  return hidden[:, prompt_len - 1:prompt_len - 1 + n], unembed


def online_dpo_loss(policy_params, value_params, mb, *, fwd, rl, kl_loss_coef):
  """Online DPO on the minibatch's groups (``rl.group_size`` adjacent rows: one
  prompt's samples): the best- and worst-scored of each group as the pair.

  Log-probs are the sampler's (``rl.temperature``; the reference's in ``ref_logp``
  too), so with the default temperature 1 they are the models' own, as in DPO."""
  del value_params
  h, unembed = _hidden(fwd.policy, policy_params, mb, rl.prompt_len)
  logp = lp_lib.token_logprobs(h, unembed, mb["tokens"][:, rl.prompt_len:],
                               chunk_size=rl.logprob_chunk_size,
                               logit_softcap=fwd.logit_softcap,
                               temperature=rl.temperature)
  mask = mb["mask"].astype(jnp.float32)
  groups = lambda x: x.reshape(-1, rl.group_size)  # noqa: E731
  pol, ref, scores = losses.best_worst_pairs(groups(jnp.sum(logp * mask, 1)),
                                             groups(jnp.sum(mb["ref_logp"] * mask, 1)),
                                             groups(mb["scores"]))
  per_pair, m = losses.online_dpo(pol, ref, scores, beta=kl_loss_coef)
  judged = jnp.maximum(jnp.sum(1.0 - m["tie"]), 1.0)
  loss = jnp.sum(per_pair) / judged
  return loss, {"loss/online_dpo": loss, "online_dpo/tie_frac": jnp.mean(m["tie"]),
                "online_dpo/accuracy": jnp.sum(m["accuracy"] * (1 - m["tie"])) / judged,
                "online_dpo/margin": jnp.sum(m["margin"] * (1 - m["tie"])) / judged}


def gkd_loss(policy_params, value_params, mb, *, fwd, rl, kl_loss_coef, teacher):
  """GKD: the generalised JSD to the teacher (``teacher``: its params, run by
  ``fwd.teacher``), token mean over the completion tokens."""
  del value_params, kl_loss_coef
  h_s, w_s = _hidden(fwd.policy, policy_params, mb, rl.prompt_len)
  h_t, w_t = _hidden(fwd.teacher, teacher, mb, rl.prompt_len)
  d = divergence.token_generalized_jsd(h_s, w_s, h_t, w_t, beta=rl.gkd_beta,
                                       chunk_size=rl.logprob_chunk_size,
                                       temperature=rl.temperature,
                                       student_softcap=fwd.logit_softcap,
                                       teacher_softcap=fwd.teacher_softcap)
  mask = mb["mask"].astype(jnp.float32)
  loss = jnp.sum(d * mask) / jnp.maximum(jnp.sum(mask), 1.0)
  return loss, {"loss/gkd": loss}


# ----------------------------------------------------------------------------- teacher


@dataclasses.dataclass(frozen=True)
class Teacher:
  """GKD's frozen teacher: its `build.Model` (architecture, graphdef), params placed
  on the mesh, and the checkpoint meta naming it. All None / empty without one."""
  model: build.Model | None = None
  params: Any = None
  meta: dict = dataclasses.field(default_factory=dict)


def _check_vocab(arch, vocab_size: int, spec: str) -> None:
  if arch.vocab_size != vocab_size:
    raise ValueError(f"{KEY}={spec!r}: its vocabulary has {arch.vocab_size} ids, the "
                     f"student's (model.vocab_size) {vocab_size}; GKD compares "
                     "next-token distributions id by id: use one tokenizer for both.")


def _source(spec: str, cfg, vocab_size: int) -> tuple[Any, Any, dict]:
  """(architecture, host params, meta) of ``rl.teacher``; errors name it and come
  before any weight is read."""
  if os.path.isfile(os.path.join(spec, "config.json")):  # an HF checkpoint directory
    from jaxalign.models import hf  # pylint: disable=g-import-not-at-top
    _check_vocab(build.resolved_arch(dataclasses.replace(cfg.model, hf_path=spec)),
                 vocab_size, spec)
    if cfg.data.source != "synthetic":
      spec_tok = build.tokenizer_spec(cfg.data.tokenizer, cfg.model.hf_path)
      build.check_tokenizer_matches(build.load_tokenizer(spec_tok), spec_tok, spec,
                                    "rl.teacher")
    arch, params = hf.load(spec)
    return arch, params, {"teacher": refcache.fingerprint_files([spec])[:32],
                          "teacher_source": f"rl.teacher={spec!r}"}
  workdir, step = rundir.split_init_from(spec)
  workdir = os.path.abspath(workdir)
  step = rundir.resolve_step(workdir, step, KEY)
  record = rundir.read_run_record(workdir, KEY)
  theirs = record.get("fingerprints", {}).get("tokenizer")
  ours = refcache.tokenizer_fingerprint(cfg)
  if theirs != ours:
    raise ValueError(f"{KEY}={spec!r}: the teacher run's tokenizer ({theirs}) is not this "
                     f"run's ({ours}); distillation compares next-token distributions "
                     "id by id, so both must share one tokenizer.")
  arch = rundir.arch_from_record(record["resolved"]["arch"])
  _check_vocab(arch, vocab_size, spec)
  params, head, _ = rundir.run_lm_params(workdir, step, KEY)
  if head is not None:
    raise ValueError(f"{KEY}={spec!r}: that run is a reward model (scalar head); give "
                     "a policy run (SFT, DPO, RL) whose next-token distribution to match.")
  resolved = f"{workdir}:{step}"
  return (arch, params, {"teacher": refcache.init_from_fingerprint(resolved)[:32],
                        "teacher_source": f"rl.teacher={resolved!r}"})


def load_teacher(cfg, rl, policy: build.Model, mesh, ckpt) -> Teacher:
  """GKD's teacher (module doc), or an empty `Teacher` when ``rl.teacher`` is unset.
  ValueError naming ``rl.teacher`` when its vocabulary or tokenizer is not the
  student's, or ``ckpt``'s latest checkpoint was trained against another teacher."""
  if not rl.teacher:
    return Teacher()
  arch, host, meta = _source(rl.teacher, cfg, policy.arch.vocab_size)
  last = ckpt.latest_step()
  if last is not None and ckpt.read_meta(last).get("teacher") != meta["teacher"]:
    raise ValueError(f"{ckpt.directory} step {last} was trained against "
                     f"{ckpt.read_meta(last).get('teacher_source')}, not {KEY}="
                     f"{rl.teacher!r} ({meta['teacher_source']}); resume with that "
                     "teacher, or start in a new workdir.")
  axes = tfm.logical_axes(arch)
  model = build.Model(arch=arch, graphdef=build.graphdef(arch),
                      init_params=lambda k: tfm.init(arch, k)[1], logical_axes=axes)
  shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32), host)
  sh = mesh_lib.reference_shardings(axes, mesh, cfg.mesh, shapes)
  # host arrays straight into their shardings (no default-device copy first)
  params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, np.float32), host), sh)
  return Teacher(model=model, params=params, meta=meta)
