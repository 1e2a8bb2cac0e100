"""Sampling: parameter checks, the sampled distribution, top-k / top-p support, seeds, beam ranking."""

import math

import pytest
import torch

from runtime.beam import BeamSearch
from runtime.sampling import SamplingParams, beam_candidates, make_generator, sample


@pytest.mark.parametrize("kwargs,name", [
    ({"max_tokens": 0}, "max_tokens=0"), ({"max_tokens": 2.5}, "max_tokens=2.5"),
    ({"temperature": -0.1}, "temperature=-0.1"), ({"temperature": float("nan")}, "temperature=nan"),
    ({"top_p": 0.0}, "top_p=0.0"), ({"top_p": 1.5}, "top_p=1.5"), ({"top_k": -2}, "top_k=-2"),
    ({"n": 0}, "n=0"), ({"beam_width": 0}, "beam_width=0"), ({"seed": "x"}, "seed='x'"),
    ({"n": 2, "beam_width": 2}, "n=2 and beam_width=2"),
    ({"beam_width": 2, "temperature": 0.5}, "beam_width=2 needs temperature=0"),
    ({"stop_token_ids": [1, -3]}, "-3"), ({"stop_token_ids": "ab"}, "stop_token_ids='ab'"),
])
def test_invalid_sampling_params_name_the_value(kwargs, name):
    with pytest.raises(ValueError, match=name.replace("(", r"\(").replace("+", r"\+")):
        SamplingParams(**kwargs)


def test_defaults_and_normalization():
    p = SamplingParams(stop_token_ids=[5, 6], temperature=1)
    assert p.stop_token_ids == (5, 6) and p.temperature == 1.0 and not p.greedy
    d = SamplingParams()
    assert (d.max_tokens, d.temperature, d.top_p, d.top_k, d.n, d.beam_width) == (16, 0.0, 1.0, 0, 1, 1)
    assert d.greedy and d.num_outputs == 1 and SamplingParams(beam_width=3).num_outputs == 3


def test_greedy_rows_take_the_argmax_and_report_model_logprobs():
    logits = torch.randn(5, 50, generator=torch.Generator().manual_seed(0))
    tokens, logprobs = sample(logits, [SamplingParams()] * 5, [None] * 5)
    assert tokens == logits.argmax(-1).tolist()
    expected = logits.log_softmax(-1)[torch.arange(5), logits.argmax(-1)]
    assert logprobs == pytest.approx(expected.tolist(), abs=1e-6)


def test_temperature_sampling_follows_the_softmax():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -30.0]])
    params = SamplingParams(temperature=0.7)
    gen = make_generator(3, 0, torch.device("cpu"))
    draws = 6000
    counts = torch.zeros(5)
    for _ in range(draws // 200):  # 200 rows per call, one shared stream
        tokens, _ = sample(logits.expand(200, 5), [params] * 200, [gen] * 200)
        counts += torch.bincount(torch.tensor(tokens), minlength=5).float()
    expected = (logits[0] / 0.7).softmax(-1) * draws
    chi2 = float((((counts - expected) ** 2) / expected.clamp_min(1e-9))[:4].sum())
    assert counts[4] == 0
    assert chi2 < 16.3  # chi-square, 3 dof, p = 0.001


def test_top_k_and_top_p_restrict_the_support():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(1, 40, generator=g).expand(300, 40).contiguous()
    top5 = set(logits[0].topk(5).indices.tolist())
    tokens, _ = sample(logits, [SamplingParams(temperature=1.5, top_k=5)] * 300, [None] * 300, g)
    assert set(tokens) <= top5 and len(set(tokens)) >= 3
    probs = logits[0].softmax(-1)
    order = probs.argsort(descending=True)
    mass = probs[order].cumsum(0)
    nucleus = set(order[: int((mass < 0.6).sum()) + 1].tolist())  # smallest set with mass >= 0.6
    tokens, _ = sample(logits, [SamplingParams(temperature=1.0, top_p=0.6)] * 300, [None] * 300, g)
    assert set(tokens) <= nucleus and len(set(tokens)) >= 2
    tiny, _ = sample(logits[:50], [SamplingParams(temperature=1.0, top_p=1e-6)] * 50, [None] * 50, g)
    assert set(tiny) == {int(order[0])}


def test_seeded_rows_do_not_depend_on_the_rest_of_the_batch():
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(2))
    params = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=1.0)] * 2

    def run(shared_seed):
        gens = [make_generator(5, 0, torch.device("cpu")), None, make_generator(5, 1, torch.device("cpu")), None]
        return sample(logits, params, gens, torch.Generator().manual_seed(shared_seed))[0]

    runs = [run(s) for s in range(6)]
    assert len({(r[0], r[2]) for r in runs}) == 1            # seeded rows: always the same
    assert len({(r[1], r[3]) for r in runs}) > 1             # unseeded rows follow the shared stream


def test_beam_candidates_rank_over_all_beams():
    logprobs = torch.log_softmax(torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.5, 2.4]]), -1)
    cands = beam_candidates([-1.0, -0.2], logprobs, 3)
    totals = logprobs + torch.tensor([[-1.0], [-0.2]])
    best = totals.view(-1).topk(3)
    assert [(b * 3 + t) for b, t, _, _ in cands] == best.indices.tolist()
    assert [c[3] for c in cands] == pytest.approx(best.values.tolist())
    assert all(c[2] == pytest.approx(float(logprobs[c[0], c[1]])) for c in cands)


def test_beam_search_sets_aside_enders_and_stops_when_nothing_can_improve():
    search = BeamSearch(SamplingParams(beam_width=2, stop_token_ids=[0]), eos_token_ids=[], max_len=100)
    lp = torch.log(torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3]]))
    plan = search.step([[7], [8]], [0.0, -1.0], lp)
    # ranks: beam0/tok0 (stop, -0.69), beam0/tok1 (-1.20), beam0/tok2 (-1.61), beam1/tok1 (-1.51)
    assert [h.token_ids for h in search.hyps] == [[7, 0]]
    assert plan.extend == [(0, 1, pytest.approx(math.log(0.3))), (1, 1, pytest.approx(math.log(0.6)))]
    assert plan.prune == []
    assert not search.is_done(-1.2)
    search.finish_live([7, 2], -1.5, "length")
    assert search.is_done(-1.6) and not search.is_done(-1.4)
    assert [h.cumulative_logprob for h in search.best()] == pytest.approx([math.log(0.5), -1.5])
