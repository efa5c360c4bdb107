"""Convert and check PyTorch / Hugging Face checkpoints and training runs: the command line of a checkout,
kept at the top of the repository. Its body is `bmgpt_jax.convert.cli`, which an installed package runs as
`python -m bmgpt_jax.convert` or `bmgpt-convert`; `--help` lists the kinds."""
import sys

from bmgpt_jax.convert import cli


def main(argv=None) -> int:
    """`bmgpt_jax.convert.cli.main`, naming itself convert_weights.py in usage and errors."""
    return cli.main(argv, prog="convert_weights.py")


if __name__ == "__main__":
    sys.exit(main())
