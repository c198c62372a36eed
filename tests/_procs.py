"""Child processes of the multi-process tests: collect their output, never leak them."""

import contextlib


@contextlib.contextmanager
def reaped(procs):
  """Kills (and waits for) any of ``procs`` still running when the block exits, so a
  failing or timed-out test leaves no JAX process holding a coordinator port."""
  try:
    yield
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()


def outputs(procs, timeout: float) -> list[str]:
  """Each process's combined stdout / stderr, after it exits (killed on timeout)."""
  with reaped(procs):
    return [p.communicate(timeout=timeout)[0].decode(errors="replace") for p in procs]
