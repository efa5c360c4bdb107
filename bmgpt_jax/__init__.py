"""bmgpt_jax: BioMedGPT (molecules, proteins and text in one GPT) in JAX/Flax NNX."""

__version__ = "0.1.0"
