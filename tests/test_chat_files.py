"""`chat --jsonl` / `--output` paths and JSONL lines that cannot be used: one line on stderr and status 2
for a path (before the model loads where it can be checked), that line's error row, naming the field
at fault, for a line; a model folder's `gin_config.json` (`convert.folder.gin_settings`) with fields
omitted or of the wrong kind."""
import json

import pytest

from bmgpt_jax import chat
from tests.test_evaluate import tiny_checkpoint


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt"))


def one_error(argv, capsys) -> str:
    assert chat.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_unusable_jsonl_and_output_paths_are_one_line(ckpt, tmp_path, capsys):
    """A folder given as `--jsonl` or `--output`, or an `--output` in a missing folder, were tracebacks
    (IsADirectoryError; FileNotFoundError after the model had loaded)."""
    src = tmp_path / "q.jsonl"
    src.write_text('{"question": "Q?"}\n')
    folder = tmp_path / "folder"
    folder.mkdir()
    nope = ["--checkpoint", str(tmp_path / "nope"), "--max-new-tokens", "2"]   # the paths are checked first
    assert one_error(nope + ["--jsonl", str(folder)], capsys) == f"chat: [Errno 21] Is a directory: '{folder}'"
    assert one_error(nope + ["--jsonl", str(src), "--output", str(folder)], capsys) == \
        f"chat: --output {folder} is a folder, not a file"
    missing = tmp_path / "missing" / "a.jsonl"
    assert one_error(nope + ["--jsonl", str(src), "--output", str(missing)], capsys) == \
        f"chat: --output {missing}: the folder {missing.parent} does not exist"
    out = tmp_path / "a.jsonl"
    (tmp_path / "a.jsonl.tmp").mkdir()           # the output cannot be written: told after the model loads
    argv = ["--checkpoint", str(ckpt), "--max-new-tokens", "2", "--jsonl", str(src), "--output", str(out)]
    assert one_error(argv, capsys) == \
        f"chat: cannot write --output {out}: [Errno 21] Is a directory: '{out}.tmp'"
    assert not out.exists()


def test_a_line_that_is_not_utf8_is_that_lines_error(ckpt, tmp_path, capsys):
    """A Latin-1 line aborted the whole job with UnicodeDecodeError; now each line is decoded alone."""
    src, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    src.write_bytes(b'{"question": "Q?", "id": 1}\n{"question": "Caf\xe9?"}\n{"question": "R?", "id": 3}\n')
    argv = ["--checkpoint", str(ckpt), "--max-new-tokens", "2", "--jsonl", str(src), "--output", str(out)]
    assert chat.main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 3] and "answer" in rows[0] and "answer" in rows[2]
    assert rows[1] == {"line": 2, "error": "UnicodeDecodeError: 'utf-8' codec can't decode byte 0xe9 in position "
                                           "17: invalid continuation byte"}
    assert f"line 2: {rows[1]['error']}" in capsys.readouterr().err


def test_a_field_of_the_wrong_type_is_named(ckpt):
    """`{"protein": [5]}` was "TypeError: 'int' object is not subscriptable" with only the line number."""
    rows = [{"question": "Q?", "protein": [5]}, {"question": "Q?", "smiles": {"s": "CCO"}}, {"question": 5},
            {"question": "Q?", "system": 7}, {"question": "Q?", "smiles": ["CCO", None]}]
    model = chat.from_pretrained(ckpt)
    got = chat.answer_rows(model, [json.dumps(r) for r in rows], max_new_tokens=2)
    assert [r["error"] for r in got] == [
        "TypeError: protein must be a string or a list of strings, not [5]",
        "TypeError: smiles must be a string or a list of strings, not {'s': 'CCO'}",
        "ValueError: the question must be a string, not 5",
        "TypeError: system must be a string (or None: the default), not 7",
        "TypeError: smiles must be a string or a list of strings, not ['CCO', None]"]
    with pytest.raises(TypeError, match=r"^smiles must be a string or a list of strings, not 5$"):
        chat.ask(model, "Q?", smiles=5)              # the Python API says the same


def test_an_unknown_key_is_named(ckpt, tmp_path, capsys):
    """`{"question": "hi", "smiles": "CCO", "extra": 1}` was refused as `expected an object with 'question' and
    only keys [...]`, naming neither `extra` nor what was wrong; the refused row keeps the line's fields."""
    src, out = tmp_path / "q.jsonl", tmp_path / "a.jsonl"
    lines = [{"question": "hi", "smiles": "CCO", "extra": 1}, {"question": "hi", "smile": "CCO", "note": "x"},
             {"smiles": "CCO"}, ["hi"], {"question": "hi", "id": 6}]
    src.write_text("".join(json.dumps(x) + "\n" for x in lines))
    argv = ["--checkpoint", str(ckpt), "--max-new-tokens", "2", "--jsonl", str(src), "--output", str(out)]
    assert chat.main(argv) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    expected = "expected an object with 'question' and only keys ['question', 'smiles', 'protein', 'system', 'id']"
    assert [r.get("error") for r in rows] == [
        f"ValueError: unknown key(s) 'extra': {expected}", f"ValueError: unknown key(s) 'smile', 'note': {expected}",
        f"ValueError: no 'question': {expected}", f"ValueError: {expected}, not list", None]
    assert rows[0] == {"line": 1, "question": "hi", "smiles": "CCO", "extra": 1, "error": rows[0]["error"]}
    assert "answer" in rows[4] and rows[4]["id"] == 6
    assert f"line 2: ValueError: unknown key(s) 'smile', 'note': {expected}" in capsys.readouterr().err


def test_a_partial_or_mistyped_gin_config_json(ckpt, tmp_path, capsys):
    """A model folder's gin_config.json holding some fields only: the depth and width it omits come from the
    weights (as `convert_weights.py openbiomed --gin-config` takes them), not GinConfig's 5 x 300 (which failed
    with "missing tensor 'mol_structure_encoder.gnns.2.mlp.0.weight' ...; 33 missing"); a key GinConfig lacks or
    a value of the wrong type is one line naming the file and the key."""
    import shutil

    from bmgpt_jax.convert import folder
    d = tmp_path / "partial"
    shutil.copytree(ckpt, d)
    full = json.loads((d / "gin_config.json").read_text())
    assert (full["num_layers"], full["emb_dim"]) == (2, 16) and full["over_cap"] == "subsample"
    (d / "gin_config.json").write_text(json.dumps({"max_atoms": 32, "over_cap": "error"}))
    gin = folder.configs(d)[2]
    assert (gin.num_layers, gin.emb_dim, gin.max_atoms, gin.over_cap) == (2, 16, 32, "error")
    assert chat.from_pretrained(d).config.gin == gin
    (d / "gin_config.json").write_text(json.dumps({"num_layers": 2}))     # the width alone from the weights
    assert folder.configs(d)[2].emb_dim == 16
    question = ["--checkpoint", str(d), "--question", "What is it?", "--smiles", "CCO", "--max-new-tokens", "2"]
    for content, message in [({"num_layers": "x"}, "num_layers: expected an integer, got 'x'"),
                             ({"num_layer": 2}, "unknown config key 'num_layer'; did you mean 'num_layers'?"),
                             ([2, 16], "expected a JSON object of GinConfig fields, got list")]:
        (d / "gin_config.json").write_text(json.dumps(content))
        line = one_error(question, capsys)
        assert f"ValueError: {d / 'gin_config.json'}: {message}" in line, line
