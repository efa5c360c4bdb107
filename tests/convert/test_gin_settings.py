"""A model folder's `gin_config.json` read by `convert.folder.gin_settings` (chat, evaluate, `to_openbiomed`):
fields it omits, keys and values it should not hold."""
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
