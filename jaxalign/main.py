"""Entry point: ``python -m jaxalign.main --config experiments/NAME.py[:arg] --workdir DIR``.

Config overrides use ml_collections syntax, e.g. ``--config.num_steps=50``. The config
is locked (an override of an unknown key fails) and validated once before anything
compiles. Offline experiments run `jaxalign.train.loop.run`; a config with an ``rl``
section (experiments/ppo.py, grpo.py, ...) runs `jaxalign.train.rl.run_rl`.
"""

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, optionally with ':arg'.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Run directory: checkpoints, metrics, plots.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every file it writes at INFO; keep the console for the progress bar.
  logging.set_verbosity(logging.WARNING)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top

  if "rl" in _CONFIG.value:
    from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
    result = rl.run_rl(_CONFIG.value, _WORKDIR.value)
    print(f"status={result.status} iteration={result.iteration}", flush=True)
    return
  from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
  cfg = config_lib.validate(_CONFIG.value, jax.device_count())
  result = loop.run(cfg, _WORKDIR.value)
  print(f"status={result.status} step={result.step} "
        f"skipped={result.skipped_steps} eval={result.eval_metrics}", flush=True)


if __name__ == "__main__":
  app.run(main)
