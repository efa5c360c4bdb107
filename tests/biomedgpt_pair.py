"""The tiny BioMedGPT pair the parity tests compare: the independent PyTorch reference composition
(tests/torch_refs/biomedgpt.py, ESM-2 tiny) and ours converted from its state dict."""
from bmgpt_jax import config as config_lib
from bmgpt_jax.convert import openbiomed
from bmgpt_jax.models.esm import EsmConfig
from tests.torch_refs.hf_esm import hf_config


def tiny_pair(vocab_size: int):
    """(reference in eval mode, our BioMedGPT with the same weights) for a `vocab_size` tokenizer."""
    from tests.torch_refs.biomedgpt import TorchBioMedGPT
    esm = config_lib.load(EsmConfig, "esm2_tiny")
    ref = TorchBioMedGPT(esm, vocab_size=vocab_size).eval()
    return ref, openbiomed.from_state_dict(ref.state_dict(), ref.llm_config(), hf_config(esm).to_dict())
