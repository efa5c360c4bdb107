"""The command lines' log set-up (`bmgpt_jax.logs`)."""
import logging

from bmgpt_jax import logs


class _Kept(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_notes_are_bare_lines_on_stderr_once_whatever_the_root_logger_holds(capsys):
    """A root logger already configured (as absl's first log call does when orbax is imported: a
    `basicConfig()` at WARNING) neither hides the INFO notes nor prints them a second time; afterwards the
    logger is as it was."""
    root, kept = logging.getLogger(), _Kept()
    root.addHandler(kept)
    logger = logging.getLogger("bmgpt_jax")
    before = (logger.level, logger.propagate, list(logger.handlers))
    try:
        with logs.to_stderr():
            logging.getLogger("bmgpt_jax.train").info("resumed from step %d (%s)", 40, "ckpts")
            logging.getLogger("bmgpt_jax.data.records").warning("skipped 5 bad record(s)")
            logging.getLogger("bmgpt_jax.train").debug("traceback")
        logging.getLogger("bmgpt_jax.train").warning("after")
    finally:
        root.removeHandler(kept)
    assert capsys.readouterr().err.splitlines() == ["resumed from step 40 (ckpts)", "skipped 5 bad record(s)"]
    assert [r.getMessage() for r in kept.records] == ["after"]
    assert (logger.level, logger.propagate, list(logger.handlers)) == before
