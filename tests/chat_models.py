"""A random tiny BioMedGPT with the demo tokenizer, for the chat and evaluation tests (no shared data or
torch needed)."""
import dataclasses

from flax import nnx

from bmgpt_jax import config as config_lib
from bmgpt_jax.data.text import attach_tokenizer, load_tokenizer
from bmgpt_jax.models.biomedgpt import BioMedGPT, BioMedGPTConfig
from bmgpt_jax.models.esm import EsmConfig
from bmgpt_jax.models.gin import GinConfig
from bmgpt_jax.models.llama import LlamaConfig


def demo_biomedgpt():
    demo = load_tokenizer(None)
    lm = dataclasses.replace(config_lib.load(LlamaConfig, "llama_tiny"), vocab_size=demo.vocab_size,
                             pad_token_id=demo.pad_id)
    cfg = BioMedGPTConfig(lm=lm, gin=config_lib.load(GinConfig, "gin_tiny"), esm=config_lib.load(EsmConfig, "esm2_tiny"))
    return attach_tokenizer(BioMedGPT(cfg, rngs=nnx.Rngs(1)), demo)
