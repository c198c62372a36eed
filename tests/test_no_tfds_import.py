"""Training from in-memory records must not pull in TFDS / TensorFlow.

A subprocess, because this test session's own imports (other test modules import
``tfds_builder``) would already have put them in ``sys.modules``.
"""

import os
import subprocess
import sys
import textwrap

_ITERATE_WITHOUT_TFDS = textwrap.dedent("""
    import sys
    import numpy as np
    from jaxalign.data import pipeline
    from jaxalign.data.examples import PairExample

    examples = [PairExample(prompt=np.arange(3, dtype=np.int32) + i,
                            chosen=np.array([7, 8], np.int32),
                            rejected=np.array([9], np.int32)) for i in range(4)]
    it = pipeline.make_example_iterator(examples, lambda e: e, seed=0, num_epochs=None,
                                        process_index=0, process_count=1)
    first = next(it)
    assert isinstance(first, PairExample), type(first)
    assert "tensorflow_datasets" not in sys.modules, "tensorflow_datasets was imported"
    assert "tensorflow" not in sys.modules, "tensorflow was imported"
""")

_TFDS_BUILDER_STILL_IMPORTS = textwrap.dedent("""
    from jaxalign.data import tfds_builder
    from jaxalign.data.tfds_builder import (JsonlRecordsBuilder, build_data_sources,
                                            record_from_features, record_to_features)
    import tensorflow_datasets as tfds
    assert issubclass(JsonlRecordsBuilder, tfds.core.GeneratorBasedBuilder)
    assert tfds_builder.JsonlRecordsBuilder is JsonlRecordsBuilder
""")


def _run(code):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                        text=True, timeout=300)


def test_example_iterator_does_not_import_tfds_or_tensorflow():
  result = _run(_ITERATE_WITHOUT_TFDS)
  assert result.returncode == 0, result.stderr


def test_tfds_builder_names_still_import():
  result = _run(_TFDS_BUILDER_STILL_IMPORTS)
  assert result.returncode == 0, result.stderr


_TRAINING_SETUP_WITHOUT_TFDS = textwrap.dedent("""
    import sys
    sys.path.insert(0, ".")
    import jax
    from experiments import _common
    from jaxalign import config as config_lib
    from jaxalign import main  # noqa: F401  (the entry point's own imports count)
    from jaxalign.train import loop, stream  # noqa: F401
    c = _common.apply_variant(config_lib.base_config(), _common.experiment_arg("tiny"),
                              num_steps=2)
    cfg = config_lib.validate(c, jax.device_count())
    data = stream.build_data(cfg, loop.objective_kind(cfg))
    batch = next(data.train)
    assert batch["tokens"].shape[0] > 0
    assert "tensorflow_datasets" not in sys.modules, "tensorflow_datasets was imported"
""")


def test_training_data_setup_does_not_import_tfds():
  """What ``python -m jaxalign.main`` imports and builds for a run's data (issue 17):
  synthetic / file data never need TFDS."""
  result = _run(_TRAINING_SETUP_WITHOUT_TFDS)
  assert result.returncode == 0, result.stderr
