"""Training: the loop (`python -m bmgpt_jax.train`), stages, the sharded step, optimizer, checkpoints,
monitoring and the ahead-of-time memory plan."""
