"""`--resume` holds one copy of what a checkpoint holds: the trainable parameters and their optimizer state
are restored into an abstract target, never first created (randomly, or read from the `init` weights)
only to be overwritten; the frozen parameters, which a checkpoint does not hold, still come from `init`."""
import gc

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax.data.text import load_tokenizer
from bmgpt_jax.training import loop as train
from bmgpt_jax.training.checkpoint import Checkpointer
from bmgpt_jax.training.optim import trainable_filter
from bmgpt_jax.training.stages import trainable_patterns
from tests.training.runs import cfg_for, params
from tests.training.test_stages import tiny_lm_folder


def live_bytes() -> int:
    """Bytes of every jax array alive in this process (garbage collected first)."""
    gc.collect()
    return sum(a.nbytes for a in jax.live_arrays())


def frozen_params(cfg: train.TrainConfig, model: nnx.Module) -> dict[str, np.ndarray]:
    """The run's frozen parameters (the `Param`s its trainable filter leaves out), by dotted path."""
    trains = trainable_filter(trainable_patterns(cfg.stage, cfg.model, cfg.trainable))
    return params(model, nnx.All(nnx.Param, nnx.Not(trains)))


@pytest.mark.parametrize("setup", ["lm", "lm_from_hf_llama", "lora_from_hf_llama"])
def test_resume_holds_one_copy_of_the_restored_state(tmp_path, monkeypatch, setup):
    """Live device bytes while `restore_intact` runs, over those before the resumed run: when the restore
    starts only the frozen state exists (the `lm` stage trains every parameter: nothing but RNG state),
    and it adds exactly the restored trainable + optimizer state. Before the fix the trainable and
    optimizer state were built (or read from the HF folder) first, so the restore started with one copy
    and ended with two. The frozen weights are the init's (LoRA: the HF base, [PAD] row grown), as in the
    run that saved the checkpoint."""
    extra = ["stage=finetune", "model.lm.lora_rank=4", "trainable=[]"] if setup.startswith("lora") else ["stage=lm"]
    if setup.endswith("hf_llama"):
        extra.append(f"init.hf_llama={tiny_lm_folder(tmp_path / 'llama', load_tokenizer('').pad_id)}")
    cfg = cfg_for(tmp_path, *extra, "steps=2", "mesh=[1,4,2]")
    first = train.run(cfg)
    frozen_before = frozen_params(cfg, first["model"])
    assert bool(frozen_before) == setup.startswith("lora")
    del first

    seen = {}
    restore_intact = Checkpointer.restore_intact

    def measured(self, target):
        seen["at start"] = live_bytes() - outside
        out = restore_intact(self, target)
        seen["restored"] = sum(x.nbytes for x in jax.tree.leaves(out[0]))
        seen["at end"] = live_bytes() - outside
        return out

    monkeypatch.setattr(Checkpointer, "restore_intact", measured)
    cfg = cfg_for(tmp_path, *extra, "steps=3", "mesh=[1,4,2]")
    frozen_bytes = sum(x.nbytes for x in frozen_before.values())
    outside = live_bytes()
    resumed = train.run(cfg, resume=True)
    assert sorted(resumed["losses"]) == [3] and np.isfinite(resumed["losses"][3])
    slack = 4096                                  # RNG keys and counters, the frozen non-Param state
    assert frozen_bytes <= seen["at start"] <= frozen_bytes + slack, seen
    assert seen["at end"] - seen["at start"] == seen["restored"], seen
    frozen_after = frozen_params(cfg, resumed["model"])
    assert frozen_after.keys() == frozen_before.keys()
    assert all(np.array_equal(frozen_after[k], frozen_before[k]) for k in frozen_before)
