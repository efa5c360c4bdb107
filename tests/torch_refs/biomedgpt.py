"""The PyTorch reference BioMedGPT for parity tests: transformers' LlamaForCausalLM and EsmModel, the
plain-torch GIN and two nn.Linear, with OpenBioMed's attribute names (so `state_dict()` is exactly the
flat `biomedgpt_10b.pth` layout: the Llama's layers carry OpenBioMed's persistent `rotary_emb.inv_freq`,
`UpstreamRotary`, and the ESM its pooler and contact head), and a forward that splices one example the
way the reference's `_prompt_wrap` / `Conversation` does: BOS, then each text piece between placeholders
tokenized without special tokens, each placeholder replaced by that entity's projected features, then
answer + EOS.
"""
from __future__ import annotations

import re

import numpy as np
import torch
from torch import nn

from bmgpt_jax.data import molecules, proteins
from bmgpt_jax.data.text import format_prompt
from tests.torch_refs.gin import TorchGIN
from tests.torch_refs.hf_esm import random_esm

PATTERN = re.compile("<moleculeHere>|<proteinHere>")


class UpstreamRotary(nn.Module):
    """OpenBioMed modeling_llama's `LlamaRotaryEmbedding` as its state dict sees it: `inv_freq` a persistent
    buffer, computed as there (base 10000; the cos/sin caches are not persistent). The forward is
    transformers' Llama's, whose model-level rotary computes the same frequencies."""

    def __init__(self, dim: int, base: int = 10000):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim)))


class TorchBioMedGPT(nn.Module):
    def __init__(self, esm_cfg, vocab_size: int, hidden: int = 64, layers: int = 2, gin_layers: int = 2,
                 gin_dim: int = 16, seed: int = 0):
        super().__init__()
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(seed)
        self.mol_structure_encoder = TorchGIN(gin_layers, gin_dim).eval()
        with torch.no_grad():  # non-trivial BatchNorm statistics
            for bn in self.mol_structure_encoder.batch_norms:
                bn.running_mean.normal_(0, 0.3)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.normal_(1, 0.2)
                bn.bias.normal_(0, 0.2)
        self.prot_structure_encoder = random_esm(esm_cfg, seed=seed)
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden + 16,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=1024, initializer_range=0.1, attn_implementation="eager")
        self.llm = LlamaForCausalLM(cfg).eval()
        for layer in self.llm.model.layers:
            layer.self_attn.rotary_emb = UpstreamRotary(hidden // cfg.num_attention_heads)
        self.proj_mol = nn.Linear(gin_dim, hidden)
        self.proj_prot = nn.Linear(esm_cfg.hidden_size, hidden)

    def llm_config(self) -> dict:
        return self.llm.config.to_dict()

    @torch.no_grad()
    def reference_forward(self, tok, record, answer_ids=None):
        """Logits `[1, t, vocab]` and the target mask `[t]` (answer + EOS) of one example. `answer_ids`: these
        token ids after the prompt instead of the answer's tokens + EOS (`record.answer` still ends the prompt)."""
        emb = self.llm.get_input_embeddings()
        text = format_prompt(record)
        pieces, holes = PATTERN.split(text[: -len(record.answer)] if record.answer else text), PATTERN.findall(text)
        parts = [emb(torch.tensor([[tok.bos_id]]))]
        entities = iter(record.entities)
        for j, piece in enumerate(pieces):
            parts.append(emb(torch.tensor([tok.encode(piece)], dtype=torch.long)))
            if j < len(holes):
                kind, value = next(entities)
                if kind == "molecule":
                    x, ei, ea = (torch.from_numpy(np.asarray(a)).long() for a in molecules.featurize(value))
                    feats = self.proj_mol(self.mol_structure_encoder(x, ei, ea))
                else:
                    ids, mask = proteins.tokenize([value])
                    out = self.prot_structure_encoder(torch.from_numpy(ids).long(),
                                                      attention_mask=torch.from_numpy(mask).long())
                    feats = self.proj_prot(out.last_hidden_state[0])
                parts.append(feats[None])
        answer = tok.encode(record.answer) + [tok.eos_id] if answer_ids is None else list(answer_ids)
        parts.append(emb(torch.tensor([answer])))
        embeds = torch.cat(parts, dim=1)
        logits = self.llm(inputs_embeds=embeds).logits
        target = np.zeros(embeds.shape[1], np.int32)
        target[-len(answer):] = 1
        return logits.numpy(), target, np.asarray(answer)
