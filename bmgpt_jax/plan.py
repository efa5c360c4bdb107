"""`python -m bmgpt_jax.plan`: ahead-of-time memory plan of a real-size job (`bmgpt_jax.training.plan`)."""
import sys

from bmgpt_jax.training.plan import main

if __name__ == "__main__":
    try:
        main()  # returns the plans; bad input raises SystemExit with its one-line message
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code if e.code.startswith("plan: ") else f"plan: {e.code}", file=sys.stderr)
        sys.exit(2)   # the status of the other commands' bad input
