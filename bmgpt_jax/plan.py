"""`python -m bmgpt_jax.plan`: ahead-of-time memory plan of a real-size job (`bmgpt_jax.training.plan`)."""
import sys

from bmgpt_jax.training.plan import main

if __name__ == "__main__":
    sys.exit(0 if main() else 1)  # main returns the plans; printing them again would be noise
