"""The C elementwise ops (``runtime/native/layer_ops.c``) against float64 references, on strided
views, on one thread and split over OpenMP threads, and the decoder without them."""

import pytest
import torch

from helpers_native import require_native
from runtime.model.native_ops import NativeOps
from runtime.model.ops import rotate_half
from runtime.native_build import load_native

OPS = NativeOps.for_model(torch.float32, torch.device("cpu"))


@pytest.fixture
def native_built():
    """Tests of the C ops need the library: without it they fail saying how to get a compiler
    (never skip)."""
    require_native()


needs_ops = pytest.mark.usefixtures("native_built")


def test_the_library_builds_where_a_compiler_is():
    """The CPU kernels must build here: otherwise every native test would fail on its own."""
    require_native()
    assert load_native() is not None and OPS is not None


@needs_ops
@pytest.mark.parametrize("rows,dim", [(1, 64), (3, 100), (700, 64)])  # 700 x 64: split over threads
@pytest.mark.parametrize("with_delta", [True, False])
def test_add_rms_norm_matches_float64(rows, dim, with_delta):
    g = torch.Generator().manual_seed(rows + dim)
    wide = torch.randn(rows, dim + 7, generator=g) * 3            # x is a strided view of it
    x = wide[:, 2:2 + dim]
    delta = (torch.randn(rows, dim + 5, generator=g)[:, :dim]) if with_delta else None
    weight = torch.randn(dim, generator=g)
    before, edges = x.double().clone(), (wide[:, :2].clone(), wide[:, 2 + dim:].clone())
    out = OPS.add_rms_norm(x, delta, weight, 1e-5)
    summed = before + (delta.double() if with_delta else 0)
    ref = summed * torch.rsqrt(summed.pow(2).mean(-1, keepdim=True) + 1e-5) * weight.double()
    torch.testing.assert_close(x.double(), summed, rtol=1e-6, atol=1e-6)   # x += delta, in place
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(wide[:, :2], edges[0]) and torch.equal(wide[:, 2 + dim:], edges[1])  # only x


@needs_ops
def test_add_rms_norm_without_weight_only_adds():
    x, delta = torch.randn(4, 32), torch.randn(4, 32)
    want = x + delta
    assert OPS.add_rms_norm(x, delta, None, 1e-6) is None
    torch.testing.assert_close(x, want)


@needs_ops
def test_add_rms_norm_refuses_a_transposed_delta():
    with pytest.raises(ValueError, match=r"add_rms_norm: x \(8, 4\)"):
        OPS.add_rms_norm(torch.randn(8, 4), torch.randn(4, 8).t(), torch.randn(4), 1e-6)


@needs_ops
@pytest.mark.parametrize("rows,inter", [(1, 48), (5, 1376), (64, 1376)])
def test_silu_mul_matches_float64_even_where_exp_overflows(rows, inter):
    g = torch.Generator().manual_seed(rows)
    gate_up = torch.randn(rows, 2 * inter, generator=g) * 4
    gate_up[0, :3] = torch.tensor([-200.0, 200.0, 0.0])              # exp(200) overflows float32
    out = OPS.silu_mul(gate_up)
    gate, up = gate_up.double().chunk(2, dim=-1)
    torch.testing.assert_close(out.double(), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)


@needs_ops
@pytest.mark.parametrize("tokens", [1, 9, 300])                   # 300 x 10 heads x 64: threaded
def test_rope_in_place_on_the_qkv_rows_matches_float64(tokens):
    heads, kvh, d = 8, 2, 64
    g = torch.Generator().manual_seed(tokens)
    qkv = torch.randn(tokens, (heads + 2 * kvh) * d, generator=g)
    qkv[:, (heads + kvh) * d:] = float("nan")                       # v: must stay untouched
    qk = qkv[:, : (heads + kvh) * d].view(tokens, heads + kvh, d)   # row stride of the qkv rows
    angles = torch.rand(tokens, d // 2, generator=g) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos()[:, None, :], emb.sin()[:, None, :]
    ref = qk.double() * cos.double() + rotate_half(qk.double()) * sin.double()
    assert OPS.rope_(qk, cos, sin) is qk
    torch.testing.assert_close(qk.double(), ref, rtol=1e-5, atol=1e-5)
    assert qkv[:, (heads + kvh) * d:].isnan().all()


@pytest.mark.parametrize("native", [True, False])
def test_decoder_with_and_without_native_ops_matches_transformers(tmp_path, monkeypatch, native):
    """With the C ops, and without them (a machine without a compiler: torch's elementwise ops),
    greedy tokens and logprobs equal transformers' on a random Llama."""
    import runtime
    from helpers_checkpoint import hf_greedy, make_llama, random_prompts
    from runtime.loader import load_model

    hf = make_llama(tmp_path, layers=3, init_std=0.1)
    if native:
        require_native()
    if not native:
        monkeypatch.setattr(NativeOps, "for_model", classmethod(lambda cls, dtype, device: None))
    loaded = load_model(tmp_path, device="cpu")
    assert (loaded.model.native_ops is not None) == native
    prompts = random_prompts([2, 17, 40], 160, seed=4)
    outs = runtime.generate(loaded, prompts, runtime.SamplingParams(max_tokens=16), backend="torch")
    for out, prompt in zip(outs, prompts):
        ids, logprob = hf_greedy(hf, prompt, 16)
        assert out.outputs[0].token_ids == ids
        assert out.outputs[0].cumulative_logprob == pytest.approx(logprob, abs=1e-3)
