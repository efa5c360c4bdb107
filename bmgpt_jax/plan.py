"""`python -m bmgpt_jax.plan`: ahead-of-time memory plan of a real-size job (`bmgpt_jax.training.plan`)."""
from bmgpt_jax.training.plan import main

if __name__ == "__main__":
    main()  # exits non-zero (SystemExit) on bad input; returns the plans otherwise
