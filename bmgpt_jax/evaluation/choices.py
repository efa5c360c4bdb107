"""Multiple-choice records: the options they offer, and the option a generated answer chose.

A labelled `Record` is either yes/no/maybe (PubMedQA: `label` "yes", answer "Yes. <conclusion>") or
lettered (MedQA, MedMCQA: `label` "B", the question lists "A. text" lines, answer "B. text"). Scoring by
log-likelihood asks for each option's text *as the answer* (`answer_options`: "Yes." / "B. Caffeine", the
way the builders write gold answers); scoring by generation reads the choice from the generated text
(`extract_choice`).
"""
from __future__ import annotations

import re

from bmgpt_jax.data.records import Record

YES_NO_MAYBE = ("yes", "no", "maybe")


def choice_options(question: str) -> dict[str, str]:
    """The lettered options listed in a question ("A. text" lines, as the MedQA/MedMCQA builders write them)."""
    return {m[1]: m[2].strip() for m in re.finditer(r"^([A-E])[.)]\s+(.+)$", question, re.M)}


def is_yes_no(record: Record) -> bool:
    return record.label.lower() in YES_NO_MAYBE


def answer_options(record: Record) -> dict[str, str]:
    """Option key -> the text the model would answer for it: "Yes." / "No." / "Maybe." for a yes/no/maybe
    record, "A. <option>" ... for a lettered one. Raises ValueError when the gold label is not among them
    (a lettered question without its "A. ..." lines, a label that is neither a letter nor yes/no/maybe)."""
    if is_yes_no(record):
        return {k: f"{k.capitalize()}." for k in YES_NO_MAYBE}
    options = {k: f"{k}. {text}" for k, text in choice_options(record.question).items()}
    if record.label not in options:
        raise ValueError(f"record {record.id!r}: label {record.label!r} is not one of the question's options "
                         f"{sorted(options) or '(no A./B./... lines)'}")
    return options


def gold_key(record: Record) -> str:
    """The option key `extract_choice` / `answer_options` use for the gold label ("yes", "B")."""
    return record.label.lower() if is_yes_no(record) else record.label


def words(text: str) -> list[str]:
    """rouge-score's default tokens: lowercase, every run of non-alphanumerics is a separator."""
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def symbols(text: str) -> list[str]:
    """Lowercase words and every other non-space character as a token of its own: what tells options apart
    that `words` reads the same ("Mean < Mode" from "Mean = Mode", "<50 degree" from ">50 degree", "↓ ↑ ↓")."""
    return re.findall(r"\w+|[^\w\s]", text.lower())


def extract_choice(text: str, yes_no: bool = False, options: dict[str, str] | None = None) -> str | None:
    """The option chosen by generated `text`, or None when it cannot be read.

    yes/no/maybe (`yes_no`): the word at the start ("Yes. Because ..."), else after "answer is" / "answer:".
    Letters A-E, with `options` (see `choice_options`): first an answer that is one option's text (`normalize`d:
    case, whitespace and a final period aside, symbols kept), even where it looks like a letter ("D, antagonist"),
    or an option whose text reads like a letter starting the answer ("E. faecalis is ..." for option C
    "E. faecalis"); then a letter at the start followed by `.`, `)`, `:`, `,` or the end ("B. Aspirin", "(C)", "D"), else
    "answer is B" / "Answer: (B)" / "option B"; else the option whose text starts the answer (the longest such),
    compared by `symbols`, or by `words` alone (markup such as "**" ignored) when no option matches so.
    Options that read the same (identical texts, or a prefix tie) cannot be told apart: None, never a guess.
    """
    if yes_no:
        alternatives = "|".join(YES_NO_MAYBE)
        m = (re.match(rf"\W*({alternatives})\b", text, re.I) or
             re.search(rf"\banswer(?:\s+is)?\s*:?\s*\W*({alternatives})\b", text, re.I))
        return m[1].lower() if m else None
    options, answer = options or {}, normalize(text)
    same = [k for k, o in options.items() if answer and normalize(o) == answer]
    if same:
        return same[0] if len(same) == 1 else None
    # an option whose own text reads like a letter ("E. faecalis", "C. difficile colitis") starting the answer
    found, key = _starts_with_option(text, {k: o for k, o in options.items() if re.match(LETTER, o)}, symbols)
    if found:
        return key
    m = re.match(LETTER, text) or re.search(r"\b(?i:answer|option)(?:\s+is)?\s*:?\s*[(\[]?([A-E])\b(?![\w'-])", text)
    if m:
        return m[1]
    for tokens in (symbols, words):
        found, key = _starts_with_option(text, options, tokens)
        if found:
            return key
    return None


LETTER = r"\s*[(\[]?([A-E])(?:[)\].:,]|\s*$)"     # a letter at the start: "B. Aspirin", "(C)", "D"


def _starts_with_option(text: str, options: dict[str, str], tokens) -> tuple[bool, str | None]:
    """Whether some option's text starts `text` (compared as `tokens`), and which: the longest such, None
    when two options tie."""
    said = tokens(text)
    hits = [(len(o), k) for k, o in ((k, tokens(o)) for k, o in options.items()) if o and said[:len(o)] == o]
    if not hits:
        return False, None
    longest = [k for n, k in hits if n == max(hits)[0]]
    return True, longest[0] if len(longest) == 1 else None


def normalize(text: str) -> str:
    """Lowercase, whitespace collapsed, a trailing period dropped: what exact match compares."""
    return " ".join(text.lower().split()).rstrip(".").strip()


def has_long_answer(record: Record) -> bool:
    """Whether a labelled record's answer says more than its label and option: words after "Yes. " / "B. "
    other than one of the question's options, compared word by word (PubMedQA's conclusion, not MedQA's
    "B. option", even when the option carries stray punctuation)."""
    rest = words(re.sub(rf"^\W*{re.escape(record.label)}\b", "", record.answer, flags=re.I))
    return bool(rest) and rest not in [words(o) for o in choice_options(record.question).values()]
