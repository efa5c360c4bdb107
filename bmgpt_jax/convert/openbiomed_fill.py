"""The tensors OpenBioMed's `BioMedGPTV` state dict holds besides our BioMedGPT's, computed for a `.pth`
whose source had none of them, so that OpenBioMed's strict `model.load_state_dict(torch.load(...))`
(`open_biomed/utils/chat_utils.py`, `examples/biomedgpt_inference.ipynb`) accepts it.

`BioMedGPTV` (`open_biomed/models/multimodal/biomedgpt/biomedgpt.py`) builds `llm` from OpenBioMed's own
`modeling_llama.py`, whose `LlamaRotaryEmbedding` registers `inv_freq` as a persistent buffer in every
layer (`llm.model.layers.{i}.self_attn.rotary_emb.inv_freq`), and `prot_structure_encoder` as
`transformers.EsmModel(config)`, whose state dict holds besides the encoder the pooler
(`pooler.dense.{weight,bias}`: `add_pooling_layer` defaults to True), the contact head
(`contact_head.regression.{weight,bias}`) and rotary buffers named as the installed transformers names
them (5.x: one `rotary_embeddings.inv_freq`; older: one per layer, plus `embeddings.position_ids`). The
ESM's keys are read off an `EsmModel(config)` built on torch's meta device (no memory, no values) in the
exporting environment, so the file fits the transformers that loads it there.

Values: each buffer as its module computes it, with torch's own arithmetic (`inv_freq = 1.0 / (theta **
(torch.arange(0, head_dim, 2).float() / head_dim))`, float32: theta is the Llama's `rope_theta`, 10000
in BioMedGPT, and ESM-2's 10000; `position_ids` the arange); every other tensor (the pooler and contact
head, which BioMedGPT's forward never calls) zeros in the ESM's dtype. `note` is the one line that
names them once the file is written.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from bmgpt_jax.convert.tensor_source import Index, TensorSource, normalize_index
from bmgpt_jax.models.esm import ROPE_THETA, EsmConfig
from bmgpt_jax.models.llama import LlamaConfig

Make = Callable[[], np.ndarray]


class Filled(TensorSource):
    """Tensors computed when read: `entries` maps each key to `(shape, dtype, make, zero)`."""

    name = "computed for OpenBioMed's strict load"

    def __init__(self, entries: dict[str, tuple[tuple, np.dtype, Make, bool]]):
        self.entries = entries

    def keys(self) -> list[str]:
        return list(self.entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self.entries[key][0]

    def dtype(self, key: str) -> np.dtype:
        return self.entries[key][1]

    def read(self, key: str, index: Index = None) -> np.ndarray:
        shape, _, make, _ = self.entries[key]
        return np.array(make()[normalize_index(index, shape, key)])

    def zeros(self) -> list[str]:
        """The keys filled with zeros (not buffers)."""
        return [k for k, e in self.entries.items() if e[3]]


def inv_freq(theta: float, dim: int) -> np.ndarray:
    """The rotary `inv_freq` buffer of `dim`-wide heads, computed by torch as the modules compute it."""
    import torch
    return (1.0 / (theta ** (torch.arange(0, dim, 2).float() / dim))).numpy()


def esm_state(esm: EsmConfig) -> dict[str, tuple[tuple, np.dtype]]:
    """`key -> (shape, dtype)` of the state dict of the installed transformers' `EsmModel` for `esm`."""
    import torch
    import transformers

    from bmgpt_jax.convert import hf_esm
    from bmgpt_jax.convert.tensor_source import to_numpy
    with torch.device("meta"):
        model = transformers.EsmModel(transformers.EsmConfig(**hf_esm.config_to_hf(esm)))
    return {k: (tuple(t.shape), to_numpy(torch.empty(0, dtype=t.dtype)).dtype) for k, t in model.state_dict().items()}


def _esm_entry(key: str, shape: tuple, dtype: np.dtype, esm: EsmConfig, float_dtype) -> tuple:
    if key.endswith("inv_freq"):
        dim = esm.hidden_size // esm.num_heads
        if shape != (dim // 2,):
            raise ValueError(f"transformers' EsmModel has {key} of shape {shape}, not ({dim // 2},): a rotary "
                             "layout this exporter does not know")
        return shape, np.dtype(np.float32), lambda: inv_freq(ROPE_THETA, dim), False
    if key.endswith("position_ids"):
        return shape, dtype, lambda: np.broadcast_to(np.arange(shape[-1], dtype=dtype), shape), False
    out = np.dtype(float_dtype) if np.issubdtype(dtype, np.floating) else dtype
    return shape, out, lambda: np.zeros(shape, out), True


def tensors(lm: LlamaConfig, esm: EsmConfig, have: Iterable[str], float_dtype, llm_prefix: str = "llm.",
            esm_prefix: str = "prot_structure_encoder.") -> Filled:
    """The tensors of BioMedGPTV's state dict for these configs that are not in `have` (our layout's keys):
    the Llama's per-layer `inv_freq`, then the ESM's keys our encoder lacks (zeros in `float_dtype`)."""
    have = set(have)
    dim = lm.dim_per_head
    entries = {f"{llm_prefix}model.layers.{i}.self_attn.rotary_emb.inv_freq":
               ((dim // 2,), np.dtype(np.float32), lambda: inv_freq(lm.rope_theta, dim), False)
               for i in range(lm.num_layers)}
    for key, (shape, dtype) in esm_state(esm).items():
        if esm_prefix + key not in have:
            entries[esm_prefix + key] = _esm_entry(key, shape, dtype, esm, float_dtype)
    return Filled(entries)


def note(filled: Filled, dst) -> str:
    """The one line saying what the file `dst` got that no source had: the zeros by name, the buffers
    counted (the file named without its folder: a model folder's is still a temporary one)."""
    zeros = filled.zeros()
    buffers = [k for k in filled.keys() if k not in zeros]
    return (f"{Path(dst).name}: filled {len(zeros)} tensor(s) with zeros because no source had them (never used by "
            f"BioMedGPT; present so that OpenBioMed's strict load_state_dict accepts the file): {', '.join(zeros)}; "
            f"and computed {len(buffers)} deterministic buffer(s) (rotary inv_freq, position_ids)")
