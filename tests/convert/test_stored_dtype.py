"""A model folder (and an HF Llama / ESM folder) loads in the dtype its config files record, as transformers 5's
`from_pretrained(dtype="auto")` does: a bfloat16 folder is held in bfloat16, not cast to float32 on read
(which doubled the 10B's 19.2 GB); `--dtype` (chat, evaluate) or `param_dtype`/`dtype` overrides it; training
inits keep their float32 master weights."""
import dataclasses
import json
import shutil
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import chat, model_args
from bmgpt_jax.convert import folder, hf_esm, hf_llama
from bmgpt_jax.data.text import tokenizer_of
from bmgpt_jax.models.biomedgpt import BioMedGPT
from bmgpt_jax.models.esm import Esm
from bmgpt_jax.models.llama import LlamaForCausalLM
from tests.chat_models import demo_biomedgpt


def _params(model) -> list:
    return [v.get_value() for _, v in nnx.to_flat_state(nnx.state(model, nnx.Param))]


def _float_dtypes(model) -> set[str]:
    return {str(a.dtype) for a in _params(model) if jnp.issubdtype(a.dtype, jnp.floating)}


def _nbytes(model, part: str) -> int:
    return sum(a.nbytes for a in _params(getattr(model, part)))


def _write(tmp, dtype: str):
    """A tiny BioMedGPT folder whose LM and ESM are stored in `dtype` (the GIN stays float32)."""
    base = demo_biomedgpt()
    cfg = base.config
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, param_dtype=dtype),
                              esm=dataclasses.replace(cfg.esm, param_dtype=dtype))
    model = BioMedGPT(cfg, rngs=nnx.Rngs(1))
    nnx.update(model, jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
                                   nnx.state(base, nnx.Param)))
    folder.save_pretrained(model, tokenizer_of(base), tmp / dtype, pth=False)
    return tmp / dtype, base


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dtypes")
    return {dt: _write(tmp, dt) for dt in ("float32", "bfloat16", "float16")}


def _args(d, dtype=None):
    return SimpleNamespace(checkpoint=str(d), mesh=None, dtype=dtype, **{k: None for k in model_args.OPTIONS})


def test_folder_records_its_dtype(folders):
    d, _ = folders["bfloat16"]
    for name in ("llm_config.json", "esm_config.json"):
        cfg = json.loads((d / name).read_text())
        assert cfg["dtype"] == cfg["torch_dtype"] == "bfloat16", name


@pytest.mark.parametrize("stored", ["float32", "bfloat16", "float16"])
def test_folder_loads_in_its_stored_dtype(folders, stored):
    """Was float32 whatever the folder stored: every slice cast to float32 as it was read."""
    d, base = folders[stored]
    model = folder.from_pretrained(d)
    assert (model.config.lm.param_dtype, model.config.lm.dtype) == (stored, stored)
    assert (model.config.esm.param_dtype, model.config.esm.dtype) == (stored, stored)
    width = jnp.dtype(stored).itemsize
    for part in ("llm", "prot_structure_encoder"):
        assert _float_dtypes(getattr(model, part)) == {stored}, part
        assert _nbytes(model, part) == _nbytes(base, part) * width // 4, part
    assert _float_dtypes(model.mol_structure_encoder) == {"float32"}   # gin_config.json's own dtypes
    # chat / evaluate without --dtype: the same
    model, _, _ = model_args.model_and_options(_args(d))
    assert _float_dtypes(model.llm) == _float_dtypes(model.prot_structure_encoder) == {stored}


@pytest.mark.parametrize("stored,asked", [("bfloat16", "float32"), ("float32", "bfloat16"), ("float16", "float32")])
def test_dtype_flag_sets_weights_and_compute(folders, stored, asked):
    """`--dtype` holds the LM's and ESM's weights in it and computes in it (it set only the LM's compute
    dtype); the weights are the stored ones, cast."""
    d, _ = folders[stored]
    model, _, _ = model_args.model_and_options(_args(d, asked))
    for c in (model.config.lm, model.config.esm):
        assert (c.param_dtype, c.dtype) == (asked, asked)
    assert _float_dtypes(model.llm) == _float_dtypes(model.prot_structure_encoder) == {asked}
    stored_model = folder.from_pretrained(d)
    want = np.asarray(stored_model.llm.lm_head.kernel[...].astype(asked), np.float32)
    np.testing.assert_array_equal(np.asarray(model.llm.lm_head.kernel[...], np.float32), want)
    # the API: a LlamaConfig / EsmConfig field each
    only = folder.from_pretrained(d, param_dtype=asked)
    assert only.config.lm.param_dtype == asked and only.config.lm.dtype == stored
    assert only.config.esm.param_dtype == stored
    esm = folder.from_pretrained(d, esm_overrides={"param_dtype": asked})
    assert esm.config.esm.param_dtype == asked and _float_dtypes(esm.prot_structure_encoder) == {asked}


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_folder_answers_close_to_float32(folders, stored):
    """A bfloat16 / float16 folder decodes in its dtype; its logits stay near the float32 model's."""
    d, base = folders[stored]
    model = folder.from_pretrained(d)
    ids = jnp.asarray([[1, 5, 9, 22, 7]])
    got = np.asarray(model.llm(ids, jnp.ones_like(ids)), np.float32)
    want = np.asarray(base.llm(ids, jnp.ones_like(ids)), np.float32)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, atol=0.1 if stored == "bfloat16" else 0.02)
    assert chat.main(["--checkpoint", str(d), "--question", "What is it?", "--smiles", "CCO", "--protein", "MKTAY",
                      "--max-new-tokens", "3"]) == 0


def test_hf_folders_load_in_their_config_dtype(tmp_path):
    lm = demo_biomedgpt().config.lm
    half = LlamaForCausalLM(dataclasses.replace(lm, param_dtype="bfloat16"), rngs=nnx.Rngs(0))
    hf_llama.save(half, tmp_path / "llama")
    loaded = hf_llama.load(tmp_path / "llama")
    assert (loaded.config.param_dtype, loaded.config.dtype) == ("bfloat16", "bfloat16")
    assert _float_dtypes(loaded) == {"bfloat16"}
    assert _float_dtypes(hf_llama.load(tmp_path / "llama", param_dtype="float32")) == {"float32"}
    esm_cfg = demo_biomedgpt().config.esm
    hf_esm.save(Esm(dataclasses.replace(esm_cfg, param_dtype="float16"), rngs=nnx.Rngs(0)), tmp_path / "esm")
    assert json.loads((tmp_path / "esm" / "config.json").read_text())["torch_dtype"] == "float16"
    esm = hf_esm.load(tmp_path / "esm")
    assert (esm.config.param_dtype, esm.config.dtype) == ("float16", "float16")
    assert _float_dtypes(esm) == {"float16"}


def _drop_dtype(config_json):
    hf = json.loads(config_json.read_text())
    hf.pop("dtype", None), hf.pop("torch_dtype", None)
    config_json.write_text(json.dumps(hf))


def test_config_without_dtype_takes_the_weights_dtype(tmp_path, folders):
    """A config.json with neither `dtype` nor `torch_dtype` (older exports): transformers 5's `from_pretrained`
    (the reference, run here) loads in the weights' dtype, so do we (it was float32 whatever was stored)."""
    torch = pytest.importorskip("torch")
    import transformers
    lm = demo_biomedgpt().config.lm
    hf_llama.save(LlamaForCausalLM(dataclasses.replace(lm, param_dtype="bfloat16"), rngs=nnx.Rngs(0)),
                  tmp_path / "llama")
    _drop_dtype(tmp_path / "llama" / "config.json")
    assert transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").dtype == torch.bfloat16
    loaded = hf_llama.load(tmp_path / "llama")
    assert (loaded.config.param_dtype, loaded.config.dtype) == ("bfloat16", "bfloat16")
    assert _float_dtypes(loaded) == {"bfloat16"}
    esm_cfg = demo_biomedgpt().config.esm
    hf_esm.save(Esm(dataclasses.replace(esm_cfg, param_dtype="float16"), rngs=nnx.Rngs(0)), tmp_path / "esm")
    _drop_dtype(tmp_path / "esm" / "config.json")
    assert transformers.EsmModel.from_pretrained(tmp_path / "esm").dtype == torch.float16
    esm = hf_esm.load(tmp_path / "esm")
    assert (esm.config.param_dtype, esm.config.dtype) == ("float16", "float16")
    # a model folder (an OpenBioMed release with its configs copied in): each part takes its own weights' dtype
    d = shutil.copytree(folders["bfloat16"][0], tmp_path / "folder")
    for name in ("llm_config.json", "esm_config.json"):
        _drop_dtype(d / name)
    lm_cfg, esm_cfg, _ = folder.configs(d)
    assert (lm_cfg.param_dtype, esm_cfg.param_dtype) == ("bfloat16", "bfloat16")
    assert _float_dtypes(folder.from_pretrained(d).llm) == {"bfloat16"}


def test_config_dtype_keys():
    """transformers 5's `dtype` wins over the older `torch_dtype`; neither (and no weights): float32; another
    name refused."""
    base = hf_llama.config_to_hf(demo_biomedgpt().config.lm)
    del base["dtype"], base["torch_dtype"]
    assert hf_llama.config_from_hf(base).param_dtype == "float32"
    assert hf_llama.config_from_hf({**base, "torch_dtype": "float16"}).param_dtype == "float16"
    assert hf_llama.config_from_hf({**base, "torch_dtype": "float16", "dtype": "bfloat16"}).param_dtype == "bfloat16"
    assert hf_llama.config_from_hf({**base, "torch_dtype": "torch.bfloat16"}).dtype == "bfloat16"
    with pytest.raises(ValueError, match=r"Llama config: torch_dtype='int8' is not a dtype the model loads in"):
        hf_llama.config_from_hf({**base, "torch_dtype": "int8"})
    assert hf_esm.config_from_hf({**hf_esm.config_to_hf(demo_biomedgpt().config.esm),
                                  "dtype": "bfloat16"}).param_dtype == "bfloat16"


def test_training_inits_keep_float32_master_weights(tmp_path):
    """The training loaders pass the training config's dtypes: a bfloat16 checkpoint is read into float32."""
    from bmgpt_jax.training import stages
    cfg = demo_biomedgpt().config
    (tmp_path / "config.json").write_text(json.dumps({**hf_llama.config_to_hf(cfg.lm), "torch_dtype": "bfloat16",
                                                      "dtype": "bfloat16"}))
    lm = stages._hf_llama_config(str(tmp_path), cfg)
    assert (lm.param_dtype, lm.dtype) == (cfg.lm.param_dtype, cfg.lm.dtype) == ("float32", "float32")
    (tmp_path / "config.json").write_text(json.dumps({**hf_esm.config_to_hf(cfg.esm), "dtype": "bfloat16"}))
    esm = stages._hf_esm_config(str(tmp_path), cfg)
    assert (esm.param_dtype, esm.dtype) == ("float32", "float32")
