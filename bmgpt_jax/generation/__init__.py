"""Generation for our causal LM: options and logit processors (`options`), the jitted greedy/sampling loop
(`sampling`), beam search (`beam`). Imports downwards only (models)."""
from bmgpt_jax.generation.beam import beam_search
from bmgpt_jax.generation.options import GenerationConfig
from bmgpt_jax.generation.sampling import generate

__all__ = ["GenerationConfig", "beam_search", "generate"]
