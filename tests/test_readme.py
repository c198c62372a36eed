"""The README's new-loss example runs as written and computes its stated formula."""

import pathlib
import re

import numpy as np
import jax.numpy as jnp

from jaxalign import losses

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"


def test_readme_new_loss_example_runs_and_matches_its_formula():
  block = re.search(r"## Writing a new loss.*?```python\n(.*?)```", README.read_text(),
                    re.S).group(1)
  scope: dict = {}
  exec(compile(block, str(README), "exec"), scope)  # pylint: disable=exec-used
  try:
    fn, spec = scope["fn"], scope["spec"]
    assert spec.needs_reference and spec.input_kind == "pairwise"
    x = losses.PairwiseLogps(
        policy_chosen=jnp.array([-3.0, -1.0]), policy_rejected=jnp.array([-2.0, -4.0]),
        chosen_tokens=jnp.array([3, 1]), rejected_tokens=jnp.array([2, 4]),
        reference_chosen=jnp.array([-2.5, -2.0]), reference_rejected=jnp.array([-2.0, -3.0]))
    out, _ = fn(x)
    # Oracle: the docstring's formula in NumPy, h = [-0.5, 2.0], beta 0.1, tau 0.5.
    h = np.array([-0.5, 2.0])
    expected = 0.5 * np.log1p(np.exp(-0.1 * h / 0.5))
    np.testing.assert_allclose(np.asarray(out), expected, rtol=1e-6)
  finally:
    losses.unregister_loss("soft_margin_dpo")
