"""Log-likelihood multiple choice against transformers: each option's summed log-probability as the answer,
from our sharded, bucketed, jitted scorer, equals the reference composition's (transformers'
`LlamaForCausalLM` on the same random weights, with the molecule / protein features spliced in), on one
device and on a data x fsdp x tensor mesh of the 8 virtual CPU devices."""
import dataclasses

import numpy as np
import pytest

from bmgpt_jax import evaluate as ev
from bmgpt_jax import parallel
from bmgpt_jax.data.records import Record
from bmgpt_jax.data.text import attach_tokenizer, load_tokenizer
from bmgpt_jax.evaluation import batches
from bmgpt_jax.evaluation.choices import answer_options, gold_key
from bmgpt_jax.evaluation.scoring import MeshModel
from tests.biomedgpt_pair import tiny_pair

RECORDS = [
    Record((("molecule", "CC(=O)Oc1ccccc1C(=O)O"),), "Which drug is this?\nA. Aspirin\nB. Caffeine\nC. Ethanol",
           "A. Aspirin", label="A", id="mol"),
    Record((), "Context: water covers most of the planet.\nQuestion: Is water common?\nAnswer yes, no or maybe.",
           "Yes. It covers most of the planet.", label="yes", id="text"),
    Record((("protein", "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ"),), "What does it do?\nA. It binds DNA\nB. Nothing at all",
           "B. Nothing at all", label="B", id="prot"),
    Record((("molecule", "CN1C=NC2=C1C(=O)N(C(=O)N2C)C"),), "Stimulant?\nA. Yes\nB. No\nC. Maybe\nD. Unknown",
           "A. Yes", label="A", id="caffeine"),
]


@pytest.fixture(scope="module")
def tok(shared_data):
    return load_tokenizer(str(shared_data / "tokenizer" / "llama2_tokenizer.model"))


@pytest.fixture(scope="module")
def pair(tok, torch):
    ref, ours = tiny_pair(tok.vocab_size)
    return ref, attach_tokenizer(ours, tok)


def reference_logprobs(ref, tok, record):
    """({option: summed log-probability of its tokens (not EOS)}, [options whose every token is the argmax of
    the logits before it]) from the torch reference composition."""
    import torch
    out, greedy = {}, []
    for key, text in answer_options(record).items():
        logits, _, answer = ref.reference_forward(tok, dataclasses.replace(record, answer=text))
        lp = torch.log_softmax(torch.from_numpy(logits[0]).double(), -1).numpy()
        first = logits.shape[1] - len(answer)                     # answer + EOS are the last positions
        out[key] = sum(lp[first - 1 + k, answer[k]] for k in range(len(answer) - 1))
        if all(lp[first - 1 + k].argmax() == answer[k] for k in range(len(answer) - 1)):
            greedy.append(key)
    return out, greedy


def reference_argmax_hits(ref, tok, record, ids):
    """[bool] per token of the continuation `ids` after `record`'s prompt: it is the argmax of the torch
    reference's logits before it (teacher-forced, as the scorer reads them)."""
    logits, _, _ = ref.reference_forward(tok, record, answer_ids=list(ids))
    first = logits.shape[1] - len(ids)
    return [int(logits[0, first - 1 + k].argmax()) == ids[k] for k in range(len(ids))]


@pytest.mark.parametrize("shape", [(1, 1, 1), (2, 2, 2)])
def test_option_logprobs_match_transformers(pair, tok, shape):
    ref, ours = pair
    mesh = parallel.make_mesh(shape)
    rows, metrics = ev.evaluate(ours, RECORDS, batch_size=12, mode="loglik", mesh=mesh)
    for record, row in zip(RECORDS, rows):
        want, want_greedy = reference_logprobs(ref, tok, record)
        got = row["ll_logprobs"]
        assert row["ll_greedy"] == want_greedy, (record.id, row["ll_greedy"], want_greedy)
        assert set(got) == set(want)
        for key in want:
            assert abs(got[key] - want[key]) < 2e-3 * max(1.0, abs(want[key])), (record.id, key, got, want)
        best = max(want, key=want.get)
        per_char = {k: want[k] / len(answer_options(record)[k]) for k in want}
        assert row["ll_choice"] == best and row["ll_correct"] == (best == gold_key(record))
        assert row["ll_choice_norm"] == max(per_char, key=per_char.get)
        assert "prediction" not in row
    assert metrics["n"] == 4 and metrics["ll_accuracy"] == np.mean([r["ll_correct"] for r in rows])
    assert metrics["speed"]["loglik_options_per_s"] > 0


def test_scorer_batches_are_bucketed_and_sharded(pair, tok):
    _, ours = pair
    mesh = parallel.make_mesh((4, 2, 1))
    mm = MeshModel(ours, mesh)
    assert batches.rows_per_process(3, mesh) == 8                     # rounded up to the 8 batch shards
    assert [batches.bucket(n) for n in (1, 64, 65, 97, 130, 200)] == [64, 64, 96, 128, 192, 256]
    rows, encoded = ev.encode_records(mm, RECORDS, None, 0)
    options = ev.options_of(mm, RECORDS, rows, encoded)
    assert len(options) == 3 + 3 + 2 + 4
    local = batches.collate_local([o.encoded for o in options[:5]], 8, mesh, filler=options[0].encoded, max_len=1024)
    assert local["input_ids"].shape[0] == 8 and local["input_ids"].shape[1] in batches.LENGTHS
    assert all(local[k].shape[0] % 8 == 0 for k in ("mol_atoms", "mol_bonds", "mol_n_node", "prot_ids"))
    from bmgpt_jax.data.pipeline import global_batch
    arrays = global_batch(local, mesh)
    assert arrays["input_ids"].sharding.spec[0] == ("data", "fsdp")
    total, greedy = mm.option_logprobs(arrays, max(o.tokens for o in options[:5]))
    assert total.shape == (8,) and greedy.dtype == bool and np.isfinite(total).all()
    np.testing.assert_allclose(total[5:], total[0], rtol=1e-5)        # filler rows repeat the first option


def test_greedy_flag_is_every_token_the_reference_argmax(pair, tok):
    """`option_logprobs`' greedy flag (reported as `ll_greedy`) is true when EVERY token of the continuation is
    the argmax of the logits before it, as read from the torch reference's logits. On random weights no
    written option is greedy, so the continuations here are built from the reference's own greedy decoding:
    all of it (true), and copies with one token replaced (false, although the other tokens are still the
    argmax: an "any token" rule would call them greedy)."""
    from bmgpt_jax.data.examples import Encoded
    from bmgpt_jax.data.pipeline import global_batch
    ref, ours = pair
    record, n = RECORDS[0], 4
    greedy = []
    for _ in range(n):                                         # the reference's greedy continuation, token by token
        logits, _, _ = ref.reference_forward(tok, record, answer_ids=greedy + [tok.eos_id])
        greedy.append(int(logits[0, logits.shape[1] - 2].argmax()))
    other = lambda t: (t + 1) % tok.vocab_size                 # noqa: E731 (not the argmax: that is `t`)
    candidates = [greedy, greedy[:-1] + [other(greedy[-1])], [greedy[0], other(greedy[1])] + greedy[2:],
                  [other(greedy[0])] + greedy[1:]]
    hits = [reference_argmax_hits(ref, tok, record, c) for c in candidates]
    want = [all(h) for h in hits]
    assert want[:3] == [True, False, False] and all(any(h) for h in hits[1:3]), hits   # "all" != "any" here
    mm = MeshModel(ours, parallel.make_mesh((1, 1, 1)))
    _, encoded = ev.encode_records(mm, [record], None, 0, loglik=True)
    enc = encoded[0]
    rows = [Encoded(np.concatenate([enc.input_ids, np.asarray(c, np.int32)]),
                    np.concatenate([np.zeros_like(enc.input_ids), np.ones(len(c), enc.input_ids.dtype)]),
                    enc.mols, enc.prots) for c in candidates]
    local = batches.collate_local(rows, 8, mm.mesh, filler=rows[0], max_len=mm.config.lm.max_position_embeddings)
    _, got = mm.option_logprobs(global_batch(local, mm.mesh), n)
    assert got[:len(candidates)].tolist() == want, (got, hits)
