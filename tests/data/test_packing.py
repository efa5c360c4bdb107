"""Packed rows (`data.pack`): several examples end to end in a row, each its own segment.

Packing keeps every example exactly once, each batch inside its budgets and every row inside the last
bucket; a packed batch gives each example the logits it gets alone in the independent PyTorch reference
(molecules, proteins and plain QA in one row) and the same loss as the unpacked batch, so packing changes
only how many rows the data takes. Resume, the state check and the processes' agreement on a window's
batch count hold as unpacked (two real processes: tests/test_distributed.py).
"""
import dataclasses
from collections import Counter

import jax.numpy as jnp
import numpy as np
import pytest

from bmgpt_jax.data import examples
from bmgpt_jax.data.filling import pack_rows
from bmgpt_jax.data.pipeline import BatchIterator, DataConfig
from bmgpt_jax.data.records import Record
from bmgpt_jax.models.biomedgpt import sequence_mask
from tests.models.test_biomedgpt import OPTS, RECORDS, forward, loss, make_batch, pair, tok  # noqa: F401  (fixtures)

TEXT = "Kinases phosphorylate proteins. " * 3


def encoded(length: int, atoms: int = 0) -> examples.Encoded:
    """A synthetic example of `length` positions (loss after the first) with one molecule of `atoms` atoms."""
    mols = [(np.zeros((atoms, 2), np.int32), np.zeros((2, 2 * atoms), np.int32), np.zeros((2 * atoms, 2), np.int32),
             np.arange(atoms, dtype=np.int32))] if atoms else []
    return examples.Encoded(np.ones(length, np.int32), (np.arange(length) > 0).astype(np.int32), mols, [])


def test_pack_rows_keeps_every_example_once_within_rows_and_budgets():
    rng = np.random.default_rng(0)
    exs = [encoded(int(n), int(a)) for n, a in zip(rng.integers(20, 400, 300), rng.integers(0, 30, 300))]
    budget = examples.Budget(batch=4, nodes=200, edges=10_000, graphs=9, proteins=0)
    batches = pack_rows(exs, budget, 512)
    placed = [id(e) for rows in batches for row in rows for e in row]
    assert sorted(placed) == sorted(id(e) for e in exs)
    for rows in batches:
        assert 1 <= len(rows) <= budget.batch
        assert all(sum(e.length for e in row) <= 512 for row in rows)
        used = tuple(np.sum([e.budget for row in rows for e in row], axis=0))
        assert budget.exceeded(used, (0, 0, 0, 0), 0) is None, used
    text_only = [encoded(e.length) for e in exs]
    packed = pack_rows(text_only, budget, 512)
    rows = sum(len(r) for r in packed)
    assert rows <= np.ceil(1.15 * sum(e.length for e in text_only) / 512), rows   # first fit decreasing: dense
    assert len(packed) == -(-rows // budget.batch)
    with pytest.raises(ValueError, match="513 positions is longer than a row"):
        pack_rows([encoded(513)], budget, 512)


def segments_of(batch) -> Counter:
    """Each example of a (packed or unpacked) batch as (ids, loss mask, molecule slots, protein slots), slots
    relative to the example's first position."""
    B, T = batch["input_ids"].shape
    seg = batch.get("segment_ids", batch["attention_mask"])
    mol = batch["mol_slot"][batch["mol_slot"] >= 0]
    prot = batch["prot_slot"][batch["prot_slot"] >= 0]
    out = Counter()
    for b in range(B):
        for s in set(seg[b][seg[b] > 0].tolist()):
            where = np.flatnonzero(seg[b] == s)
            t0, t1 = where[0], where[-1] + 1
            assert len(where) == t1 - t0                         # one contiguous run
            assert batch["loss_mask"][b, t0] == 0                # nothing predicted across examples
            inside = lambda slots: tuple(sorted(int(x) - b * T - t0 for x in slots  # noqa: E731
                                                if b * T + t0 <= x < b * T + t1))
            out[(tuple(batch["input_ids"][b, t0:t1].tolist()), tuple(batch["loss_mask"][b, t0:t1].tolist()),
                 inside(mol), inside(prot))] += 1
    return out


def epoch(cfg: DataConfig, records) -> list[dict]:
    it = BatchIterator(cfg, records=records)
    try:
        return list(it)
    finally:
        it.close()


MIXED = [Record((), "", f"{TEXT} Document {i}. " * (1 + i % 7), id=str(i)) for i in range(40)] + RECORDS * 4


def test_a_packed_epoch_holds_every_example_once_in_fewer_batches():
    """Plain text, molecules, proteins and two entities in one example: the same examples as unpacked (ids,
    losses and where their atoms and residues land), each in one contiguous segment whose first token has
    no loss, with the attention mask the segments' union."""
    cfg = DataConfig(sources=("demo",), batch_size=4, seq_buckets=(128, 256, 512), window_batches=8, num_epochs=1,
                     node_budget=256, edge_budget=600, graph_budget=16, protein_budget=8, shuffle=False)
    plain = epoch(cfg, MIXED)
    packed = epoch(DataConfig(**{**cfg.__dict__, "pack": True}), MIXED)
    assert "segment_ids" not in plain[0] and all("segment_ids" in b for b in packed)
    for b in packed:
        np.testing.assert_array_equal(b["attention_mask"], b["segment_ids"] > 0)
    whole = lambda batches: sum((segments_of(b) for b in batches), Counter())  # noqa: E731
    assert whole(packed) == whole(plain) and sum(whole(plain).values()) == len(MIXED)
    real = lambda batches: sum(int(b["attention_mask"].sum()) for b in batches)  # noqa: E731
    positions = lambda batches: sum(b["attention_mask"].size for b in batches)  # noqa: E731
    assert real(packed) == real(plain)
    assert len(packed) < len(plain) / 2, (len(packed), len(plain))
    assert real(packed) / positions(packed) > 0.8 > real(plain) / positions(plain)


def test_packed_rows_give_each_example_its_own_logits_and_loss(pair, tok):  # noqa: F811
    """Two rows holding the five reference records (a molecule, a protein, a molecule and a protein, plain
    QA, a molecule) end to end: each segment's logits equal the PyTorch reference's for that record alone,
    and the batch's loss and token count equal the unpacked batch's."""
    ref, ours = pair
    enc = [examples.encode_example(tok, r, OPTS) for r in RECORDS]
    rows = [[0, 1, 2], [3, 4]]
    budget = examples.Budget(batch=2, nodes=64, edges=160, graphs=5, proteins=3)
    packed = examples.collate([[enc[i] for i in row] for row in rows], 512, budget, 48, packed=True)
    batch = {k: jnp.asarray(v) for k, v in packed.items()}
    logits = np.asarray(forward(ours, batch))
    for b, row in enumerate(rows):
        t0 = 0
        for i in row:
            ref_logits = ref.reference_forward(tok, RECORDS[i])[0]
            assert np.abs(logits[b, t0:t0 + enc[i].length] - ref_logits[0]).max() < 1e-4
            t0 += enc[i].length
    _, unpacked = make_batch(tok, RECORDS)
    (packed_sum, packed_n), (plain_sum, plain_n) = loss(ours, batch), loss(ours, unpacked)
    assert int(packed_n) == int(plain_n) > 0
    np.testing.assert_allclose(float(packed_sum), float(plain_sum), rtol=1e-5)


def test_the_bare_decoder_gives_packed_documents_their_own_logits_and_loss(tmp_path):
    """Stage 1 (`lm_loss` on the bare decoder): plain-text documents packed two and three to a row have the
    logits and the loss they have alone, which the same rows without their segment ids do not (the
    documents would attend to each other); and the training job's `lm` batches keep `segment_ids`."""
    from flax import nnx

    from bmgpt_jax import config as config_lib
    from bmgpt_jax.models.biomedgpt import lm_loss
    from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
    from bmgpt_jax.training import loop
    from tests.training.runs import cfg_for
    rng = np.random.default_rng(0)
    docs = [examples.Encoded(np.r_[1, rng.integers(3, 500, n - 1)].astype(np.int32),
                             (np.arange(n) > 0).astype(np.int32), [], []) for n in (9, 30, 17, 40, 5)]
    rows = [[0, 1, 2], [3, 4]]
    budget = examples.Budget(batch=2, nodes=2, edges=0, graphs=2, proteins=0)
    text = ("input_ids", "attention_mask", "loss_mask", "segment_ids")
    packed = {k: jnp.asarray(v) for k, v in examples.collate([[docs[i] for i in r] for r in rows], 64, budget, 8,
                                                             packed=True).items() if k in text}
    alone = {k: jnp.asarray(v) for k, v in examples.collate(docs, 64, examples.Budget(5, 2, 0, 2, 0), 8).items()
             if k in text}
    model = LlamaForCausalLM(dataclasses.replace(config_lib.load(LlamaConfig, "llama_tiny"), vocab_size=512),
                             rngs=nnx.Rngs(0))
    mixed = {k: v for k, v in packed.items() if k != "segment_ids"}
    decode = nnx.jit(lambda m, b: m.logits(m.model(b["input_ids"], **sequence_mask(b))))
    logits = {name: np.asarray(decode(model, b)) for name, b in (("packed", packed), ("alone", alone), ("mixed", mixed))}
    gap = 0.0
    for b, row in enumerate(rows):
        t0 = 0
        for i in row:
            n = docs[i].length
            np.testing.assert_allclose(logits["packed"][b, t0:t0 + n], logits["alone"][i, :n], atol=2e-5)
            gap = max(gap, np.abs(logits["mixed"][b, t0:t0 + n] - logits["alone"][i, :n]).max())
            t0 += n
    assert gap > 1e-2, gap                               # without the segments the documents do mix
    (ps, pn), (us, un) = nnx.jit(lm_loss)(model, packed), nnx.jit(lm_loss)(model, alone)
    assert int(pn) == int(un) == sum(d.length - 1 for d in docs)
    np.testing.assert_allclose(float(ps), float(us), rtol=1e-5)
    cfg = cfg_for(tmp_path, "stage=lm", "data.pack=true")
    it = BatchIterator(cfg.data)
    _, batch = next(loop._batches(it, loop.resolve_tokenizer(cfg, it.tokenizer)))
    assert set(batch) == set(text)


def test_collate_refuses_a_packed_example_with_loss_on_its_first_token():
    bad = examples.Encoded(np.ones(5, np.int32), np.ones(5, np.int32), [], [])
    with pytest.raises(ValueError, match="packed example 2 of row 0 has loss on its first token"):
        examples.collate([[encoded(4), bad]], 16, examples.Budget(1, 4, 0, 2, 0), 8, packed=True)
    with pytest.raises(ValueError, match="row 0 holds 17 or more positions, more than T = 16"):
        examples.collate([[encoded(10), encoded(7)]], 16, examples.Budget(1, 4, 0, 2, 0), 8, packed=True)


PACK = DataConfig(sources=("demo",), batch_size=4, seq_buckets=(256,), window_batches=4, pack=True,
                  node_budget=256, edge_budget=600, graph_budget=16, protein_budget=8)


def test_a_packed_run_resumes_mid_window_with_the_same_batches():
    it = BatchIterator(PACK, records=MIXED)
    for _ in range(3):
        next(it)
    state = it.state()
    ahead = [next(it) for _ in range(4)]
    again = BatchIterator(PACK, records=MIXED)
    again.restore(state)
    for a, b in zip(ahead, [next(again) for _ in range(4)]):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    unpacked = BatchIterator(DataConfig(**{**PACK.__dict__, "pack": False}), records=MIXED)
    with pytest.raises(ValueError, match="saved with pack=True, this pipeline has False: resume with data.pack=True"):
        unpacked.restore(state)


def test_processes_simulated_in_one_need_a_rule_to_agree_on_the_batch_count():
    with pytest.raises(ValueError, match="data.pack with 2 simulated processes in 1 JAX process"):
        BatchIterator(PACK, 0, 2, records=MIXED)
    counts = {p: [] for p in range(2)}
    for p in range(2):
        it = BatchIterator(DataConfig(**{**PACK.__dict__, "num_epochs": 1}), p, 2, records=MIXED,
                           agree=lambda k, p=p: counts[p].append(k) or 9)
        batches = list(it)
        assert len(batches) == 9 * it.windows_per_epoch
        assert sum(b["attention_mask"].sum() == 0 for b in batches) == 9 * it.windows_per_epoch - sum(counts[p])
    assert counts[0] != counts[1]            # the processes' own counts differ; each emits the agreed 9


def test_training_on_packed_rows_on_a_sharded_mesh(tmp_path):
    """The stage-1 job on packed batches (`segment_ids` kept for the `lm` stage's text-only batches, sharded
    over the batch axes like the rest): it runs on a 2x2x2 mesh and learns. (BioMedGPT's stages take the
    same `segment_ids` through `BioMedGPT.hidden`: the reference parity test above.)"""
    from tests.training.runs import cfg_for
    from bmgpt_jax.training import loop as train
    cfg = cfg_for(tmp_path, "stage=lm", "data.pack=true", "steps=6", "mesh=[2,2,2]", "optim.lr=1e-2")
    out = train.run(cfg)
    losses = out["losses"]
    assert sorted(losses) == list(range(1, 7)) and losses[6] < losses[1], losses


def test_a_packed_run_says_when_each_epoch_ends(tmp_path, capsys):
    """Packed, the steps an epoch takes depend on its tokens: the job names the step that ends each one,
    once, and a resumed run goes on counting from the checkpoint's epoch."""
    from tests.training.runs import cfg_for
    from bmgpt_jax.training import loop as train
    args = ("stage=lm", "data.pack=true", "data.demo_molecules=3", "mesh=[1,1,1]")
    per_epoch = len(epoch(DataConfig(**{**cfg_for(tmp_path, *args).data.__dict__, "num_epochs": 1}), None))
    assert 1 <= per_epoch <= 3, per_epoch                # demo QA of 3 molecules: a few batches
    def lines():
        return [x for x in capsys.readouterr().out.splitlines() if x.startswith("data: ") and "epoch" in x]
    want = lambda first, last: [f"data: {n} epoch(s) done at step {n * per_epoch}"  # noqa: E731
                                for n in range(1, last // per_epoch + 1) if n * per_epoch > first]
    train.run(cfg_for(tmp_path, *args, "steps=4"))       # mid-epoch: the resumed run's first step ends none
    assert lines() == want(0, 4)
    train.run(cfg_for(tmp_path, *args, "steps=8"), resume=True)
    assert lines() == want(4, 8) and want(4, 8)


def test_a_packed_window_whose_examples_were_all_dropped_is_one_empty_batch():
    """Every process emits at least one batch a window, as unpacked: a window holding only a QA example
    longer than the last bucket is an empty batch (counted `too_long`), not the end of the iterator."""
    long = Record((), "Why? " * 400, "Because.")
    cfg = DataConfig(**{**PACK.__dict__, "num_epochs": 1, "shuffle": False, "window_batches": 1, "batch_size": 1})
    it = BatchIterator(cfg, records=[RECORDS[3], long])
    batches = list(it)
    assert len(batches) == 2 and batches[1]["attention_mask"].sum() == 0 and batches[0]["attention_mask"].sum() > 0
    assert it.counts() == {"examples": 2, "too_long": 1}
