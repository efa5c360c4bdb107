"""Multiple choice: the options a record offers, and the option read from a generated answer (letters, yes/no/
maybe, an option's text), including options that differ only in symbols and options that cannot be told apart
(real MedMCQA dev / MedQA test options; every gold option's text reads back as its own letter)."""
import pytest

from bmgpt_jax.data.records import Record
from bmgpt_jax.evaluate import load_records
from bmgpt_jax.evaluation import choices
from bmgpt_jax.evaluation.choices import extract_choice

MC_Q = "Which drug?\nA. Aspirin\nB. Caffeine\nC. Ethanol\nD. Water"
MEAN = {"A": "Mean = Median", "B": "Mean < Mode", "C": "Mean >Mode", "D": "Mean = Mode"}   # MedMCQA 91b1635b
ANGLE = {"A": ">50 degree", "B": ">90 degree", "C": "<50 degree", "D": "<90 degree"}    # MedMCQA 85cb22b1
ARROWS = {"A": "↓ ↓ ↓", "B": "↑ ↓ normal", "C": "↓ ↑ ↑", "D": "↓ ↑ ↓"}                  # MedQA 263
RASH = {"A": "Guillain-Barre syndrome", "B": "Petechial rash", "C": "Fever with ahralgia",
        "D": "Petechial rash"}                                                            # MedMCQA 6946c04c


@pytest.mark.parametrize("text, options, expected", [
    ("B. Aspirin", None, "B"), ("(C)", None, "C"), ("D", None, "D"), ("E: last", None, "E"),
    ("The answer is A.", None, "A"), ("Answer: (B) because", None, "B"), ("I choose option C", None, "C"),
    ("A patient with fever", None, None), ("I do not know", None, None),
    ("aspirin and ibuprofen daily", {"A": "Aspirin", "B": "Aspirin and ibuprofen"}, "B"),
    ("Aspirin.", {"A": "Aspirin", "B": "Aspirin and ibuprofen"}, "A"),
    ("Aspirinate", {"A": "Aspirin", "B": "Aspirin and ibuprofen"}, None),
    # options whose text reads like a letter (MedMCQA's "E. faecalis", MedQA's "C. difficile colitis")
    ("E. faecalis, because it resists", {"A": "S. aureus", "B": "Listeria", "C": "E. faecalis", "D": "E. coli"}, "C"),
    ("C. difficile colitis after antibiotics", {"A": "Crohn disease", "B": "C. difficile colitis"}, "B"),
    ("A,C since both", {"A": "A only", "B": "A,C", "C": "C only"}, "B"),
    ("B. C. difficile colitis", {"A": "Crohn disease", "B": "C. difficile colitis"}, "B"),
    ("A, because of the fever", {"A": "A only", "B": "A,C", "C": "C only"}, "A"),
])
def test_letter_extraction(text, options, expected):
    assert extract_choice(text, options=options) == expected


@pytest.mark.parametrize("text, options, expected", [
    ("Mean < Mode", MEAN, "B"), ("mean  <  MODE.", MEAN, "B"), ("Mean = Mode", MEAN, "D"),
    ("Mean < Mode, as the curve is skewed", MEAN, "B"),      # the option starts the answer, symbols kept
    (">50 degree", ANGLE, "A"), ("<50 degree", ANGLE, "C"), ("↓ ↑ ↓", ARROWS, "D"),
    ("D, antagonist", {"A": "5-HT3 antagonist", "B": "D, antagonist", "C": "M3 antagonist"}, "B"),
    ("Petechial rash", RASH, None),                          # two options with that text: not a guess
    ("Petechial rash with fever", RASH, None),
    ("**Mean < Mode**", MEAN, None),                         # by words alone B, C and D read the same
    ("**Guillain-Barre syndrome**", RASH, "A"),              # by words alone, markup ignored
])
def test_options_that_differ_in_symbols_or_not_at_all(text, options, expected):
    assert extract_choice(text, options=options) == expected


@pytest.mark.parametrize("text, expected", [
    ("Yes. The study shows ...", "yes"), ("no", "no"), ("MAYBE, the data are unclear", "maybe"),
    ("The answer is no.", "no"), ("Answer: yes", "yes"), ("Not clear", None), ("Nothing was found", None),
    # a yes/no/maybe inside a sentence is not an answer: only a leading one or one after "answer (is)"
    ("There is no evidence either way.", None), ("It may be, maybe not.", None),
    ("There is no significant effect, so the answer is yes.", "yes"),
])
def test_yes_no_extraction(text, expected):
    """PubMedQA answers: a leading yes/no/maybe or the one after "answer (is)"; a word such as the "no" of
    "there is no evidence" is not read as the answer."""
    assert extract_choice(text, yes_no=True) == expected


def test_answer_options():
    assert choices.answer_options(Record((), MC_Q, "B. Caffeine", label="B")) == {
        "A": "A. Aspirin", "B": "B. Caffeine", "C": "C. Ethanol", "D": "D. Water"}
    assert choices.answer_options(Record((), "Q?", "No. Because.", label="no")) == {
        "yes": "Yes.", "no": "No.", "maybe": "Maybe."}
    with pytest.raises(ValueError, match=r"record 'q7': label 'E' is not one of the question's options"):
        choices.answer_options(Record((), MC_Q, "E. Milk", label="E", id="q7"))
    with pytest.raises(ValueError, match="no A./B./... lines"):
        choices.answer_options(Record((), "Which drug?", "B. Caffeine", label="B"))


@pytest.mark.parametrize("spec, size, twins", [("medmcqa:validation", 4183, 4), ("medqa:test", 1273, 0)])
def test_every_gold_option_text_reads_as_its_letter(shared_data, tmp_path, spec, size, twins):
    """The gold option's text alone, as a model may answer, on every record of the sample sets: its own
    letter, or None where another option has the same text (4 MedMCQA dev questions)."""
    records = load_records(spec, data_dir=str(tmp_path))
    assert len(records) == size
    misread, unreadable = [], []
    for r in records:
        options = choices.choice_options(r.question)
        text = options[r.label]
        alike = [k for k, o in options.items() if choices.normalize(o) == choices.normalize(text)]
        got = extract_choice(text, options=options)
        if got != (r.label if len(alike) == 1 else None):
            misread.append((r.id, r.label, text, got))
        unreadable += [r.id] if got is None else []
    assert not misread
    assert len(unreadable) == twins
