"""Jitted beam search vs transformers' `generate(num_beams=5, repetition_penalty=1.5, do_sample=False)`."""
import jax.numpy as jnp
import numpy as np
import pytest

from bmgpt_jax.generation.beam import _beam_decode
from bmgpt_jax.convert import hf_llama
from bmgpt_jax.generation import generate
from tests.generation.test_generate import VOCAB, prompts
from tests.torch_refs.hf_llama import make_hf_llama

N = 16
BEAM = dict(num_beams=5, repetition_penalty=1.5, max_new_tokens=N)
PADDING = pytest.mark.parametrize("pad_left", [True, False], ids=["left-padded", "right-padded"])


@pytest.fixture(scope="module")
def models(tmp_path_factory, torch):
    path = tmp_path_factory.mktemp("beam_llama")
    hf = make_hf_llama(path, num_kv_heads=2, vocab_size=VOCAB, seed=3)
    return hf, hf_llama.load(path, scan_layers=True)


def as_ours(hf_new: np.ndarray, eos: int | list[int] | None) -> np.ndarray:
    """HF's new tokens -> our layout: cut after the first EOS (any of a list), pad (0) to N. HF fills the
    tail with EOS (the first of a list) when pad_token_id is 0 and stops at the longest best hypothesis of
    the batch."""
    stops = eos if isinstance(eos, list) else [eos]
    out = np.zeros((hf_new.shape[0], N), np.int64)
    for i, row in enumerate(hf_new.tolist()):
        end = next((j for j, t in enumerate(row) if t in stops), None)
        row = row if end is None else row[:end + 1]
        out[i, :len(row)] = row
    return out


def hf_beam(hf, torch, eos=None, **kw):
    """HF beam search on the left-padded batch; new tokens in our layout."""
    ids, mask = prompts(pad_left=True)
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), pad_token_id=0, do_sample=False,
                          eos_token_id=eos, **BEAM, **kw)
    return as_ours(out.numpy()[:, ids.shape[1]:], eos)


@pytest.fixture(scope="module")
def free_ref(models, torch):
    """HF's best beams without EOS `[4, N]`."""
    return hf_beam(models[0], torch)


@PADDING
def test_beam_equals_transformers_generate(models, free_ref, pad_left):
    _, ours = models
    out = generate(ours, *prompts(pad_left), eos_token_id=-1, **BEAM)
    assert out.shape == (len(free_ref), N)
    np.testing.assert_array_equal(out, free_ref)
    assert len(set(out.ravel().tolist())) > 20  # a non-degenerate continuation


@pytest.mark.parametrize("length_penalty", [1.0, -0.5])
def test_finished_hypotheses_match_transformers(models, torch, free_ref, length_penalty):
    """An EOS the beams emit ends hypotheses early; with length_penalty -0.5 every row's hypotheses finish
    and HF's early-stop heuristic ends the search before N tokens."""
    hf, ours = models
    eos = int(free_ref[2, 2])
    ref = hf_beam(hf, torch, eos=eos, length_penalty=length_penalty)
    ended = [(row == eos).any() for row in ref]
    assert sum(ended) >= 2 and (ref == 0).any()
    for pad_left in (True, False):
        out = generate(ours, *prompts(pad_left), eos_token_id=eos, length_penalty=length_penalty, **BEAM)
        np.testing.assert_array_equal(out, ref)



def test_several_eos_ids_match_transformers(models, torch, free_ref):
    """Two EOS ids (a config.json list): either ends a hypothesis, as in HF's beam search (which keeps
    `max(2, 1 + number of EOS ids) * num_beams` candidates a step; so does ours)."""
    hf, ours = models
    eos = [int(free_ref[2, 2]), int(free_ref[1, 2])]
    ref = hf_beam(hf, torch, eos=eos)
    ended = {e: sum(e in row for row in ref.tolist()) for e in eos}
    assert len(ended) == 2 and all(ended.values()), ended
    for pad_left in (True, False):
        out = generate(ours, *prompts(pad_left), eos_token_id=tuple(eos), **BEAM)
        np.testing.assert_array_equal(out, ref)

@PADDING
@pytest.mark.filterwarnings("ignore:Passing `repetition_penalty` with `inputs_embeds`")
def test_beam_from_embeddings_matches_transformers(models, torch, pad_left):
    """Ours from the embeddings of the padded batch vs HF from each row's embeddings alone. (HF's padded
    embeddings batch is not a reference: its repetition penalty skips the first `left_pad` *generated*
    tokens of a row, as `prompt_ignore_length` assumes the prompt ids are in `input_ids`.)"""
    hf, ours = models
    ids, mask = prompts(pad_left)
    ref = []
    for row, m in zip(ids, mask):
        with torch.no_grad():
            emb = hf.get_input_embeddings()(torch.tensor(row[m.astype(bool)])[None])
            ref.append(hf.generate(inputs_embeds=emb, pad_token_id=0, do_sample=False, eos_token_id=None,
                                   **BEAM).numpy()[0])
    out = generate(ours, inputs_embeds=ours.embed(jnp.asarray(ids)), attention_mask=mask, eos_token_id=-1, **BEAM)
    np.testing.assert_array_equal(out, np.stack(ref))


def test_stop_sequence_ends_hypotheses(models, free_ref):
    """A two-token stop sequence ends a hypothesis right after it; the loop continues for other rows."""
    _, ours = models
    stop = tuple(int(t) for t in free_ref[1, 3:5])
    out = generate(ours, *prompts(False), eos_token_id=-1, stop_sequences=(stop,), **BEAM)
    ends = 0
    for row in out.tolist():
        hit = next((i for i in range(1, N) if tuple(row[i - 1:i + 1]) == stop), None)
        if hit is not None:
            assert all(t == 0 for t in row[hit + 1:])
            ends += 1
    assert ends >= 1 and tuple(out[1, 3:5]) == stop and (out != 0).all(axis=1).any()


def test_beam_loop_is_one_compiled_function(models):
    _, ours = models
    ids, mask = prompts(pad_left=False)
    generate(ours, ids, mask, eos_token_id=-1, **BEAM)
    n = _beam_decode._cache_size()
    generate(ours, ids[::-1].copy(), mask[::-1].copy(), eos_token_id=-1, **BEAM)
    assert _beam_decode._cache_size() == n  # same shapes: no retrace, the loop is inside the jit
