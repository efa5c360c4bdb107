"""Jitted KV-cache generation vs transformers' `generate`, sampling options, stop sequences."""
import json

import jax.numpy as jnp
import numpy as np
import pytest

from bmgpt_jax.convert import hf_llama
from bmgpt_jax.generation import generate
from bmgpt_jax.generation.sampling import _decode
from tests.torch_refs.hf_llama import make_hf_llama

VOCAB = 211
LENS = (9, 4, 6, 1)


@pytest.fixture(scope="session")
def models(tmp_path_factory, torch):
    path = tmp_path_factory.mktemp("gen_llama")
    hf = make_hf_llama(path, num_kv_heads=2, vocab_size=VOCAB, seed=3)
    return hf, hf_llama.load(path, scan_layers=True)


def prompts(pad_left: bool, lens=LENS, seed: int = 7):
    """Random prompts of `lens` tokens, `[len(lens), max(lens)]` ids and mask, padded left or right."""
    rs = np.random.RandomState(seed)
    t = max(lens)
    ids = np.zeros((len(lens), t), np.int64)
    mask = np.zeros_like(ids)
    for i, n in enumerate(lens):
        sl = slice(t - n, t) if pad_left else slice(0, n)
        ids[i, sl] = rs.randint(3, VOCAB, n)
        mask[i, sl] = 1
    return ids, mask


def hf_generate(hf, torch, **kw):
    ids, mask = prompts(pad_left=True)
    with torch.no_grad():
        out = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), pad_token_id=0, do_sample=False, **kw)
    return out.numpy()[:, ids.shape[1]:]


@pytest.mark.parametrize("pad_left", [True, False], ids=["left-padded", "right-padded"])
def test_greedy_equals_transformers_generate(models, torch, pad_left):
    hf, ours = models
    ref = hf_generate(hf, torch, max_new_tokens=32, eos_token_id=None)
    ids, mask = prompts(pad_left)
    out = generate(ours, ids, mask, max_new_tokens=32, eos_token_id=-1)
    assert out.shape == (len(LENS), 32)
    np.testing.assert_array_equal(out, ref)
    assert len(set(out.ravel().tolist())) > 4  # a non-degenerate continuation


def test_greedy_from_embeddings_equals_ids(models):
    _, ours = models
    ids, mask = prompts(pad_left=False)
    a = generate(ours, ids, mask, max_new_tokens=12, eos_token_id=-1)
    b = generate(ours, inputs_embeds=ours.embed(jnp.asarray(ids)), attention_mask=mask, max_new_tokens=12,
                 eos_token_id=-1)
    np.testing.assert_array_equal(a, b)


def test_eos_and_repetition_penalty_match_transformers(models, torch):
    hf, ours = models
    ids, mask = prompts(pad_left=True)
    ref = hf_generate(hf, torch, max_new_tokens=24, eos_token_id=None, repetition_penalty=1.5)
    out = generate(ours, ids, mask, max_new_tokens=24, eos_token_id=-1, repetition_penalty=1.5)
    np.testing.assert_array_equal(out, ref)
    eos = int(ref[0, 5])  # make a token the greedy path emits act as EOS
    ref_eos = hf_generate(hf, torch, max_new_tokens=24, eos_token_id=eos, repetition_penalty=1.5)
    out_eos = generate(ours, ids, mask, max_new_tokens=24, eos_token_id=eos, repetition_penalty=1.5)
    n = ref_eos.shape[1]  # transformers stops once every row is done; we pad to max_new_tokens
    np.testing.assert_array_equal(out_eos[:, :n], ref_eos)
    assert (out_eos[:, n:] == 0).all()
    assert (out_eos[0, 6:] == 0).all()



def test_several_eos_ids_from_config_json_stop_as_transformers(models, torch, tmp_path):
    """A config.json `eos_token_id` list (Llama-3 style) used to keep only its first id, so generation ran on
    past the second. Loaded from such a folder, ours stops by default at any of them, as HF's generate."""
    hf, ours = models
    ids, mask = prompts(pad_left=True)
    free = hf_generate(hf, torch, max_new_tokens=24, eos_token_id=None)
    at = next(i for i in range(3, 24) if free[0, i] not in free[0, :i])   # row 0 first emits `second` there
    second = int(free[0, at])
    first = next(int(t) for t in free[1] if t not in free[0, :at + 1])    # another row's token, not row 0's
    eos = [first, second]
    ref = hf_generate(hf, torch, max_new_tokens=24, eos_token_id=eos)
    assert ref[0, at] == second and (ref[0, at + 1:] == 0).all()          # HF stops row 0 at the second id
    hf_llama.save(ours, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": eos}))
    loaded = hf_llama.load(tmp_path, scan_layers=True)
    assert loaded.config.eos_token_id == tuple(eos)
    out = generate(loaded, ids, mask, max_new_tokens=24)                  # the model config's EOS ids
    n = ref.shape[1]
    np.testing.assert_array_equal(out[:, :n], ref)
    assert (out[:, n:] == 0).all()


def test_eos_ids_are_a_tuple_and_none_is_refused():
    from bmgpt_jax.generation import GenerationConfig
    assert GenerationConfig(eos_token_id=[2, 7]).eos_token_id == (2, 7)   # hashable: jit's static options
    assert GenerationConfig(eos_token_id=[2, 7], stop_sequences=((835,),)).stops == ((2,), (7,), (835,))
    with pytest.raises(ValueError, match=r"^generation option eos_token_id=\(\) must be an id or a non-empty"):
        GenerationConfig(eos_token_id=())

def test_stop_sequence_ends_a_row(models):
    _, ours = models
    ids, mask = prompts(pad_left=False)
    free = generate(ours, ids, mask, max_new_tokens=16, eos_token_id=-1)
    stop = tuple(int(t) for t in free[1, 3:5])
    out = generate(ours, ids, mask, max_new_tokens=16, eos_token_id=-1, stop_sequences=(stop,))
    first = next(i for i in range(1, 16) if tuple(free[1, i - 1:i + 1]) == stop)
    np.testing.assert_array_equal(out[1, :first + 1], free[1, :first + 1])
    assert (out[1, first + 1:] == 0).all()


@pytest.mark.parametrize("num_beams", [1, 3], ids=["greedy", "beam"])
def test_a_stop_sequence_longer_than_the_new_tokens_never_matches(models, num_beams):
    """`max_new_tokens=1` with a two-token stop (chat's Llama `###` is `[2277, 29937]`) crashed the trace
    (a slice wider than the token buffer); such a stop cannot occur whole, so the tokens are those
    without it. A stop whose first tokens are generated but not its last does not end the row either."""
    _, ours = models
    ids, mask = prompts(pad_left=False)
    kw = dict(eos_token_id=-1, num_beams=num_beams)
    for n in (1, 2):
        free = generate(ours, ids, mask, max_new_tokens=n, **kw)
        prefix = tuple(int(t) for t in free[0])
        for stop in ((5, 6), prefix + (7,)):
            out = generate(ours, ids, mask, max_new_tokens=n, stop_sequences=(stop,), **kw)
            np.testing.assert_array_equal(out, free, err_msg=f"max_new_tokens={n}, stop {stop}")


def test_an_empty_stop_sequence_is_refused():
    """An empty stop sequence would match at every step (each row cut after one token): refused by name."""
    from bmgpt_jax.generation import GenerationConfig
    with pytest.raises(ValueError, match=r"^generation option stop_sequences=\(\(835,\), \(\)\) must be non-empty"):
        GenerationConfig(stop_sequences=((835,), ()))


def test_sampling_is_seeded_and_filters(models):
    _, ours = models
    ids, mask = prompts(pad_left=False)
    kw = dict(max_new_tokens=16, eos_token_id=-1, do_sample=True, temperature=1.5)
    a = generate(ours, ids, mask, seed=1, **kw)
    b = generate(ours, ids, mask, seed=1, **kw)
    c = generate(ours, ids, mask, seed=2, **kw)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    greedy = generate(ours, ids, mask, max_new_tokens=16, eos_token_id=-1)
    np.testing.assert_array_equal(generate(ours, ids, mask, seed=3, top_k=1, **kw), greedy)
    np.testing.assert_array_equal(generate(ours, ids, mask, seed=3, top_p=1e-6, **kw), greedy)


WARPERS = [dict(temperature=0.7), dict(temperature=1.5), dict(top_k=5), dict(top_p=0.3), dict(top_p=0.9),
           dict(temperature=0.7, top_k=5, top_p=0.9), dict(temperature=1.5, top_k=12, top_p=0.3), dict(top_k=0),
           dict(top_k=0, top_p=0.9), dict()]


def hf_warped(hf, torch, logits, **kw):
    """`logits` through the warpers that transformers' own `_get_logits_processor` builds for sampling with
    these options and HF's defaults for the others (top_k 50), so in HF's order: temperature, top-k, top-p;
    with the warper types it chose."""
    from transformers import GenerationConfig as HFGenerationConfig
    default_k = HFGenerationConfig._get_default_generation_params()["top_k"]   # what `generate` fills in
    procs = hf._get_logits_processor(generation_config=HFGenerationConfig(do_sample=True, **{"top_k": default_k, **kw}),
                                     input_ids_seq_length=1)
    with torch.no_grad():
        out = procs(torch.zeros((logits.shape[0], 1), dtype=torch.long), torch.tensor(logits))
    return out.numpy(), [type(p).__name__ for p in procs]


@pytest.mark.parametrize("kw", WARPERS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_filter_logits_equals_transformers_warpers(models, torch, kw):
    """Temperature / top-k / top-p at non-degenerate settings against transformers' `TemperatureLogitsWarper`,
    `TopKLogitsWarper`, `TopPLogitsWarper` (the chain `generate` builds): the same tokens kept (-inf there,
    float32's lowest value here) and the same scaled logits on them. The extremes of
    `test_sampling_is_seeded_and_filters` (top_k=1, top_p~0) cannot tell an inverted temperature, a top-k
    that keeps one token, or a top-p that drops the token crossing the threshold from the right ones. Options
    not given take both sides' defaults: HF's top_k=50 cut (ours was 0, no cut: sampling drew from the whole
    vocabulary's tail), so the vocabulary here is wider than 50."""
    from bmgpt_jax.generation import GenerationConfig
    from bmgpt_jax.generation.options import filter_logits
    hf, _ = models
    logits = (np.random.RandomState(11).randn(6, 120) * 2.5).astype(np.float32)
    ref, names = hf_warped(hf, torch, logits, **kw)
    given = {**kw, "top_k": kw.get("top_k", 50)}
    assert names == [n for opt, n in (("temperature", "TemperatureLogitsWarper"), ("top_k", "TopKLogitsWarper"),
                                      ("top_p", "TopPLogitsWarper")) if given.get(opt)]
    ours = np.asarray(filter_logits(jnp.asarray(logits), GenerationConfig(do_sample=True, **kw)))
    kept = ours > np.finfo(np.float32).min
    np.testing.assert_array_equal(kept, np.isfinite(ref))
    if given["top_k"] or "top_p" in kw:  # a real cut: more than the top token kept, not every token
        assert (kept.sum(1) < logits.shape[1]).all() and (kept.sum(1) > 1).any(), kept.sum(1)
    else:
        assert kept.all()
    np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


def test_sampled_frequencies_follow_the_warped_softmax(models, torch):
    """Draws of `sample_logits` (the decoding loops' token choice) with temperature, top-k and top-p together:
    the empirical frequencies over 40000 draws match the softmax of transformers' warped logits (within 5
    standard errors), and no token that HF filters out is ever drawn."""
    import jax
    from bmgpt_jax.generation import GenerationConfig
    from bmgpt_jax.generation.options import sample_logits
    hf, _ = models
    kw = dict(temperature=0.7, top_k=5, top_p=0.9)
    logits = (np.random.RandomState(5).randn(1, 40) * 1.5).astype(np.float32)
    ref, _ = hf_warped(hf, torch, logits, **kw)
    probs = torch.softmax(torch.tensor(ref[0]), -1).numpy()
    n = 40000
    draws = np.asarray(sample_logits(jnp.asarray(np.repeat(logits, n, 0)), jax.random.key(0),
                                     GenerationConfig(do_sample=True, **kw)))
    freq = np.bincount(draws, minlength=logits.shape[1]) / n
    assert (freq[probs == 0] == 0).all()
    assert ((probs > 0).sum() > 2) and probs.max() < 0.8, probs  # a spread to check, not one near-certain token
    np.testing.assert_array_less(np.abs(freq - probs), 5 * np.sqrt(probs * (1 - probs) / n) + 1e-9)


def test_decode_loop_is_one_compiled_function(models):
    _, ours = models
    ids, mask = prompts(pad_left=False)
    generate(ours, ids, mask, max_new_tokens=8, eos_token_id=-1)
    n = _decode._cache_size()
    generate(ours, ids[::-1].copy(), mask[::-1].copy(), max_new_tokens=8, eos_token_id=-1)
    assert _decode._cache_size() == n  # same shapes: no retrace, the loop is inside the jit


def test_a_prompt_token_equal_to_the_pad_id_is_penalised(models):
    """Right-padded with id 0, a prompt that holds a real 0: the repetition penalty must still see that 0
    (duplicate scatter indices must not let a padding 0 un-mark it). The head is tilted so that 0 is
    the unpenalised first choice (1.5x the logit of the model's own choice g); penalised by 2 it loses."""
    from flax import nnx
    _, ours = models
    ids, mask = prompts(pad_left=False)
    row = 2                                                     # 6 real tokens, 3 padding zeros after them
    ids[row, 3] = 0
    alone = ids[row:row + 1, :LENS[row]]
    g = int(generate(ours, alone, max_new_tokens=1, eos_token_id=-1)[0, 0])
    assert g != 0 and g not in alone
    tilted = nnx.clone(ours)
    kernel = tilted.lm_head.kernel
    kernel[...] = kernel[...].at[:, 0].set(1.5 * kernel[...][:, g])
    assert generate(tilted, alone, max_new_tokens=1, eos_token_id=-1)[0, 0] == 0     # unpenalised: 0 wins
    kw = dict(max_new_tokens=6, eos_token_id=-1, repetition_penalty=2.0)
    want = generate(tilted, alone, **kw)[0]
    assert want[0] != 0
    np.testing.assert_array_equal(generate(tilted, ids, mask, **kw)[row], want)


@pytest.fixture(scope="session")
def long_models(tmp_path_factory, torch):
    path = tmp_path_factory.mktemp("gen_llama_long")
    hf = make_hf_llama(path, num_kv_heads=2, vocab_size=VOCAB, seed=4, max_positions=512)
    return hf, hf_llama.load(path, scan_layers=True)


@pytest.mark.parametrize("pad_left", [True, False], ids=["left-padded", "right-padded"])
def test_more_than_256_cache_slots_equal_transformers(long_models, torch, pad_left):
    """A 40-token prompt + 240 new tokens = 280 cache slots (chat always asks for more than 256): the
    prompt is prefilled at a slot offset on the CPU's `rows` path, each decode step on the plain path."""
    hf, ours = long_models
    lens, t, new = (40, 23, 31, 5), 40, 240
    ids, mask = prompts(pad_left, lens, seed=11)
    left = np.stack([np.roll(r, -int(m.sum())) for r, m in zip(ids, mask)]) if not pad_left else ids
    left_mask = np.stack([np.roll(m, -int(m.sum())) for m in mask]) if not pad_left else mask
    with torch.no_grad():  # transformers is given the prompts left-padded, as it wants for generation
        ref = hf.generate(torch.tensor(left), attention_mask=torch.tensor(left_mask), pad_token_id=0,
                          do_sample=False, max_new_tokens=new, eos_token_id=None).numpy()[:, t:]
    out = generate(ours, ids, mask, max_new_tokens=new, eos_token_id=-1)
    assert out.shape == (len(lens), new)
    np.testing.assert_array_equal(out, ref)
    assert len(set(out[:, -40:].ravel().tolist())) > 4  # still a non-degenerate continuation at the end


@pytest.mark.parametrize("num_beams", [1, 2], ids=["sampling", "beam"])
def test_prefill_runs_the_lm_head_on_the_last_positions_only(num_beams):
    """A 512-token prompt at vocab 32000: the prompt's logits for every position would be `[2, 512, 32000]`
    float32 (131 MB); prefill keeps only each row's last, so the whole compiled generation (prefill, cache,
    loop) needs less than an eighth of that in temporaries."""
    import jax
    from flax import nnx
    from bmgpt_jax.generation import GenerationConfig
    from bmgpt_jax.generation.beam import _beam_decode
    from bmgpt_jax.models.llama import LlamaConfig, LlamaForCausalLM
    b, t, vocab = 2, 512, 32000
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                      num_kv_heads=2, max_position_embeddings=t + 8)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: LlamaForCausalLM(cfg, rngs=nnx.Rngs(0))))
    ids = jax.ShapeDtypeStruct((b, t), jnp.int32)
    gen = GenerationConfig(max_new_tokens=8, eos_token_id=-1, num_beams=num_beams)
    if num_beams == 1:
        lowered = _decode.lower(graphdef, state, ids, None, ids, jax.random.key(0), cfg=gen)
    else:
        lowered = _beam_decode.lower(graphdef, state, ids, None, ids, cfg=gen)
    temp = lowered.compile().memory_analysis().temp_size_in_bytes
    assert temp < b * t * vocab * 4 / 8, f"{temp / 1e6:.0f} MB of temporaries"


@pytest.mark.parametrize("shape", [(2, 2, 2), (1, 2, 4)], ids=["2x2x2", "1x2x4"])
def test_a_model_sharded_on_a_mesh_decodes_as_on_one_device(models, shape):
    """Weights laid out by the rule table on 8 devices: greedy, beam and seeded sampling give one device's
    tokens (traced within the mesh: attention per shard, the decode rules; on 1x2x4 the 2 kv heads do not
    divide the tensor axis and stay whole), left-padded prompts included."""
    from flax import nnx
    from bmgpt_jax import parallel
    _, ours = models
    graphdef, state = nnx.split(ours)
    mesh = parallel.make_mesh(shape)
    sharded = nnx.merge(graphdef, parallel.shard(state, mesh))
    assert parallel.mesh_of(nnx.state(sharded)) is mesh
    ids, mask = prompts(pad_left=True)
    for options in (dict(max_new_tokens=10, eos_token_id=-1), dict(max_new_tokens=8, num_beams=3, eos_token_id=-1),
                    dict(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8, seed=5, eos_token_id=-1)):
        one = generate(ours, ids, mask, **options)
        np.testing.assert_array_equal(generate(sharded, ids, mask, **options), one, err_msg=str(options))
