"""The data tests' pipeline settings (test_pipeline.py, test_workers.py)."""
import pytest

from bmgpt_jax.data.pipeline import DataConfig


@pytest.fixture(scope="module")
def cfg(shared_data):
    """The demo set's first 40 molecules, the Llama 2 tokenizer, small buckets and budgets, windows of 3."""
    return DataConfig(sources=("demo",), demo_molecules=40, tokenizer=str(shared_data / "tokenizer" /
                      "llama2_tokenizer.model"), batch_size=8, seq_buckets=(96, 112, 128, 256), window_batches=3,
                      node_budget=512, edge_budget=1024, graph_budget=16, protein_budget=8, seed=3)
