"""Training inits from pretrained checkpoints (`stages.load_hf_llama` / `check_sources`): Llama-2-7b-hf's
32000 token rows under BioMedGPT's 32001 (`[PAD]` added) grow by the mean row, as transformers'
`resize_token_embeddings` does; a larger checkpoint vocabulary or another shape is an error; a differing
`rms_norm_eps` is the config's, with a warning; and `loop.check_inputs` finds all that before any data is
built. Also the stages' default trainable sets (LoRA finetuning: both LoRA factors and the adaptors)."""
import copy
import dataclasses
import json
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import parallel
from bmgpt_jax.convert import hf_llama
from bmgpt_jax.data.text import load_tokenizer
from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
from bmgpt_jax.training import loop as train
from bmgpt_jax.training import stages
from tests.training.runs import SMALL, cfg_for

V = 211                      # the checkpoint's vocabulary; the config's is V + 1 ([PAD] = V)
IDS = np.array([[1, 5, 17, 42, 210, 3, 99]])
STAGES_LOG = "bmgpt_jax.training.stages"


def model_cfg(**changes) -> BioMedGPTConfig:
    """Our decoder config for `make_hf_llama`'s checkpoint, with `[PAD]` appended."""
    lm = dict(vocab_size=V + 1, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=144,
              rms_norm_eps=1e-6, max_position_embeddings=256, pad_token_id=V)
    return BioMedGPTConfig(lm=LlamaConfig(**{**lm, **changes}))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """(folder, the transformers model saved there with vocabulary V, eps 1e-6)."""
    pytest.importorskip("torch")
    from tests.torch_refs.hf_llama import make_hf_llama
    d = tmp_path_factory.mktemp("llama")
    return d, make_hf_llama(d, num_kv_heads=4, vocab_size=V, seed=1)


def with_config(src, dst, **changes):
    """A copy of the HF folder `src` whose config.json has `changes`."""
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, **changes}))
    return dst


def logits(hf_model, ids):
    import torch
    with torch.no_grad():
        return hf_model(torch.tensor(ids)).logits.numpy()


def test_a_smaller_checkpoint_vocabulary_grows_by_the_mean_row(hf, caplog):
    d, ref = hf
    mesh = parallel.make_mesh((1, 4, 2))
    with caplog.at_level("INFO", logger=STAGES_LOG):
        model, _ = stages.build_model("lm", model_cfg(), stages.InitConfig(hf_llama=str(d)), mesh)
    said = [r.getMessage() for r in caplog.records if r.name == STAGES_LOG]
    assert said == [f"init.hf_llama {d}: {V} token rows, the config {V + 1}: embed_tokens and lm_head grown by 1 row "
                    f"(ids {V}), each the mean of the checkpoint's rows"]
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    embed, head = model.model.embed_tokens.weight.get_value(), model.lm_head.kernel.get_value()
    want = parallel.tree_shardings(nnx.state(model), mesh)
    assert embed.sharding == want["model"]["embed_tokens"]["weight"].get_value()
    assert not embed.sharding.is_fully_replicated and not head.sharding.is_fully_replicated
    embed, head = np.asarray(embed), np.asarray(head).T
    assert embed.shape == head.shape == (V + 1, 64)
    assert np.array_equal(embed[:V], sd["model.embed_tokens.weight"])      # the checkpoint's rows, bit for bit
    assert np.array_equal(head[:V], sd["lm_head.weight"])
    for got, rows in ((embed, sd["model.embed_tokens.weight"]), (head, sd["lm_head.weight"])):
        np.testing.assert_allclose(got[V], rows.astype(np.float64).mean(0), rtol=1e-6, atol=1e-8)
    # transformers' own resize (its default, mean_resizing): the mean plus noise of covariance 1e-9 x theirs
    resized = copy.deepcopy(ref)
    resized.resize_token_embeddings(V + 1)
    np.testing.assert_allclose(embed[V], resized.get_input_embeddings().weight[V].detach().numpy(), atol=1e-4)
    np.testing.assert_allclose(head[V], resized.lm_head.weight[V].detach().numpy(), atol=1e-4)
    # the loaded decoder computes the checkpoint's logits for its tokens, and the resized model's for [PAD]
    one, _ = stages.build_model("lm", model_cfg(), stages.InitConfig(hf_llama=str(d)))
    got = np.asarray(one(IDS))
    np.testing.assert_allclose(got[..., :V], logits(ref, IDS), atol=1e-4)
    np.testing.assert_allclose(got[..., V], logits(resized, IDS)[..., V], atol=1e-3)
    np.testing.assert_array_equal(np.asarray(one.model.embed_tokens.weight[...])[:V], embed[:V])


def test_a_larger_checkpoint_vocabulary_or_another_shape_is_one_error(hf):
    d, _ = hf
    init = stages.InitConfig(hf_llama=str(d))
    bigger = (r"init.hf_llama: the checkpoint's shape differs from the config: vocab_size: config 210 vs checkpoint "
              r"211 \(a checkpoint's vocabulary may be smaller than the config's, the rows added, never larger\)$")
    for check in (lambda c: stages.check_sources("lm", c, init), lambda c: stages.build_model("lm", c, init)):
        with pytest.raises(ValueError, match=bigger):
            check(model_cfg(vocab_size=V - 1, pad_token_id=None))
        with pytest.raises(ValueError, match=r"intermediate_size: config 128 vs checkpoint 144$"):
            check(model_cfg(intermediate_size=128))
        with pytest.raises(ValueError, match=r"rope_theta: config 500000.0 vs checkpoint 10000.0$"):
            check(model_cfg(rope_theta=500000.0))          # RoPE stays an error: not the config's to decide


def test_conversions_do_not_grow_the_vocabulary(hf):
    d, _ = hf
    cfg = model_cfg().lm
    with pytest.raises(ValueError, match=r"'lm_head.weight' has shape \(211, 64\) but the model expects "
                                         r"\(212, 64\)"):
        hf_llama.load_sharded(d, cfg, parallel.make_mesh((1, 8, 1)))


def test_a_differing_norm_eps_is_the_config_s_with_a_warning(hf, tmp_path, caplog):
    """Llama-2-7b-hf's config.json says rms_norm_eps 1e-5 (early revisions 1e-6), BioMedGPT-LM-7B's 1e-6:
    the config's value is used and the warning names both."""
    d, ref = hf
    src = with_config(d, tmp_path / "eps", rms_norm_eps=1e-5, max_position_embeddings=4096)
    init = stages.InitConfig(hf_llama=str(src))
    stages.check_sources("lm", model_cfg(), init)                                 # not an error
    with caplog.at_level("INFO", logger=STAGES_LOG):
        model, _ = stages.build_model("lm", model_cfg(), init)
    warned = [r.getMessage() for r in caplog.records if r.name == STAGES_LOG and r.levelname == "WARNING"]
    assert warned == [f"init.hf_llama {src}: rms_norm_eps: config 1e-06 vs checkpoint 1e-05, max_position_embeddings: "
                      "config 256 vs checkpoint 4096; the config's values are used (no parameter shape depends on "
                      "it)"]
    assert model.config.rms_norm_eps == 1e-6 and model.config.max_position_embeddings == 256
    np.testing.assert_allclose(np.asarray(model(IDS))[..., :V], logits(ref, IDS), atol=1e-4)   # ref: eps 1e-6


def test_the_esm_and_openbiomed_inits_follow_the_same_policy(tmp_path, caplog):
    """`init.hf_esm` and `init.openbiomed` (+ its config.json paths): a differing norm eps is the config's,
    with the warning; a different shape, the vocabulary included (no rows are added there), is the error."""
    from bmgpt_jax.convert import folder, hf_esm
    from bmgpt_jax.models.biomedgpt import BioMedGPT
    cfg = train.load_config("tiny_align", SMALL).model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=1001, pad_token_id=1000))
    model = BioMedGPT(cfg, rngs=nnx.Rngs(3))
    ckpt = folder.save_pretrained(model, load_tokenizer(""), tmp_path / "biomedgpt", pth=False)
    esm_dir = tmp_path / "esm"
    hf_esm.save(model.prot_structure_encoder, esm_dir)
    for path, eps in ((ckpt / "llm_config.json", {"rms_norm_eps": 1e-5}), (ckpt / "esm_config.json",
                      {"layer_norm_eps": 1e-6}), (esm_dir / "config.json", {"layer_norm_eps": 1e-6})):
        path.write_text(json.dumps({**json.loads(path.read_text()), **eps}))
    whole = stages.InitConfig(openbiomed=str(ckpt), lm_config=str(ckpt / "llm_config.json"),
                              esm_config=str(ckpt / "esm_config.json"))
    part = stages.InitConfig(hf_esm=str(esm_dir))
    for stage, init in (("finetune", whole), ("align", part)):
        stages.check_sources(stage, cfg, init)
        caplog.clear()
        with caplog.at_level("INFO", logger=STAGES_LOG):
            loaded, _ = stages.build_model(stage, cfg, init)
        assert loaded.llm.config.rms_norm_eps == 1e-6 and loaded.prot_structure_encoder.config.layer_norm_eps == 1e-5
        np.testing.assert_array_equal(np.asarray(loaded.prot_structure_encoder.embeddings.word_embeddings.weight[...]),
                                      np.asarray(model.prot_structure_encoder.embeddings.word_embeddings.weight[...]))
        said = [r.getMessage() for r in caplog.records if r.name == STAGES_LOG]
        if init is whole:
            assert said == [f"init.openbiomed (lm) {ckpt}: rms_norm_eps: config 1e-06 vs init.lm_config 1e-05; "
                            "the config's value is used (no parameter shape depends on it)",
                            f"init.openbiomed (esm) {ckpt}: layer_norm_eps: config 1e-05 vs init.esm_config 1e-06; "
                            "the config's value is used (no parameter shape depends on it)"]
        else:
            assert said == [f"init.hf_esm {esm_dir}: layer_norm_eps: config 1e-05 vs checkpoint 1e-06; the config's "
                            "value is used (no parameter shape depends on it)"]
    more = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=1002))
    with pytest.raises(ValueError, match=r"^init.openbiomed \(lm\): the checkpoint's shape differs from the config: "
                                         r"vocab_size: config 1002 vs checkpoint 1001$"):
        stages.check_sources("finetune", more, whole)
    wider = dataclasses.replace(cfg, esm=dataclasses.replace(cfg.esm, intermediate_size=96))
    with pytest.raises(ValueError, match=r"^init.hf_esm: .*intermediate_size: config 96 vs checkpoint 64$"):
        stages.check_sources("align", wider, part)


def test_openbiomed_s_token_rows_win_over_its_lm_config_json(tmp_path, caplog):
    """`init.openbiomed` as `biomedgpt_10b_finetune.yaml` gives it: the `.pth` with 32001 token rows (`[PAD]`
    added by OpenBioMed's resize_token_embeddings) and BioMedGPT-LM-7B's config.json, which says 32000. The
    rows are the decoder's vocabulary (logged once, by the load); the config's must match them, and a
    config.json saying more rows than the `.pth` has is one error naming both."""
    pytest.importorskip("torch")
    from bmgpt_jax.convert import folder
    from bmgpt_jax.models.biomedgpt import BioMedGPT
    cfg = train.load_config("tiny_align", SMALL).model
    cfg = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=32001, pad_token_id=32000))
    model = BioMedGPT(cfg, rngs=nnx.Rngs(3))
    ckpt = folder.save_pretrained(model, load_tokenizer(""), tmp_path / "biomedgpt", pth=True)
    pth, hub = ckpt / folder.FILES["pth"], tmp_path / "config.json"
    hf = json.loads((ckpt / folder.FILES["lm"]).read_text())
    hub.write_text(json.dumps({**hf, "vocab_size": 32000, "pad_token_id": 0}))
    init = stages.InitConfig(openbiomed=str(pth), lm_config=str(hub), esm_config=str(ckpt / folder.FILES["esm"]))
    caplog.clear()
    with caplog.at_level("INFO", logger="bmgpt_jax"):
        stages.check_sources("finetune", cfg, init)
        assert not [r for r in caplog.records if "token rows" in r.getMessage()]     # the loader says it
        loaded, _ = stages.build_model("finetune", cfg, init)
    assert [r.getMessage() for r in caplog.records if "token rows" in r.getMessage()] == [
        f"{pth}: its 32001 token rows override {hub}'s vocab_size 32000 (as OpenBioMed's resize_token_embeddings "
        "after adding [PAD])"]
    assert loaded.llm.config.vocab_size == 32001
    head = [np.asarray(m.llm.lm_head.kernel[...]) for m in (loaded, model)]
    np.testing.assert_array_equal(*head)
    more = dataclasses.replace(cfg, lm=dataclasses.replace(cfg.lm, vocab_size=32002))
    with pytest.raises(ValueError, match=r"^init.openbiomed \(lm\): the checkpoint's shape differs from the config: "
                                         r"vocab_size: config 32002 vs checkpoint 32001$"):
        stages.check_sources("finetune", more, init)
    hub.write_text(json.dumps({**hf, "vocab_size": 32002}))
    for check in (stages.check_sources, stages.build_model):
        with pytest.raises(ValueError) as e:
            check("finetune", cfg, init)
        assert str(e.value) == (f"{pth}: llm.model.embed_tokens.weight has 32001 token rows, fewer than {hub}'s "
                                "vocab_size 32002: not a checkpoint of this LM config")

# ------------------------------------------------------------------------------ through the training job
def tiny_lm_folder(path, vocab: int, **changes):
    """An HF Llama folder with tiny_lm's decoder shape and `vocab` token rows; config.json `changes`."""
    cfg = dict(vocab_size=vocab, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=176,
               max_position_embeddings=1024)
    hf_llama.save(LlamaForCausalLM(LlamaConfig(**cfg), rngs=nnx.Rngs(5)), path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **changes}))
    return path


@pytest.fixture
def no_data(monkeypatch):
    """Building the data (`BatchIterator`) fails the test: the error must come before it."""
    def built(*args, **kwargs):
        raise AssertionError("the data pipeline was built before the init check")
    monkeypatch.setattr(train, "BatchIterator", built)


def test_check_inputs_refuses_a_mismatched_init_before_any_data_is_built(tmp_path, capsys, no_data):
    pieces = load_tokenizer("").pad_id                      # the demo tokenizer's own pieces; [PAD] is next
    bad = {"larger": tiny_lm_folder(tmp_path / "larger", pieces + 5),
           "narrower": tiny_lm_folder(tmp_path / "narrower", pieces, intermediate_size=128),
           "deeper": tiny_lm_folder(tmp_path / "deeper", pieces, num_hidden_layers=3),
           "no_config": tiny_lm_folder(tmp_path / "no_config", pieces)}
    (bad["no_config"] / "config.json").unlink()
    want = {"larger": f"train: ValueError: init.hf_llama: the checkpoint's shape differs from the config: vocab_size: "
                      f"config {pieces + 1} vs checkpoint {pieces + 5} (a checkpoint's vocabulary may be smaller "
                      "than the config's, the rows added, never larger)",
            "narrower": "train: ValueError: init.hf_llama: the checkpoint's shape differs from the config: "
                        "intermediate_size: config 176 vs checkpoint 128",
            "deeper": "train: ValueError: init.hf_llama: the checkpoint's shape differs from the config: "
                       "num_layers: config 2 vs checkpoint 3",
            "no_config": f"train: FileNotFoundError: {bad['no_config'] / 'config.json'} not found: a Hugging Face "
                         "Llama directory holds config.json and *.safetensors (or pytorch_model*.bin)"}
    for name, folder in bad.items():
        argv = ["--config", "tiny_lm", *SMALL, f"out_dir={tmp_path / name / 'run'}", f"init.hf_llama={folder}"]
        assert train.main(argv) == 2, name
        assert capsys.readouterr().err.strip().splitlines()[-1] == want[name]
    # config.json as the config says, the tensors not: their headers are checked too
    folder = tiny_lm_folder(tmp_path / "shards", pieces, intermediate_size=128)
    cfg = cfg_for(tmp_path, "stage=lm", f"init.hf_llama={folder}", "model.lm.intermediate_size=128")
    with pytest.raises(ValueError, match=r"tensor 'model.layers.0.mlp.down_proj.weight' has shape \(64, 176\) but "
                                         r"the model expects \(64, 128\)"):
        train.check_inputs(cfg)


def test_stage_1_trains_from_a_checkpoint_without_pad(tmp_path, caplog):
    """The documented use at toy size: the `lm` stage from an HF Llama with the tokenizer's pieces only (as
    Llama-2-7b-hf's 32000) and rms_norm_eps 1e-5, the vocabulary read from the tokenizer (+ [PAD])."""
    pieces = load_tokenizer("").pad_id
    folder = tiny_lm_folder(tmp_path / "llama", pieces, rms_norm_eps=1e-5)
    cfg = cfg_for(tmp_path, "stage=lm", "steps=2", f"init.hf_llama={folder}")
    assert cfg.model.lm.vocab_size == 0 and cfg.model.lm.rms_norm_eps == 1e-6
    with caplog.at_level("INFO", logger=STAGES_LOG):
        out = train.run(cfg)
    said = [r.getMessage() for r in caplog.records if r.name == STAGES_LOG]
    assert said == [f"init.hf_llama {folder}: rms_norm_eps: config 1e-06 vs checkpoint 1e-05; the config's value "
                    "is used (no parameter shape depends on it)",
                    f"init.hf_llama {folder}: {pieces} token rows, the config {pieces + 1}: embed_tokens and lm_head "
                    f"grown by 1 row (ids {pieces}), each the mean of the checkpoint's rows"]
    assert sorted(out["losses"]) == [1, 2] and all(np.isfinite(list(out["losses"].values())))
    assert out["model"].config.vocab_size == pieces + 1 and out["model"].config.rms_norm_eps == 1e-6
    assert jax.tree.leaves(nnx.state(out["model"]))


def test_lora_finetune_trains_both_lora_factors_and_the_adaptors():
    """With `lora_rank` > 0 the finetune stage trains the adaptors and every LoRA factor, `lora_a` and
    `lora_b`, and nothing else of the decoder. (`lora_b` starts at zero, so with `lora_a` alone every LoRA
    gradient, d(B A x)/dA = B^T (...), would stay zero and the decoder would never change.) The expected
    set is read off the model's parameter paths by name."""
    from bmgpt_jax.training.optim import path_str, trainable_filter
    cfg = train.load_config("tiny_finetune", ["model.lm.lora_rank=4", "model.lm.vocab_size=64"])
    make, _ = stages.model_factory("finetune", cfg.model)
    model = nnx.eval_shape(make)
    paths = [path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))]
    want = {p for p in paths if p.startswith(("proj_mol.", "proj_prot.")) or
            p.rsplit(".", 1)[-1] in ("lora_a", "lora_b")}
    assert any(p.endswith(".lora_a") for p in want) and any(p.endswith(".lora_b") for p in want)
    assert any(p.startswith("llm.") and p not in want for p in paths)          # the frozen base weights
    pats = stages.trainable_patterns("finetune", cfg.model, ())
    got = {path_str(p) for p, _ in nnx.to_flat_state(nnx.state(model, trainable_filter(pats)))}
    assert got == want, (sorted(got - want), sorted(want - got))


def test_a_lora_run_must_train_the_factors_and_not_the_kernels_they_adapt(tmp_path):
    """`tiny_finetune.yaml` trains everything (`trainable: ["."]`): with `model.lm.lora_rank=4` that was a full
    fine-tune with adapters on top, silently; the align stage's default froze the factors (adapters that stay
    zero). Both now stop before anything is built, naming the fix; `trainable=[]` is the LoRA default."""
    from bmgpt_jax.config import ConfigError
    for name, overrides, message in (
            ("tiny_finetune", [], r"trainable=\['\.'\] also trains the kernels LoRA adapts "
                                  r"\(llm\.model\.layers\.self_attn\.q_proj\.kernel, \.\.\.\)"),
            ("tiny_finetune", ["trainable=[\"^proj_\"]"], r"trainable=\['\^proj_'\] trains no lora_a/lora_b"),
            ("tiny_align", [], r"\(stage align's default\) trains no lora_a/lora_b: the adapters would stay zero")):
        cfg = train.load_config(name, ["model.lm.lora_rank=4", "model.lm.vocab_size=64", *overrides])
        model = nnx.eval_shape(stages.model_factory(cfg.stage, cfg.model)[0])
        pats = stages.trainable_patterns(cfg.stage, cfg.model, cfg.trainable)
        with pytest.raises(ConfigError, match=message):
            stages.check_lora_trainable(model, cfg.model.lm, pats, cfg.stage)
    cfg = train.load_config("tiny_finetune", ["model.lm.lora_rank=4", "model.lm.vocab_size=64", "trainable=[]"])
    model = nnx.eval_shape(stages.model_factory("finetune", cfg.model)[0])
    stages.check_lora_trainable(model, cfg.model.lm, stages.trainable_patterns("finetune", cfg.model, ()), "finetune")
    with pytest.raises(ConfigError, match="also trains the kernels LoRA adapts"):   # the run checks it first
        train.run(cfg_for(tmp_path, "model.lm.lora_rank=4", "steps=1"))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lora_factors_loaded_with_a_decoder_follow_init_seed(hf):
    """`init.seed` seeded the random parts only: with the decoder from `init.hf_llama`, every seed drew the same
    `lora_a` (seed 0), so a seed sweep of LoRA runs started alike."""
    d, _ = hf
    cfg = model_cfg(lora_rank=4)
    draws = {seed: np.asarray(stages.build_model("lm", cfg, stages.InitConfig(hf_llama=str(d), seed=seed))[0]
                              .model.layers[0].self_attn.q_proj.lora_a[...]) for seed in (0, 1)}
    assert not np.array_equal(draws[0], draws[1])
    again = stages.build_model("lm", cfg, stages.InitConfig(hf_llama=str(d), seed=1))[0]
    np.testing.assert_array_equal(np.asarray(again.model.layers[0].self_attn.q_proj.lora_a[...]), draws[1])
