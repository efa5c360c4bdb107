"""The command lines' log output: the project's log messages on stderr as written, each once.

`python -m bmgpt_jax.train`, `chat`, `evaluate` and `convert_weights.py` run their `main` under
`@logs.cli`: while it runs, the `bmgpt_jax` logger (every module's logger is below it) writes its INFO and
higher records to the current `sys.stderr` as bare messages ("resumed from step 40 (...)"), and does not
pass them on to the root logger.

Why not `logging.basicConfig` in `main`: importing orbax logs through absl, and absl's first log call runs
`logging.basicConfig()` when the root logger has no handler. That happens at import time, before any
`main` runs, so a later `basicConfig(level=INFO, format="%(message)s")` does nothing: INFO lines never
show and warnings come out as `WARNING:bmgpt_jax.train:...`. Forcing the root logger instead would also
turn on every library's INFO lines (orbax's per-save notes). The handler on our own logger leaves the root
logger (absl, orbax, jax) as it is, and with propagation off nothing is printed twice. Everything is put
back when `main` returns, so a test calling `main` in-process leaves logging as it found it.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import sys
from typing import Callable, Iterator, TypeVar

F = TypeVar("F", bound=Callable)


class _Stderr(logging.Handler):
    """Each record's message on whatever `sys.stderr` is when it is emitted (a redirected or captured one
    too)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            print(self.format(record), file=sys.stderr, flush=True)
        except Exception:  # noqa: BLE001 -- logging's own policy: report and go on
            self.handleError(record)


@contextlib.contextmanager
def to_stderr(level: int = logging.INFO, name: str = "bmgpt_jax") -> Iterator[None]:
    """While inside: the `name` logger's records at `level` and above go to stderr as bare messages, and
    only there. The logger's handlers, level and propagation are restored on exit."""
    logger = logging.getLogger(name)
    handler = _Stderr()
    handler.setFormatter(logging.Formatter("%(message)s"))
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


def cli(main: F) -> F:
    """Decorator for a command line's `main`: it runs inside `to_stderr()`."""
    @functools.wraps(main)
    def wrapped(*args, **kwargs):
        with to_stderr():
            return main(*args, **kwargs)
    return wrapped  # type: ignore[return-value]
