"""Llama SentencePiece tokenizer and BioMedGPT's prompt template, encoded segment by segment.

The reference (OpenBioMed's BioMedGPT) writes one example as

    {system}### Human: <molecule><moleculeHere></molecule> {question} ### Assistant: {answer}

(`<protein><proteinHere></protein>` for a protein; with several entities each tag is a human turn of its
own, `### Human: <molecule>..</molecule> ### Human: <protein>..</protein> {question}`, as the reference's
`Conversation` builds it from one `append_*` per entity) and tokenizes the text between placeholders as
separate segments, with BOS only on the first. The placeholders become *entity slots*: positions whose
embeddings the model overwrites with projected atom / ESM-token features (docs/batch_format.md).
`encode_record` returns ids, loss mask and the start of each entity's slots.

Tokenizer: the Llama 2 SentencePiece model (32,000 pieces; unk 0, bos 1, eos 2) with `[PAD]` appended as
id 32,000 (vocabulary 32,001, as BioMedGPT-LM's). Without a model path, a small model is trained on the
demo set's text (deterministic; cached under `cache_dir("tokenizers")`) so a fresh clone runs offline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import os
from pathlib import Path

import numpy as np
import sentencepiece as spm

from .records import Record, cache_dir

DEFAULT_SYSTEM = ("You are working as an excellent assistant in chemistry and molecule discovery. Below a human "
                  "expert gives the representation of a molecule or a protein. Answer questions about it. ")
ENTITY_TAGS = {"molecule": ("<molecule>", "</molecule>"), "protein": ("<protein>", "</protein>")}
PLACEHOLDERS = {"molecule": "<moleculeHere>", "protein": "<proteinHere>"}
TURN = " ### Human: "    # between the human turns of several entities (the reference's one message each)
DEMO_VOCAB_SIZE = 1000
NOT_A_MODEL = "not a readable SentencePiece tokenizer model (another kind of file, truncated or corrupt)"


class Tokenizer:
    """A SentencePiece model plus an appended `[PAD]` id; picklable as its serialized model bytes."""

    def __init__(self, model_proto: bytes):
        self.model_proto = model_proto
        if not model_proto:                             # sentencepiece would accept it: a model failing later
            raise ValueError(f"{NOT_A_MODEL}: it is empty (0 bytes)")
        try:
            self.sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except (RuntimeError, OSError) as e:            # sentencepiece's C++ message, e.g. INTERNAL: ... (109)
            detail = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ValueError(f"{NOT_A_MODEL}: {detail}") from None
        if self.sp.get_piece_size() == 0:
            raise ValueError(f"{NOT_A_MODEL}: it holds no pieces")
        self.bos_id, self.eos_id, self.unk_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.unk_id()
        self.pad_id = self.sp.get_piece_size()          # `[PAD]`, appended after the model's pieces
        self.vocab_size = self.pad_id + 1

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        """The model in file `path`; ValueError naming `path` when it is not a SentencePiece model."""
        with open(path, "rb") as f:
            data = f.read()
        try:
            return cls(data)
        except ValueError as e:
            raise ValueError(f"{path} is {e}") from None

    def __reduce__(self):
        return (Tokenizer, (self.model_proto,))

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Ids of `text` (SentencePiece adds its dummy-prefix space, like HF's legacy LlamaTokenizer)."""
        ids = self.sp.encode(text) if text else []
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    def hf_config(self, model_max_length: int) -> dict:
        """`tokenizer_config.json` for this model's `tokenizer.model` in a Hugging Face folder, so that
        `transformers.AutoTokenizer.from_pretrained(folder)` encodes as `encode(text, bos=True)` does (BOS
        first, no EOS: HF's LlamaTokenizer read from a bare `tokenizer.model` adds no BOS) and knows `[PAD]`
        as id `pad_id` (its length is then `vocab_size`, the model's vocabulary). What remains is
        transformers' own: it splits runs of spaces otherwise than SentencePiece ("a  b"), and it skips a
        model's normaliser (the demo model's NFKC, which drops trailing spaces; Llama 2's has none)."""
        piece = self.sp.id_to_piece
        pad = {"content": "[PAD]", "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
               "special": True}
        return {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
                "bos_token": piece(self.bos_id), "eos_token": piece(self.eos_id), "unk_token": piece(self.unk_id),
                "pad_token": "[PAD]", "added_tokens_decoder": {str(self.pad_id): pad},
                "model_max_length": int(model_max_length), "clean_up_tokenization_spaces": False}

    def decode(self, ids) -> str:
        """Text of `ids`, dropping `[PAD]` and anything at or after the first EOS."""
        ids = [int(i) for i in ids]
        if self.eos_id in ids:
            ids = ids[:ids.index(self.eos_id)]
        return self.sp.decode([i for i in ids if 0 <= i < self.pad_id])


def train_tokenizer(texts: list[str], vocab_size: int = DEMO_VOCAB_SIZE) -> Tokenizer:
    """Train a byte-fallback BPE model on `texts`, deterministically (one thread, no sampling), cached by hash."""
    key = hashlib.sha256(("\n".join(texts) + f"|{vocab_size}|v1").encode()).hexdigest()[:16]
    path = cache_dir("tokenizers") / f"demo-{key}.model"
    if not path.exists():
        buf = io.BytesIO()
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(texts), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
            byte_fallback=True, hard_vocab_limit=False, num_threads=1, input_sentence_size=0,
            shuffle_input_sentence=False, character_coverage=1.0, split_digits=True,
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2)
        _write_atomic(path, buf.getvalue())
    return Tokenizer.from_file(path)


def _write_atomic(path: Path, data: bytes) -> None:
    """`data` to `path` through a temporary file: concurrent writers write identical bytes."""
    tmp = path.with_suffix(f".tmp{os.getpid()}-{id(data)}")
    tmp.write_bytes(data)
    tmp.replace(path)


def demo_tokenizer() -> Tokenizer:
    """The demo tokenizer: `train_tokenizer` on the system prompt, the prompt template and the demo train
    split's text. Also cached under a key of what makes that model (the NCI file, rdkit's and sentencepiece's
    versions, the source of the modules that make and train on the text), so that a process finds it
    without computing the ~45,000 demo answers first (1-3 s of each `python -m bmgpt_jax.train` start)."""
    import rdkit

    from . import demo, molecules, records
    key = hashlib.sha256(f"{rdkit.__version__}|{spm.__version__}|{DEMO_VOCAB_SIZE}".encode())
    for f in (demo.nci_smiles_path(), demo.__file__, molecules.__file__, records.__file__, __file__):
        key.update(Path(f).read_bytes())
    path = cache_dir("tokenizers") / f"demo-inputs-{key.hexdigest()[:16]}.model"
    if path.exists():
        return Tokenizer.from_file(path)
    template = "### Human: <molecule></molecule> <protein></protein> ### Assistant:"
    tok = train_tokenizer([DEFAULT_SYSTEM, template] + demo.demo_texts())
    _write_atomic(path, tok.model_proto)
    return tok


def load_tokenizer(path: str | None = None) -> Tokenizer:
    """The SentencePiece model at `path` (a `.model` file, or a folder holding exactly one), or (empty/None)
    the demo tokenizer trained on the demo text. A file that is not a SentencePiece model is a ValueError
    naming it (`Tokenizer.from_file`)."""
    if path:
        p = Path(path)
        if p.is_dir():
            models = sorted(p.glob("*.model"))
            if len(models) != 1:
                raise FileNotFoundError(f"tokenizer folder {p} must hold exactly one *.model file, found "
                                        f"{[m.name for m in models]}")
            p = models[0]
        return Tokenizer.from_file(p)
    return demo_tokenizer()


def as_tokenizer(tokenizer) -> Tokenizer:
    """A `Tokenizer`, or one loaded from a SentencePiece `.model` path or a folder holding one."""
    return tokenizer if isinstance(tokenizer, Tokenizer) else load_tokenizer(os.fspath(tokenizer))


def attach_tokenizer(model, tokenizer):
    """Give `model` its tokenizer (see `as_tokenizer`) for `chat.ask`. A plain attribute: static in
    `nnx.split`'s graphdef (hashed by identity), so params, jit and checkpoints are unaffected. Returns `model`."""
    tok = as_tokenizer(tokenizer)
    check_fits(tok, model.config.lm.vocab_size)
    model.tokenizer = tok
    return model


def check_fits(tok: Tokenizer, vocab: int, of: str = "the model") -> None:
    """ValueError unless every id of `tok` (`[PAD]` included) has a row among `of`'s `vocab` token rows."""
    if tok.vocab_size > vocab:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids ([PAD] included) but {of} has only {vocab} "
                         "token rows")


def tokenizer_of(model) -> Tokenizer:
    """The tokenizer attached to `model` (`attach_tokenizer`); ValueError when there is none."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("the model has no tokenizer: pass tokenizer= to openbiomed.load, use "
                         "convert.folder.from_pretrained, or call bmgpt_jax.data.text.attach_tokenizer(model, tokenizer)")
    return tok


@dataclasses.dataclass
class EncodedPrompt:
    """One example's text side, `t` positions: ids [t] (0 at entity slots), loss_mask [t], slot starts;
    `cut`: the tokens of a plain-text record cut away at `max_len` (counted by the pipeline)."""
    input_ids: np.ndarray
    loss_mask: np.ndarray
    slot_starts: list[int]
    cut: int = 0


def prompt_segments(record: Record, system: str = DEFAULT_SYSTEM) -> list[str | int]:
    """The prompt as text segments and entity indices, the answer last (text-only QA has no entity part).

    `["{system}### Human: <molecule>", 0, "</molecule> {question} ### Assistant: ", "{answer}"]`; each
    further entity starts a human turn of its own (`"</molecule> ### Human: <protein>", 1, ...`).
    """
    parts: list[str | int] = []
    text = f"{system}### Human: "
    closing = ""
    for i, (kind, _) in enumerate(record.entities):
        open_tag, close_tag = ENTITY_TAGS[kind]
        parts += [text + closing + (TURN if closing else "") + open_tag, i]
        text, closing = "", close_tag
    question = f" {record.question}" if closing else record.question
    parts += [f"{text}{closing}{question} ### Assistant: ", record.answer]
    return parts


def format_prompt(record: Record, system: str = DEFAULT_SYSTEM) -> str:
    """The prompt as one string with the reference's placeholders (for display and generation)."""
    return "".join(PLACEHOLDERS[record.entities[p][0]] if isinstance(p, int) else p
                   for p in prompt_segments(record, system))


def encode_record(tok: Tokenizer, record: Record, slot_lengths: list[int], system: str = DEFAULT_SYSTEM,
                  max_len: int | None = None) -> EncodedPrompt:
    """Token ids, loss mask and entity slot starts of `record`; `slot_lengths[i]` slots for entity `i`.

    Plain text (`record.is_plain_text`): BOS text EOS, loss on everything after BOS, cut to `max_len`.
    QA: the segments of `prompt_segments`, BOS on the first only; the answer segment plus EOS has
    loss_mask 1 (the targets), the prompt and the slots 0.
    """
    if record.is_plain_text:
        whole = tok.encode(record.answer, bos=True, eos=True)
        ids = whole[:max_len]
        mask = [0] + [1] * (len(ids) - 1)
        return EncodedPrompt(np.asarray(ids, np.int32), np.asarray(mask, np.int32), [], len(whole) - len(ids))
    return encode_segments(tok, prompt_segments(record, system), slot_lengths)


def encode_segments(tok: Tokenizer, segments: list[str | int], slot_lengths: list[int],
                    answer: bool = True) -> EncodedPrompt:
    """`segments` (text pieces and entity indices, as `prompt_segments` returns) encoded piece by piece,
    BOS on the first; `slot_lengths[i]` zero ids (slots) for entity `i`. `answer`: the last segment is the
    answer (followed by EOS, loss_mask 1); False encodes a prompt to generate from (no EOS, no loss)."""
    ids: list[int] = []
    mask: list[int] = []
    starts: list[int] = []
    for j, seg in enumerate(segments):
        if isinstance(seg, int):
            starts.append(len(ids))
            ids += [0] * slot_lengths[seg]
            mask += [0] * slot_lengths[seg]
            continue
        last = answer and j == len(segments) - 1
        piece = tok.encode(seg, bos=j == 0, eos=last)
        ids += piece
        mask += [int(last)] * len(piece)
    return EncodedPrompt(np.asarray(ids, np.int32), np.asarray(mask, np.int32), starts)
