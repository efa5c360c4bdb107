"""The paper-style report: our metrics beside the BioMedGPT paper's published figures, as a printed table
and a bar chart (matplotlib, Agg backend, so it runs without a display).

Published figures (Luo et al. 2023, "BioMedGPT: Open Multimodal Generative Pre-trained Transformer for
BioMedicine", arXiv:2308.09442), as fractions, keyed by our source name:
- PubChemQA (test): BioMedGPT-10B after its multimodal training, which includes PubChemQA's training
  split: BLEU-2 0.234, BLEU-4 0.141, ROUGE-L 0.332, METEOR 0.308.
- PubMedQA (the 500-question test split): 76.1% and MedMCQA (dev, our `validation`): 51.4% accuracy of
  BioMedGPT-10B, both after fine-tuning on the task's own training split.
Every published figure above is a fine-tuned one; a model not trained on those training splits is not
expected to reach them.
"""
from __future__ import annotations

from pathlib import Path

PAPER: dict[str, dict] = {
    "pubchemqa": {"model": "BioMedGPT-10B", "split": "test", "fine_tuned": True,
                  "setting": "multimodal training incl. PubChemQA train",
                  "metrics": {"bleu2": 0.234, "bleu4": 0.141, "rougeL": 0.332, "meteor": 0.308}},
    "pubmedqa": {"model": "BioMedGPT-10B", "split": "test", "fine_tuned": True,
                 "setting": "fine-tuned on PubMedQA train", "metrics": {"accuracy": 0.761}},
    "medmcqa": {"model": "BioMedGPT-10B", "split": "validation", "fine_tuned": True,
                "setting": "fine-tuned on MedMCQA train", "metrics": {"accuracy": 0.514}},
}
COLUMNS = ("n", "skipped", "accuracy", "ll_accuracy", "ll_accuracy_norm", "extraction_failures", "bleu2", "bleu4",
           "meteor", "rouge1", "rouge2", "rougeL", "exact_match")
FRACTIONS = ("accuracy", "ll_accuracy", "ll_accuracy_norm", "bleu2", "bleu4", "meteor", "rouge1", "rouge2", "rougeL",
             "exact_match")


def paper_row(source: str) -> dict | None:
    """The published row for a source spec (`name:split`), or None: only for the split the paper reported on
    (`pubmedqa:train` is not the paper's PubMedQA test set). A spec without a split means the source's first
    split, as `DataConfig.sources` reads it (`medmcqa` is `medmcqa:validation`, `pubmedqa` `pubmedqa:train`)."""
    name, _, split = source.partition(":")
    row = PAPER.get(name)
    if row is None:
        return None
    from bmgpt_jax.data.builders import default_split
    return row if (split or default_split(name)) == row["split"] else None


def paper_label(row: dict) -> str:
    return f"  paper: {row['model']} ({'fine-tuned' if row['fine_tuned'] else 'zero-shot'})"


def format_table(metrics: dict[str, dict]) -> str:
    """One line per source, one column per metric any source has (`-` where it has none); under a source
    with a published figure, the paper's line (its `split` and `setting` are in metrics.json)."""
    rows = []
    for src, m in metrics.items():
        rows.append((src, m))
        if paper_row(src):
            rows.append((paper_label(paper_row(src)), paper_row(src)["metrics"]))
    cols = [c for c in COLUMNS if any(c in m for _, m in rows)]
    width = max([len(name) for name, _ in rows] + [6])
    cell = lambda v: "-" if v is None else str(v) if isinstance(v, int) else f"{v:.4f}"  # noqa: E731
    lines = [f"{'source':<{width}}  " + "  ".join(f"{c:>{max(len(c), 6)}}" for c in cols)]
    for name, m in rows:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{cell(m.get(c)):>{max(len(c), 6)}}" for c in cols))
    return "\n".join(lines)


def bar_chart(metrics: dict[str, dict], path: str | Path) -> Path:
    """One panel per source: a bar per fractional metric, ours beside the paper's where published."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = [(src, [k for k in FRACTIONS if k in m]) for src, m in metrics.items()]
    panels = [(src, keys) for src, keys in panels if keys] or [("(no scored records)", [])]
    fig, axes = plt.subplots(1, len(panels), figsize=(max(4.0, 3.2 * len(panels)), 3.6), squeeze=False)
    for ax, (src, keys) in zip(axes[0], panels):
        paper = (paper_row(src) or {}).get("metrics", {})
        shift = [0.2 if k in paper else 0.0 for k in keys]          # side by side only where both exist
        ax.bar([i - d for i, d in enumerate(shift)], [metrics[src][k] for k in keys], width=0.4, label="ours")
        if paper:
            both = [i for i, k in enumerate(keys) if k in paper]
            ax.bar([i + 0.2 for i in both], [paper[keys[i]] for i in both], width=0.4,
                   label=f"{paper_row(src)['model']} (paper, fine-tuned)")
        ax.set_xticks(range(len(keys)), keys, rotation=45, ha="right")
        ax.set_ylim(0, 1)
        ax.set_title(src)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
