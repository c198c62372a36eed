"""Entry point: ``python -m jaxalign.main --config experiments/NAME.py[:arg] --workdir DIR``.

Config overrides use ml_collections syntax, e.g. ``--config.num_steps=50``. The config
is locked (an override of an unknown key fails) and validated once before anything
compiles. Every hyperparameter of every registered loss is a key of
``config.loss_hparams`` (``--config.loss_hparams.label_smoothing=0.1``); the chosen
loss's signature decides which are valid. Offline experiments run
`jaxalign.train.loop.run`; a config with an ``rl`` section (experiments/ppo.py,
grpo.py, ...) runs `jaxalign.train.rl.run_rl`.

The run directory holds one run: a second launch on it stops (exit 2) naming the
holder, and a resume that would change what defines the run (loss, model,
optimizer, data, ...) is refused with the differing keys (`jaxalign.train.rundir`).

Exit codes (also in the README):

====  =====================================================================
code  meaning
====  =====================================================================
0     finished: ``num_steps`` reached, final checkpoint and eval written
2     user error: config (unknown key, bad value), data, checkpoint, or run
      directory (held by another run, a resume that would change the run); one
      message on stderr naming the key and the fix, no traceback (``--debug``
      shows it)
3     stopped by a guard: non-finite or divergent steps; the message names the
      checkpoint a rerun resumes from (and ``--config.checkpoint.restore_step``)
75    preempted (SIGTERM / SIGINT): a checkpoint was saved; rerun the same
      command to continue (``EX_TEMPFAIL``)
1     anything else: a bug or a failure of the environment (full traceback)
====  =====================================================================

Multi-host: run the same command on every host with ``--distributed`` (then
``jax.distributed.initialize()`` auto-detects the cluster on Cloud TPU, SLURM, ...) or
with ``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``. JAX's
distributed runtime is initialised before anything touches a device. Offline
training (`loop.run`) and online RL (`rl.run_rl`) both run on it: every process
draws the same global batch, feeds its own rows, and only process 0 writes metrics.
"""

import difflib
import os
import re
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

EXIT_DONE = 0
EXIT_USER_ERROR = 2
EXIT_GUARD = 3
EXIT_PREEMPTED = 75

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
_DEBUG = flags.DEFINE_bool("debug", False, "Show the traceback of user errors (config, "
                           "data, checkpoint, run directory) instead of one message.")
flags.mark_flags_as_required(["config", "workdir"])

_HINT = "(add --debug for the traceback)"
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_EXPERIMENTS_DIR = os.path.join(os.path.dirname(_PACKAGE_DIR), "experiments")


class UserError(ValueError):
  """A command-line mistake found here (exit code 2, one message)."""


def initialize_distributed(distributed: bool, coordinator_address: str,
                           num_processes: int, process_id: int) -> bool:
  """Initialises jax.distributed per the flags; returns whether it did.

  Must run before any device is touched (``jax.devices()``, an array, a jit).
  """
  import jax  # pylint: disable=g-import-not-at-top
  if coordinator_address:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise UserError(
          f"--coordinator_address needs --num_processes >= 1 and 0 <= --process_id < "
          f"--num_processes; got --num_processes={num_processes} "
          f"--process_id={process_id}.")
    jax.distributed.initialize(coordinator_address, num_processes=num_processes,
                               process_id=process_id)
    return True
  if num_processes > 0 or process_id >= 0:
    raise UserError("--num_processes / --process_id need --coordinator_address "
                    "(or use --distributed for auto-detection).")
  if distributed:
    jax.distributed.initialize()
    return True
  return False


# ----------------------------------------------------------------------------
# Errors for people.


def _raised_in_our_code(e: BaseException) -> bool:
  tb = e.__traceback__
  while tb is not None and tb.tb_next is not None:
    tb = tb.tb_next
  where = os.path.abspath(tb.tb_frame.f_code.co_filename) if tb else ""
  return where.startswith((_PACKAGE_DIR + os.sep, _EXPERIMENTS_DIR + os.sep))


def exit_code(e: BaseException) -> int | None:
  """The exit code of an exception shown as one message, or None (a traceback):
  guard stops (3), and ValueErrors / missing files raised by jaxalign or an
  experiment file (2): config, data, checkpoint and run-directory errors."""
  from jaxalign.train import hooks  # pylint: disable=g-import-not-at-top
  if isinstance(e, hooks.GuardError):
    return EXIT_GUARD
  if isinstance(e, UserError):
    return EXIT_USER_ERROR
  if isinstance(e, (ValueError, FileNotFoundError)) and _raised_in_our_code(e):
    return EXIT_USER_ERROR
  return None


def _print_error(message: str) -> None:
  print(f"error: {message}\n{_HINT}", file=sys.stderr, flush=True)


def _innermost_line(e: BaseException) -> str:
  """The last line of the innermost exception (ml_collections wraps a config file's
  error in a traceback text)."""
  while (e.__cause__ or e.__context__) is not None:
    e = e.__cause__ or e.__context__
  lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
  line = lines[-1] if lines else type(e).__name__
  return line[1:-1] if len(line) > 1 and line[0] == line[-1] and line[0] in "'\"" else line


def _overrides(argv: list[str]) -> list[str]:
  return [m.group(2) for a in argv
          if (m := re.match(r"^--?(no)?config\.([^=]+)", a))]


def _config_spec(argv: list[str]) -> str | None:
  for i, a in enumerate(argv):
    if a.startswith(("--config=", "-config=")):
      return a.split("=", 1)[1]
    if a in ("--config", "-config") and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _loss_hparams_message(path: list[str], config, argv: list[str]) -> str:
  from jaxalign import losses  # pylint: disable=g-import-not-at-top
  loss = next((a.split("=", 1)[1] for a in argv if a.startswith("--config.loss=")),
              config.get("loss", "dpo"))
  names = [loss] if isinstance(loss, str) and "," not in loss and ":" not in loss else []
  try:
    valid = sorted(losses.get_loss(names[0]).defaults) if names else None
  except ValueError:
    valid = None
  where = f"the loss {names[0]!r}" if valid is not None else "any registered loss"
  valid = valid if valid is not None else sorted(config.loss_hparams.keys())
  return (f"config.{'.'.join(path)}: not a hyperparameter of {where}; its "
          f"hyperparameters: {', '.join(valid) or 'none'}.")


def _missing_key_message(config, argv: list[str]) -> str | None:
  """Names the first override whose key the config lacks, with the closest keys."""
  for override in _overrides(argv):
    node, path = config, []
    for part in override.split("."):
      if not hasattr(node, "keys") or part not in node.keys():
        path.append(part)
        if path[0] == "loss_hparams" and len(path) == 2:
          return _loss_hparams_message(path, config, argv)
        keys = sorted(node.keys()) if hasattr(node, "keys") else []
        parent = ".".join(["config"] + path[:-1])
        close = difflib.get_close_matches(part, keys, n=1)
        guess = f" (did you mean {parent}.{close[0]}?)" if close else ""
        return (f"config.{'.'.join(path)}: no such key{guess}. Keys of {parent}: "
                f"{', '.join(keys) or 'none (not a section)'}.")
      node, path = node[part], path + [part]
  return None


def flag_error_message(e: BaseException, argv: list[str]) -> str:
  """One line for a flag / config-file / override error (see `_parse_flags`)."""
  spec = _config_spec(argv)
  if spec is not None:
    try:
      parser = config_flags.config_flags.ConfigFileFlagParser("config", lock_config=False)
      config = parser.parse(spec)
      message = _missing_key_message(config, argv)
      if message:
        return message
    except Exception as load_error:  # pylint: disable=broad-except
      return f"--config {spec}: {_innermost_line(load_error)}"
  if isinstance(e, flags.Error) and str(e).startswith("flag --"):
    return str(e).strip().splitlines()[0]  # e.g. a value of the wrong type
  return _innermost_line(e)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing, with a config or flag mistake as one message (exit code 2)."""
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    if "--debug" in argv:
      raise
    _print_error(flag_error_message(e, argv))
    sys.exit(EXIT_USER_ERROR)


# ----------------------------------------------------------------------------
# The job.


def _loaded_config():
  """The parsed config; a config file that failed to load is a `UserError`."""
  try:
    config = _CONFIG.value
    "rl" in config  # pylint: disable=pointless-statement
  except OSError as e:
    raise UserError(f"--config {config_flags.get_config_filename(flags.FLAGS['config'])}"
                    f": {_innermost_line(e)}") from None
  return config


def _train() -> int:
  config = _loaded_config()
  initialized = initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value,
                                       _NUM_PROCESSES.value, _PROCESS_ID.value)
  import jax  # pylint: disable=g-import-not-at-top
  from jaxalign import config as config_lib  # pylint: disable=g-import-not-at-top

  if "rl" in config:
    from jaxalign.train import rl  # pylint: disable=g-import-not-at-top
    result = rl.run_rl(config, _WORKDIR.value)
    print(f"status={result.status} iteration={result.iteration}", flush=True)
  else:
    from jaxalign.train import loop  # pylint: disable=g-import-not-at-top
    cfg = config_lib.validate(config, jax.device_count())
    result = loop.run(cfg, _WORKDIR.value)
    print(f"status={result.status} step={result.step} "
          f"skipped={result.skipped_steps} eval={result.eval_metrics}", flush=True)
  if initialized:
    jax.distributed.shutdown()
  return EXIT_PREEMPTED if result.status == "preempted" else EXIT_DONE


def main(argv) -> int:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Orbax logs every file it writes at INFO; keep the console for the progress bar.
  logging.set_verbosity(logging.WARNING)
  try:
    return _train()
  except Exception as e:  # pylint: disable=broad-except
    code = None if _DEBUG.value else exit_code(e)
    if code is None:
      raise
    _print_error(f"{type(e).__name__}: {e}" if code == EXIT_GUARD else str(e))
    return code


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
