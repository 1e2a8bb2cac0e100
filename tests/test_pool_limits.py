"""A request the KV pool can never hold fails loudly: a ValueError before anything runs from
generate(), finish reason "abort" with the reason from the engine; never a silent "length".

The up-front bound (runtime.kv_layout.request_peak_blocks) is exact for these cases: a pool of
exactly the bound finishes every request at max_tokens, one block less is refused.
"""

import pytest

import runtime
from helpers_checkpoint import make_llama
from runtime import SamplingParams
from runtime.kv_layout import request_peak_blocks

BS = 4
CASES = {  # name -> (sampling params, peak blocks for a 6-token prompt)
    "n1": (SamplingParams(max_tokens=10, ignore_eos=True), 4),                       # ceil(15 / 4)
    "n4": (SamplingParams(max_tokens=10, n=4, temperature=1.0, seed=3, ignore_eos=True), 1 + 4 * 3),
    "beam3": (SamplingParams(max_tokens=10, beam_width=3, ignore_eos=True), 1 + 3 * 3),
}
PROMPT = [5, 9, 11, 7, 3, 8]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("pool")
    make_llama(path, hidden=32, heads=2, kv_heads=1, layers=1, vocab=64, max_pos=64)
    return runtime.load_model(path, device="cpu")


@pytest.mark.parametrize("case", list(CASES))
def test_bound_is_the_peak(case):
    params, peak = CASES[case]
    assert request_peak_blocks(len(PROMPT), params.max_tokens, BS, num_seqs=params.num_outputs) == peak


@pytest.mark.parametrize("case", list(CASES))
def test_generate_refuses_a_request_that_can_never_fit(ckpt, case):
    params, peak = CASES[case]
    for num_blocks in (1, peak - 1):
        with pytest.raises(ValueError, match=rf"prompts\[0\] \(request 0: 6 prompt tokens \+ max_tokens=10.*\) "
                                             rf"needs up to {peak} KV blocks of 4 .*num_blocks={num_blocks} "):
            runtime.generate(ckpt, [PROMPT], params, block_size=BS, num_blocks=num_blocks)


@pytest.mark.parametrize("case", list(CASES))
def test_a_pool_of_exactly_the_bound_finishes_at_length(ckpt, case):
    params, peak = CASES[case]
    out = runtime.generate(ckpt, [PROMPT], params, block_size=BS, num_blocks=peak, enable_prefix_caching=False)
    assert out.stats["peak_blocks_in_use"] <= peak and out[0].error is None
    assert [c.finish_reason for c in out[0].outputs] == ["length"] * params.num_outputs
    assert all(len(c.token_ids) == 10 for c in out[0].outputs)


@pytest.mark.parametrize("case", list(CASES))
def test_engine_aborts_by_name_instead_of_truncating(ckpt, case):
    params, _ = CASES[case]
    engine = runtime.Engine(ckpt, num_blocks=2, block_size=BS)  # generate() would refuse this pool
    engine.add_request(PROMPT, params)
    while engine.has_unfinished():
        engine.step()
    (done,) = engine.pop_finished()
    reasons = {c[2] for c in done.completions}
    assert "abort" in reasons and "length" not in reasons, done.completions
    assert done.error.startswith("request_id=0 needs ") and "to grow" in done.error and "num_blocks=2" in done.error
    assert all(len(c[0]) < 10 for c in done.completions)
    assert engine.kv.pool.num_free == 2  # nothing leaked


def test_generate_reports_an_abort_it_could_not_foresee(ckpt, monkeypatch):
    """If the engine still aborts (a bound that is wrong, or an Engine subclass), generate()
    returns the partial output with "abort", the error on the output and a warning."""
    import runtime.api as api

    monkeypatch.setattr(api.kv_layout, "request_peak_blocks", lambda *a, **k: 1)
    with pytest.warns(RuntimeWarning, match="aborted: request_id=0 needs"):
        out = runtime.generate(ckpt, [PROMPT], CASES["n1"][0], block_size=BS, num_blocks=2)
    assert out[0].outputs[0].finish_reason == "abort" and out[0].error.startswith("request_id=0 needs")
