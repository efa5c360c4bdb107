"""The PyTorch side of bench/train_step.py: the reference composition trained on the pipeline's batch dict.

`build_reference(model_cfg)` is tests/torch_refs/biomedgpt.py's `TorchBioMedGPT` (HF EsmModel, plain-torch
GIN, two nn.Linear) with its decoder replaced by an HF `LlamaForCausalLM` of exactly `model_cfg.lm`'s
shape (SDPA attention, PyTorch's fastest CPU path). `batched_loss(ref, batch)` is the batched forward the
reference never had, written against docs/batch_format.md: GIN over the padded graph, ESM over the padded
proteins, both projected and written into the flattened `[B*T, D]` token embeddings with `index_copy` at
`mol_slot` / `prot_slot`, the decoder with the attention mask, next-token NLL summed over `loss_mask`.
`TorchStep` is one optimizer step: AdamW (decay on matrices only), the same warmup-cosine schedule, global
norm clipping; frozen parameters have `requires_grad_(False)`, so they get no gradient and no Adam state.
"""
from __future__ import annotations

import re
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def build_reference(model_cfg, seed: int = 0):
    """`TorchBioMedGPT` for `model_cfg` (a BioMedGPTConfig), in eval mode (no dropout; GIN BatchNorm uses
    its running statistics, as our train step does); the ESM pooler and contact head (unused by
    BioMedGPT) removed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from bmgpt_jax.convert.hf_llama import config_to_hf
    from tests.torch_refs.biomedgpt import TorchBioMedGPT

    lm = model_cfg.lm
    ref = TorchBioMedGPT(model_cfg.esm, vocab_size=lm.vocab_size, hidden=lm.hidden_size, layers=1,
                         gin_layers=model_cfg.gin.num_layers, gin_dim=model_cfg.gin.emb_dim, seed=seed)
    hf = {k: v for k, v in config_to_hf(lm).items() if k not in ("architectures", "model_type", "torch_dtype", "dtype")}
    hf["pad_token_id"] = None  # no nn.Embedding padding_idx (whose row gets no gradient): ours has none
    torch.manual_seed(seed + 1)
    ref.llm = LlamaForCausalLM(LlamaConfig(**hf, attn_implementation="sdpa")).float()
    ref.prot_structure_encoder.pooler = None        # neither is part of BioMedGPT (nor of our Esm)
    ref.prot_structure_encoder.contact_head = None
    return ref.eval()


def to_torch(batch: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """The numpy batch as int64 tensors (embedding / index_add / index_copy indices)."""
    return {k: torch.from_numpy(np.asarray(v, dtype=np.int64)) for k, v in batch.items()}


def _splice(flat: torch.Tensor, slots: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    keep = (slots >= 0).nonzero().squeeze(1)
    return flat.index_copy(0, slots[keep], values[keep].to(flat.dtype))


def batched_loss(ref, tb: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed answer-token NLL, token count) of one padded batch, as `BioMedGPT.loss` computes it."""
    ids = tb["input_ids"]
    b, t = ids.shape
    flat = ref.llm.get_input_embeddings()(ids).reshape(b * t, -1)
    if tb["mol_atoms"].shape[0]:
        edge_index = torch.stack([tb["mol_senders"], tb["mol_receivers"]])
        nodes = ref.mol_structure_encoder(tb["mol_atoms"], edge_index, tb["mol_bonds"])
        flat = _splice(flat, tb["mol_slot"], ref.proj_mol(nodes))
    if tb["prot_ids"].shape[0]:
        # HF's ESM token-dropout rescaling divides by the real length: 0/0 = NaN on an all-padding protein
        # row (ours guards it). Marking position 0 real keeps that row finite; its outputs are dropped anyway.
        mask = tb["prot_mask"].clone()
        mask[:, 0] = 1
        states = ref.prot_structure_encoder(tb["prot_ids"], attention_mask=mask).last_hidden_state
        prot = ref.proj_prot(states)
        flat = _splice(flat, tb["prot_slot"].reshape(-1), prot.reshape(-1, prot.shape[-1]))
    hidden = ref.llm.model(inputs_embeds=flat.reshape(b, t, -1), attention_mask=tb["attention_mask"]).last_hidden_state
    # positions 0..T-2 as one contiguous [B*(T-1), D] matrix: the vocabulary projection is then a single
    # GEMM (on the strided [:, :-1] view torch falls back to a 2x slower batched matmul)
    logits = ref.llm.lm_head(hidden[:, :-1].reshape(b * (t - 1), -1)).float()
    weights = (tb["loss_mask"][:, 1:] * tb["attention_mask"][:, 1:]).float().reshape(-1)
    nll = F.cross_entropy(logits, ids[:, 1:].reshape(-1), reduction="none")
    return (nll * weights).sum(), weights.sum()


class TorchStep:
    """`step(numpy_batch) -> loss` (token mean, a float): forward, backward, clip, AdamW, schedule."""

    def __init__(self, ref, patterns: Sequence[str], optim_cfg, schedule: Callable[[int], float]):
        regexes = [re.compile(p) for p in patterns]
        self.ref = ref
        self.params = []
        for name, p in ref.named_parameters():
            p.requires_grad_(any(r.search(name) for r in regexes))
            if p.requires_grad:
                self.params.append(p)
        groups = [{"params": [p for p in self.params if p.ndim >= 2], "weight_decay": optim_cfg.weight_decay},
                  {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=optim_cfg.lr, betas=(optim_cfg.b1, optim_cfg.b2), eps=optim_cfg.eps)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda n: float(schedule(n)) / optim_cfg.lr)
        self.clip = optim_cfg.clip_norm

    def num_trainable(self) -> int:
        return sum(p.numel() for p in self.params)

    def __call__(self, batch: Mapping[str, np.ndarray]) -> float:
        self.opt.zero_grad(set_to_none=True)
        loss_sum, n = batched_loss(self.ref, to_torch(batch))
        loss = loss_sum / n.clamp(min=1.0)
        loss.backward()
        if self.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.params, self.clip)
        self.opt.step()
        self.sched.step()
        return loss.item()
