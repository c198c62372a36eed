"""Entry point: ``python -m jaxalign.main --config experiments/NAME.py[:arg] --workdir DIR``.

Config overrides use ml_collections syntax, e.g. ``--config.num_steps=50``. The config
is locked (an override of an unknown key fails) and validated once before anything
compiles. Offline experiments run `jaxalign.train.loop.run`; a config with an ``rl``
section (experiments/ppo.py, grpo.py, ...) runs `jaxalign.train.rl.run_rl`.

Multi-host: run the same command on every host with ``--distributed`` (then
``jax.distributed.initialize()`` auto-detects the cluster on Cloud TPU, SLURM, ...) or
with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. JAX's
distributed runtime is initialised before anything touches a device. Offline
training (`loop.run`) supports it; `rl.run_rl` is still single-process.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory: checkpoints, metrics, plots.")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with its cluster "
    "auto-detection (Cloud TPU, SLURM, ...) before anything else.")
_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", "", "HOST:PORT of process 0's coordinator; with "
    "--num_processes and --process_id initialises jax.distributed explicitly.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", 0,
                                      "Total processes (with --coordinator_address).")
_PROCESS_ID = flags.DEFINE_integer("process_id", -1,
                                   "This process's index (with --coordinator_address).")
flags.mark_flags_as_required(["config", "workdir"])


def initialize_distributed(distributed: bool, coordinator_address: str,
                           num_processes: int, process_id: int) -> bool:
  """Initialises jax.distributed per the flags; returns whether it did.

  Must run before any device is touched (``jax.devices()``, an array, a jit).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise app.UsageError(
          f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < "
          f"--num_processes; got --num_processes={num_processes} "
          f"--process_id={process_id}.")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
  if num_processes > 0 or process_id >= 0:
    raise app.UsageError("--num_processes / --process_id need --coordinator_address "
                         "(or use --distributed for auto-detection).")
  if distributed:
    jax.distributed.initialize()
    return True
  return False


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every file it writes at INFO; keep the console for the progress bar.
  logging.set_verbosity(logging.WARNING)
  initialized = initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                       _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top

  if "rl" in _CONFIG.value:
    if jax.process_count() > 1:
      raise app.UsageError("RL configs (an 'rl' section) run on one process; drop "
                           "--distributed / --coordinator_address.")
    from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
    result = rl.run_rl(_CONFIG.value, _WORKDIR.value)
    print(f"status={result.status} iteration={result.iteration}", flush=True)
    return
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  cfg = config_lib.validate(_CONFIG.value, jax.device_count())
  result = loop.run(cfg, _WORKDIR.value)
  print(f"status={result.status} step={result.step} "
        f"skipped={result.skipped_steps} eval={result.eval_metrics}", flush=True)
  if initialized:
    jax.distributed.shutdown()


if __name__ == "__main__":
  app.run(main)
