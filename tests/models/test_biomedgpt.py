"""BioMedGPT: parity with the PyTorch reference composition, batching correctness, checkpoint round trip."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from bmgpt_jax import config as config_lib
from bmgpt_jax.convert import openbiomed
from bmgpt_jax.data import examples
from bmgpt_jax.data.records import Record
from bmgpt_jax.data.text import DEFAULT_SYSTEM, load_tokenizer
from tests.biomedgpt_pair import tiny_pair

MOLS = ["CC(=O)Oc1ccccc1C(=O)O", "C1=CC=C(C=C1)O", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"]
PROTS = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ", "GSHMLEDPVDAFQLGLEHK"]
RECORDS = [
    Record((("molecule", MOLS[0]),), "What is this molecule?", "It is aspirin, an analgesic."),
    Record((("protein", PROTS[0]),), "What is the function of this protein?", "It binds DNA."),
    Record((("molecule", MOLS[1]), ("protein", PROTS[1])), "Does the molecule bind the protein?", "No."),
    Record((), "What is a kinase?", "An enzyme that adds phosphate groups."),
    Record((("molecule", MOLS[2]),), "Name it.", "Caffeine."),
]
OPTS = examples.EncodeOptions(system_prompt=DEFAULT_SYSTEM, max_len=512, max_atoms=256, over_cap="error",
                              max_protein_len=1024)


@pytest.fixture(scope="session")
def tok(shared_data):
    return load_tokenizer(str(shared_data / "tokenizer" / "llama2_tokenizer.model"))


@pytest.fixture(scope="session")
def pair(tok, torch):
    return tiny_pair(tok.vocab_size)


# the model jitted, as training and chat run it: one program a shape, not op by op
forward = nnx.jit(lambda model, batch: model(batch))
loss = nnx.jit(lambda model, batch: model.loss(batch))


def make_batch(tok, records, T=256, budget=examples.Budget(batch=6, nodes=64, edges=160, graphs=5, proteins=3),
               prot_len=48):
    enc = [examples.encode_example(tok, r, OPTS) for r in records]
    assert all(not isinstance(e, str) for e in enc), enc
    return enc, {k: jnp.asarray(v) for k, v in examples.collate(enc, T, budget, prot_len).items()}


def test_each_example_alone_matches_reference(pair, tok):
    ref, ours = pair
    for record in RECORDS:
        ref_logits, target, answer = ref.reference_forward(tok, record)
        enc, batch = make_batch(tok, [record])
        t = enc[0].length
        assert t == ref_logits.shape[1]
        np.testing.assert_array_equal(np.asarray(batch["loss_mask"][0, :t]), target)
        logits = np.asarray(forward(ours, batch))
        assert np.abs(logits[0, :t] - ref_logits[0]).max() < 1e-4, record


def test_mixed_padded_batch_matches_reference_per_example(pair, tok):
    ref, ours = pair
    enc, batch = make_batch(tok, RECORDS)
    logits = np.asarray(forward(ours, batch))
    total, count = 0.0, 0
    for b, record in enumerate(RECORDS):
        ref_logits, target, answer = ref.reference_forward(tok, record)
        t = enc[b].length
        assert np.abs(logits[b, :t] - ref_logits[0]).max() < 1e-4
        # reference loss: answer tokens predicted from the position before each
        lp = jax.nn.log_softmax(ref_logits[0, :-1], axis=-1)
        ids = np.asarray(batch["input_ids"][b, 1:t])
        total -= float(np.sum(np.take_along_axis(np.asarray(lp), ids[:, None], 1)[:, 0] * target[1:]))
        count += int(target[1:].sum())
    loss_sum, n = loss(ours, batch)
    assert int(n) == count
    assert abs(float(loss_sum) - total) < 1e-3 * max(1.0, abs(total))


def test_padding_never_reaches_the_sequence_or_loss(pair, tok):
    _, ours = pair
    _, small = make_batch(tok, RECORDS[:3])
    _, large = make_batch(tok, RECORDS[:3], T=320,
                          budget=examples.Budget(batch=8, nodes=128, edges=400, graphs=9, proteins=6), prot_len=80)
    a, b = np.asarray(forward(ours, small)), np.asarray(forward(ours, large))
    for i in range(3):
        t = int(small["attention_mask"][i].sum())
        np.testing.assert_allclose(a[i, :t], b[i, :t], atol=1e-5)
    la, na = loss(ours, small)
    lb, nb = loss(ours, large)
    assert int(na) == int(nb) and abs(float(la) - float(lb)) < 1e-3
    # garbage in padding rows / padded entity positions changes nothing
    noisy = dict(large)
    noisy["input_ids"] = jnp.where(large["attention_mask"] == 0, 7, large["input_ids"])
    noisy["prot_ids"] = jnp.where(large["prot_mask"] == 0, 5, large["prot_ids"])
    c = np.asarray(forward(ours, noisy))
    for i in range(3):
        t = int(small["attention_mask"][i].sum())
        np.testing.assert_allclose(c[i, :t], b[i, :t], atol=1e-5)
    assert abs(float(loss(ours, noisy)[0]) - float(lb)) < 1e-4


def test_entity_tokens_are_every_atom_and_every_esm_position(pair, tok):
    _, ours = pair
    enc, batch = make_batch(tok, RECORDS[:3])
    n_atoms = [len(m[0]) for e in enc for m in e.mols]
    assert int((np.asarray(batch["mol_slot"]) >= 0).sum()) == sum(n_atoms)
    assert int((np.asarray(batch["prot_slot"]) >= 0).sum()) == len(PROTS[0]) + len(PROTS[1]) + 4  # + cls/eos
    slots = np.concatenate([np.asarray(batch["mol_slot"]), np.asarray(batch["prot_slot"]).ravel()])
    slots = slots[slots >= 0]
    assert len(set(slots.tolist())) == len(slots)  # no two entity tokens share a position
    assert not np.asarray(batch["loss_mask"]).ravel()[slots].any()


def test_openbiomed_checkpoint_round_trip_bit_exact(pair, tmp_path, torch):
    ref, ours = pair
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    out = openbiomed.to_state_dict(ours)
    unused = {k for k in sd if any(s in k for s in ("pooler.", "contact_head.", "inv_freq"))}
    assert out.keys() == sd.keys() - unused and unused  # the ESM pooler/contact head are not part of BioMedGPT
    for k in out:
        assert out[k].dtype == sd[k].dtype and np.array_equal(out[k], sd[k]), k
    path = tmp_path / "biomedgpt_10b.pth"
    openbiomed.save(ours, path)
    again = openbiomed.load(path, ref.llm_config(), ref.prot_structure_encoder.config.to_dict())
    back = openbiomed.to_state_dict(again)
    assert all(np.array_equal(back[k], out[k]) for k in out)


def test_checkpoint_errors_name_the_key(pair):
    ref, _ = pair
    sd = {k: v.numpy() for k, v in ref.state_dict().items()}
    esm = ref.prot_structure_encoder.config.to_dict()
    bad = dict(sd, **{"proj_mol.weight": np.zeros((3, 3), np.float32)})
    with pytest.raises(ValueError, match=r"proj_mol\.weight' has shape \(3, 3\)"):
        openbiomed.from_state_dict(bad, ref.llm_config(), esm)
    with pytest.raises(KeyError, match="keys outside"):
        openbiomed.from_state_dict(dict(sd, stray=np.zeros(1)), ref.llm_config(), esm)
    with pytest.raises(KeyError, match="missing tensor 'proj_prot.bias'"):
        openbiomed.from_state_dict({k: v for k, v in sd.items() if k != "proj_prot.bias"}, ref.llm_config(), esm)
    extra = dict(sd, **{"prot_structure_encoder.pooler.dense.weight": np.zeros((2, 2), np.float32),
                        "llm.model.rotary_emb.inv_freq": np.zeros(8, np.float32)})
    openbiomed.from_state_dict(extra, ref.llm_config(), esm)  # ignored keys of the real checkpoint


def test_10b_config_is_the_real_shape():
    from bmgpt_jax.models.biomedgpt import BioMedGPTConfig
    cfg = config_lib.load(BioMedGPTConfig, "biomedgpt_10b")
    assert (cfg.lm.hidden_size, cfg.lm.num_layers, cfg.lm.vocab_size) == (4096, 32, 32001)
    assert (cfg.esm.hidden_size, cfg.esm.num_layers, cfg.esm.num_heads) == (2560, 36, 40)
    assert (cfg.gin.num_layers, cfg.gin.emb_dim) == (5, 300)
