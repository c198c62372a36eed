"""Test setup: 8 fake CPU devices, forced before the JAX backend starts."""

import os

# Must happen before any backend initialisation so sharding tests see 8 devices.
os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_num_cpu_devices", 8)
