"""Evaluation building blocks behind `python -m bmgpt_jax.evaluate` (see docs/evaluate.md).

sources: a source's records, and what its dataset's build left out of them.
text_metrics: MolT5's BLEU / METEOR / ROUGE protocol (nltk, rouge-score, SciBERT word pieces).
choices: reading the chosen option out of generated text, and the options scored by log-likelihood.
batches: one static-shape batch per step that every process agrees on, sharded over the mesh.
scoring: the model placed on the mesh; jitted option log-likelihoods and prompt embeddings.
passes: records encoded as prompts, the generation pass and the log-likelihood pass over them.
metrics: one source's metrics (accuracy, log-likelihood accuracy, text metrics, skipped) from its rows.
report: the paper's published figures, the printed table and the bar chart.
"""
