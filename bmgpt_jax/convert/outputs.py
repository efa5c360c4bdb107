"""The files our writers put in a model folder, in one table: the writers name their files from it and
`ours` tells an earlier output of ours (which a new write may replace) from anything else (which it must
not delete; `stream.check_destination`). A leaf module, so the writers and `stream` can all import it.
"""
from __future__ import annotations

from bmgpt_jax.convert.safetensors_io import SAFE_INDEX, SAFE_NAME, SHARD_RE

# our model folder (`convert.folder`): role -> file name
FOLDER_FILES = {"weights": SAFE_NAME, "pth": "biomedgpt_10b.pth", "lm": "llm_config.json",
                "esm": "esm_config.json", "gin": "gin_config.json", "tokenizer": "tokenizer.model"}
# what an HF Llama folder carries besides weights (`hf_llama.convert` copies them, `write` may add some)
HF_LLAMA_TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                            "added_tokens.json", "generation_config.json")
HF_LLAMA_FILES = ("config.json", *HF_LLAMA_TOKENIZER_FILES)
HF_ESM_FILES = ("config.json", "vocab.txt", "tokenizer_config.json")   # `hf_esm.save` / `convert`


def ours(name: str) -> bool:
    """Whether a file named `name` is one our folder writers produce: the safetensors (single, shards,
    index) and the files of the table above."""
    return (name in (SAFE_NAME, SAFE_INDEX, *FOLDER_FILES.values(), *HF_LLAMA_FILES, *HF_ESM_FILES)
            or SHARD_RE.fullmatch(name) is not None)
