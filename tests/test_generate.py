"""runtime.generate() end to end: greedy parity with Hugging Face, preemption, sharing, beams."""

import json

import pytest
import torch

import runtime
from helpers_checkpoint import hf_greedy, make_llama, random_prompts
from runtime import SamplingParams
from helpers_native import native_missing

LENGTHS = [1, 7, 16, 17, 33]
NEW = 12


@pytest.fixture(scope="module", params=["gqa1", "gqa4"])
def ckpt(request, tmp_path_factory):
    """(folder, HF model, prompts, HF greedy results) for two head layouts."""
    path = tmp_path_factory.mktemp(request.param)
    prompts = random_prompts(LENGTHS, 160, seed=3)
    if request.param == "gqa4":
        hf = make_llama(path, hidden=64, heads=4, kv_heads=1, layers=2, vocab=160, seed=2)
        return path, hf, prompts, [hf_greedy(hf, p, NEW) for p in prompts]
    hf = make_llama(path, hidden=64, heads=4, kv_heads=4, layers=3, vocab=160, seed=1)
    # make a token the model emits early an EOS too, so that some requests stop before max_tokens
    eos = [hf_greedy(hf, prompts[1], 3)[0][2], 2]
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "eos_token_id": eos}))
    return path, hf, prompts, [hf_greedy(hf, p, NEW, eos_token_id=eos) for p in prompts]


NATIVE = native_missing(4, 16)


@pytest.mark.parametrize("backend", ["auto", "torch"])
@pytest.mark.parametrize("block_size", [1, 16, 32])
def test_greedy_matches_transformers(ckpt, block_size, backend):
    path, _, prompts, refs = ckpt
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=NEW), block_size=block_size, backend=backend)
    assert [o.prompt_token_ids for o in outs] == prompts
    eos = runtime.load_model(path, device="cpu").config.eos_token_ids
    for out, (ref_ids, ref_logprob) in zip(outs, refs):
        comp = out.outputs[0]
        assert comp.token_ids == ref_ids
        assert comp.cumulative_logprob == pytest.approx(ref_logprob, abs=1e-3)
        assert comp.finish_reason == ("stop" if len(ref_ids) < NEW else "length")
        assert (comp.token_ids[-1] in eos) == (comp.finish_reason == "stop")
    assert len(eos) == 1 or any(o.outputs[0].finish_reason == "stop" for o in outs)
    # auto on the CPU: the native C kernel when a compiler works, else torch
    assert outs.stats["backend"] == ("native" if backend == "auto" and not NATIVE else "torch")
    assert outs.stats["peak_blocks_in_use"] > 0


@pytest.mark.parametrize("backend", ["auto", "torch"])
def test_chunked_prefill_matches_transformers(ckpt, backend):
    """A budget of 6 tokens per step chunks every prompt longer than that across steps (decodes
    of the others run meanwhile): the same greedy tokens and logprobs as transformers."""
    path, _, prompts, refs = ckpt
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=NEW), block_size=4,
                            max_num_seqs=2, max_num_batched_tokens=6, backend=backend)
    assert outs.stats["partial_prefill_chunks"] >= sum((n - 1) // 6 for n in LENGTHS)
    for out, (ref_ids, ref_logprob) in zip(outs, refs):
        assert out.outputs[0].token_ids == ref_ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(ref_logprob, abs=1e-3)


def test_tiny_pool_preempts_and_keeps_parity(ckpt):
    path, _, prompts, refs = ckpt
    outs, stats = runtime.generate(path, prompts, SamplingParams(max_tokens=NEW), block_size=4,
                                   num_blocks=16, return_stats=True)
    assert stats["preemptions"] > 0
    assert [o.outputs[0].token_ids for o in outs] == [r[0] for r in refs]


def test_triton_backend_matches_transformers(tmp_path):
    hf = make_llama(tmp_path, hidden=128, heads=4, kv_heads=2, head_dim=64, layers=1, vocab=128, seed=4)
    prompts = random_prompts([5, 17], 128, seed=4)
    outs = runtime.generate(tmp_path, prompts, SamplingParams(max_tokens=5), block_size=16, backend="triton")
    assert outs.stats["backend"] == "triton"
    for p, out in zip(prompts, outs):
        ref_ids, ref_logprob = hf_greedy(hf, p, 5)
        assert out.outputs[0].token_ids == ref_ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(ref_logprob, abs=1e-3)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    path = tmp_path_factory.mktemp("small")
    hf = make_llama(path, hidden=64, heads=4, kv_heads=2, layers=2, vocab=128, seed=5, tokenizer=True)
    return path, hf, random_prompts([9, 14], 128, seed=6)


def _separate_peak(path, prompt, copies, max_tokens, block_size):
    """Peak blocks of ``copies`` independent n=1 requests of the same prompt (no sharing at all)."""
    outs = runtime.generate(path, [prompt] * copies, SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                            block_size=block_size, enable_prefix_caching=False)
    return outs.stats["peak_blocks_in_use"]


def test_parallel_samples_share_prompt_blocks(small):
    path, _, prompts = small
    params = SamplingParams(max_tokens=10, n=4, temperature=1.0, seed=11, ignore_eos=True)
    outs = runtime.generate(path, [prompts[0]], params, block_size=4, enable_prefix_caching=False)
    stats = outs.stats
    samples = [c.token_ids for c in outs[0].outputs]
    assert [c.index for c in outs[0].outputs] == [0, 1, 2, 3]
    assert len({tuple(s) for s in samples}) > 1 and all(len(s) == 10 for s in samples)
    saved = stats["blocks_saved_by_sharing_at_peak"]
    prompt_blocks = len(prompts[0]) // 4  # full prompt blocks stay shared by all 4 samples
    assert saved == 3 * prompt_blocks
    no_sharing = _separate_peak(path, prompts[0], 4, 10, 4)
    assert stats["peak_blocks_no_sharing"] == no_sharing
    assert stats["peak_blocks_in_use"] == no_sharing - saved
    assert stats["cow_copies"] == 3  # the shared partial last block, copied once per extra sample


def test_seeded_sampling_is_reproducible_and_batch_independent(small):
    path, _, prompts = small
    params = SamplingParams(max_tokens=8, n=2, temperature=0.8, top_k=20, top_p=0.9, seed=7)
    alone = runtime.generate(path, [prompts[0]], params)
    again = runtime.generate(path, [prompts[0]], params)
    mixed = runtime.generate(path, [prompts[1], prompts[0]],
                             [SamplingParams(max_tokens=5, temperature=1.0), params], seed=123)
    tokens = [[c.token_ids for c in o.outputs] for o in (alone[0], again[0], mixed[1])]
    assert tokens[0] == tokens[1] == tokens[2]
    other = runtime.generate(path, [prompts[0]], SamplingParams(max_tokens=8, n=2, temperature=0.8,
                                                                 top_k=20, top_p=0.9, seed=8))
    assert [c.token_ids for c in other[0].outputs] != tokens[0]


def test_unseeded_sampling_leaves_the_global_rng_alone(small):
    path, _, prompts = small
    torch.manual_seed(0)
    expected = torch.rand(4)
    torch.manual_seed(0)
    outs = runtime.generate(path, [prompts[0]], SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True))
    assert len(outs[0].outputs[0].token_ids) == 3
    assert torch.equal(torch.rand(4), expected)


def _hf_beams(hf, prompt, width, max_new, **kwargs):
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width,
                          do_sample=False, max_new_tokens=max_new, length_penalty=0.0, pad_token_id=0,
                          output_scores=True, return_dict_in_generate=True, **kwargs)
    return [s[len(prompt):].tolist() for s in out.sequences], out.sequences_scores.tolist()


def test_beam_search_matches_transformers_and_saves_blocks(small):
    path, hf, prompts = small
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=8, beam_width=4, ignore_eos=True),
                            block_size=4, enable_prefix_caching=False)
    for p, out in zip(prompts, outs):
        ref_ids, ref_scores = _hf_beams(hf, p, 4, 8, min_new_tokens=8)
        assert [c.token_ids for c in out.outputs] == ref_ids
        assert [c.cumulative_logprob for c in out.outputs] == pytest.approx(ref_scores, abs=1e-3)
    stats = outs.stats
    no_sharing = _separate_peak(path, prompts[0], 4, 8, 4) + _separate_peak(path, prompts[1], 4, 8, 4)
    assert stats["peak_blocks_no_sharing"] == no_sharing
    assert stats["blocks_saved_by_sharing_at_peak"] > 0
    assert stats["peak_blocks_in_use"] == no_sharing - stats["blocks_saved_by_sharing_at_peak"]
    assert stats["cow_copies"] > 0 and stats["sharing_saving"] > 0.2


def test_beam_search_with_stop_token_matches_transformers(small):
    path, hf, prompts = small
    stop = hf_greedy(hf, prompts[1], 4)[0][2]  # a token the model likes to emit soon
    outs = runtime.generate(path, [prompts[1]], SamplingParams(max_tokens=8, beam_width=3, stop_token_ids=[stop]))
    ref_ids, ref_scores = _hf_beams(hf, prompts[1], 3, 8, eos_token_id=stop)
    got = [c.token_ids for c in outs[0].outputs]
    assert any(ids[-1] == stop for ids in got)
    assert [c.finish_reason for c in outs[0].outputs] == ["stop" if ids[-1] == stop else "length" for ids in got]
    assert got == [r[: r.index(stop) + 1] if stop in r else r for r in ref_ids]
    assert [c.cumulative_logprob for c in outs[0].outputs] == pytest.approx(ref_scores, abs=1e-3)


def test_text_prompts_and_stop_tokens(small):
    path, hf, _ = small
    loaded = runtime.load_model(path, device="cpu")
    outs = runtime.generate(loaded, ["the cat sat on a mat", [3, 4, 5]], SamplingParams(max_tokens=6))
    assert outs[0].prompt == "the cat sat on a mat" and outs[0].prompt_token_ids == [3, 4, 5, 6, 7, 8]
    assert outs[1].prompt is None
    for out in outs:
        comp = out.outputs[0]
        assert comp.text == loaded.tokenizer.decode(comp.token_ids, skip_special_tokens=True)
        assert comp.token_ids == hf_greedy(hf, out.prompt_token_ids, 6)[0]
    first = outs[0].outputs[0].token_ids
    stopped = runtime.generate(loaded, ["the cat sat on a mat"],
                               SamplingParams(max_tokens=6, stop_token_ids=[first[1]]))
    assert stopped[0].outputs[0].token_ids == first[: first.index(first[1]) + 1]
    assert stopped[0].outputs[0].finish_reason == "stop"


def test_prefix_cache_hits_keep_outputs_and_order(small):
    path, hf, prompts = small
    shared = random_prompts([32], 128, seed=9)[0]
    batch = [shared + prompts[0], shared + prompts[1], shared]
    params = [SamplingParams(max_tokens=6), SamplingParams(max_tokens=3), SamplingParams(max_tokens=5)]
    outs = runtime.generate(path, batch, params, block_size=16, max_num_seqs=1)
    # the 2 shared blocks for the second prompt; 1 for the third (its last token is always recomputed)
    assert outs.stats["prefix_cache_hit_blocks"] == 3
    for p, sp, out in zip(batch, params, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, p, sp.max_tokens)[0]


def test_step_meter_matches_the_memory_manager_every_step(small):
    path, _, prompts = small
    engine = runtime.Engine(runtime.load_model(path, device="cpu"), num_blocks=14, block_size=4)
    engine.add_request(prompts[0], SamplingParams(max_tokens=9, n=3, temperature=1.0, seed=1, ignore_eos=True))
    engine.add_request(prompts[1], SamplingParams(max_tokens=9, beam_width=3, ignore_eos=True))
    record, checked = engine.meter.record, []

    def checked_record(kv):
        step, truth = record(kv), kv.stats()  # kv.stats() is exact but O(table entries); the meter O(seqs)
        assert step == {k: truth[k] for k in ("blocks_in_use", "logical_blocks", "tokens_stored")}
        checked.append((truth["logical_blocks"], truth["blocks_in_use"]))
        return step

    engine.meter.record = checked_record
    while engine.has_unfinished():
        engine.step()
    stats = engine.stats()
    assert stats["preemptions"] > 0 and len(checked) == engine.meter.steps
    assert stats["peak_blocks_no_sharing"] == max(logical for logical, _ in checked)
    assert stats["sharing_saving"] == pytest.approx(1 - sum(u for _, u in checked) / sum(l for l, _ in checked))
    assert len(engine.pop_finished()) == 2


def test_step_counts_requests_aborted_alongside_running_ones(small):
    path, _, prompts = small
    engine = runtime.Engine(runtime.load_model(path, device="cpu"), num_blocks=4, block_size=4)
    engine.add_request(prompts[0][:5], SamplingParams(max_tokens=3))       # 2 blocks: runs
    engine.add_request(list(range(3, 30)), SamplingParams(max_tokens=3))   # 7 blocks > pool: aborted
    assert engine.step() == 1
    (done,) = engine.pop_finished()
    assert done.request_id == 1 and done.completions == [([], 0.0, "abort")]
    assert done.error.startswith("request_id=1 needs 7 KV blocks of 4 tokens to be admitted")
    while engine.has_unfinished():
        engine.step()
    assert [d.request_id for d in engine.pop_finished()] == [0]


@pytest.mark.parametrize("dtype,tol", [("float16", 0.02), ("bfloat16", 0.1)])
def test_half_precision_greedy_is_greedy_up_to_rounding(small, dtype, tol):
    path, hf, prompts = small
    outs = runtime.generate(path, prompts, SamplingParams(max_tokens=8, ignore_eos=True), dtype=dtype,
                            block_size=4)
    assert runtime.load_model(path, dtype=dtype, device="cpu").dtype == getattr(torch, dtype)
    for p, out in zip(prompts, outs):
        new = out.outputs[0].token_ids
        with torch.no_grad():  # fp32 reference, teacher-forced on our tokens
            logits = hf(torch.tensor([p + new])).logits[0, len(p) - 1: -1]
        chosen = logits[torch.arange(len(new)), torch.tensor(new)]
        assert (chosen >= logits.max(-1).values - tol).all()  # each pick is an fp32 argmax up to rounding
        ref_logprob = float(logits.log_softmax(-1)[torch.arange(len(new)), torch.tensor(new)].sum())
        assert out.outputs[0].cumulative_logprob == pytest.approx(ref_logprob, abs=len(new) * tol)
