"""Every shipped training config's batch budgets carry a full batch of real examples.

Stand-ins for PubChemQA / UniProtQA (not available offline): ChEBI-20 molecules with their descriptions
and the Swiss-Prot function pairs from the shared sample data, encoded by the pipeline's `encode_example`
with each config's own tokenizer, buckets and caps (the 10B configs' tokenizer is BioMedGPT-LM's, i.e.
Llama 2's: the shared `llama2_tokenizer.model`). Batches are formed as the pipeline forms them: windows
sorted by length, cut into runs of `batch_size` rows (one process holding the whole batch), for windows
of molecules only, proteins only and half and half. At least 99% of those batches must fit.
"""
import functools
from pathlib import Path

import numpy as np
import pytest

from bmgpt_jax import config
from bmgpt_jax.data.examples import Budget
from bmgpt_jax.data.text import load_tokenizer
from bmgpt_jax.training import budgets
from bmgpt_jax.training.loop import TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TRAINING = sorted(p.stem for p in CONFIGS.glob("*.yaml") if p.stem.startswith(("tiny", "biomedgpt_10b_")))


def test_the_training_configs_are_all_listed():
    """Every YAML that loads as a training config is one of TRAINING (so none escapes the check below)."""
    for path in CONFIGS.glob("*.yaml"):
        if path.stem in TRAINING:
            continue
        with pytest.raises(config.ConfigError):
            config.load(TrainConfig, path)
    assert {"tiny", "tiny_align", "biomedgpt_10b_lm", "biomedgpt_10b_align", "biomedgpt_10b_finetune"} <= set(TRAINING)


@functools.lru_cache(maxsize=None)
def standins():
    return budgets.standin_records(n_molecules=1500, seed=0)


@functools.lru_cache(maxsize=None)
def costs(tokenizer: str, options):
    mols, prots = standins()
    tok = load_tokenizer(tokenizer)
    return budgets.example_costs(mols, tok, options), budgets.example_costs(prots, tok, options)


@pytest.mark.parametrize("name", TRAINING)
def test_full_batches_fit_the_budgets(name, shared_data):
    cfg = load_config(name)
    d = cfg.data
    if set(d.sources) == {"text"}:
        pytest.skip("plain text only: no example takes graph or protein budget")
    tokenizer = "" if not d.tokenizer else str(shared_data / "tokenizer" / "llama2_tokenizer.model")
    (mols, m_skip), (prots, p_skip) = costs(tokenizer, budgets.encode_options(cfg))
    budget = Budget(d.batch_size, d.node_budget, d.edge_budget, d.graph_budget, d.protein_budget)
    for mix, frac in budgets.MIXES.items():
        sums = budgets.sorted_batch_costs(mols, prots, d.batch_size, d.window_batches, molecule_fraction=frac,
                                          windows=max(8, 1024 // d.window_batches))
        rate = budgets.fit_rate(sums, budget)
        assert rate >= 0.99, f"{name}: {mix}: only {rate:.1%} of full batches fit {budget}"
    if name.startswith("biomedgpt_10b"):  # real lengths: nothing beyond the longest bucket but a rare outlier
        assert sum(m_skip.values()) == 0 and sum(p_skip.values()) <= 0.01 * len(standins()[1]), (m_skip, p_skip)


def test_the_old_10b_budgets_dropped_most_batches(shared_data):
    """The budgets the 10B configs shipped with (64 rows against 16 proteins, 64 graphs, 4,096 nodes) fit no
    all-protein and no all-molecule batch: the check above can fail."""
    cfg = load_config("biomedgpt_10b_align")
    (mols, _), (prots, _) = costs(str(shared_data / "tokenizer" / "llama2_tokenizer.model"), budgets.encode_options(cfg))
    old = Budget(64, 4096, 9216, 64, 16)
    for frac in (0.0, 1.0):
        sums = budgets.sorted_batch_costs(mols, prots, 64, 16, molecule_fraction=frac, windows=8)
        assert budgets.fit_rate(sums, old) == 0.0


def test_required_budgets_round_up_and_count_the_padding_graph():
    sums = np.array([[0, 100, 200, 3, 2], [0, 127, 130, 63, 64]])
    assert budgets.required_budgets(sums, 1.0) == {"node_budget": 128, "edge_budget": 256, "graph_budget": 64,
                                                   "protein_budget": 64}
    tight = budgets.required_budgets(np.array([[0, 128, 0, 64, 0]]), 1.0)
    assert tight["node_budget"] == 192 and tight["graph_budget"] == 128  # 128 nodes + 1 padding node, 65 graphs


def test_cli_prints_the_derivation(shared_data, capsys):
    rates = budgets.main(["--config", "biomedgpt_10b_finetune", "--tokenizer",
                          str(shared_data / "tokenizer" / "llama2_tokenizer.model"), "--molecules", "300",
                          "--windows", "20", "data.batch_size=64"])
    out = capsys.readouterr().out
    assert "biomedgpt_10b_finetune: 64 rows per process, window 16 batches" in out
    assert "ChEBI-20: 300 of 300 encode" in out and "Swiss-Prot: 140 of 141 encode" in out
    # the finetune config's budgets are for 16 rows: 64 proteins or 64 molecules do not fit them
    assert rates["proteins only"] == 0.0 and rates["molecules only"] < 0.5
    assert "needs {'node_budget'" in out


def test_cli_errors_are_one_line(tmp_path, capsys):
    with pytest.raises(SystemExit) as stop:
        budgets.cli(["--processes", "0"])
    assert stop.value.code == 2 and "argument --processes: 0 is not a positive integer" in capsys.readouterr().err
    assert budgets.cli(["--config", "tiny_algn"]) == 2
    assert capsys.readouterr().err.strip().startswith("budgets: ConfigError: config file 'tiny_algn' not found")
    assert budgets.cli(["--config", "tiny", "--tokenizer", str(tmp_path / "llama2_tokenizer.model")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("budgets: FileNotFoundError: ") and "llama2_tokenizer.model" in err and "\n" not in err
    assert err.endswith("(--tokenizer: a SentencePiece model, e.g. ../shared/data/tokenizer/llama2_tokenizer.model)")
