"""`python -m bmgpt_jax.train [--config FILE] [--resume] [key=value ...]`: the training entry point.

LM pretraining, alignment and fine-tuning (`configs/`); the loop is `bmgpt_jax.training.loop`.
"""
import sys

from bmgpt_jax.training.loop import main

if __name__ == "__main__":
    sys.exit(main())
