"""`python -m bmgpt_jax.convert`: the converters' command line (`convert_weights.py` of a checkout), for an
installed package, which does not carry the repository's top-level script."""
import sys

from bmgpt_jax.convert import cli

sys.exit(cli.main(prog="python -m bmgpt_jax.convert"))
