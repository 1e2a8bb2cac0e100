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
@pytest.mark.parametrize("rows,dim", [(1, 64), (3, 100), (1100, 64)])  # 1100 x 64: split over threads
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


LOW = [torch.bfloat16, torch.float16]


def ulps_apart(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable values of their (16-bit) dtype lie between a and b (same signs)."""
    return (a.view(torch.int16).int() - b.view(torch.int16).int()).abs()


def assert_torch_bits(out, want, max_share=0.0):
    """out has torch's bits, or (where a float32 sum or exp may round the other way) differs by
    one ulp in at most ``max_share`` of its elements."""
    assert out.dtype == want.dtype and out.shape == want.shape
    apart = ulps_apart(out, want)
    assert int(apart.max()) <= (1 if max_share else 0), f"{int(apart.max())} ulps apart"
    assert float((apart > 0).float().mean()) <= max_share


@needs_ops
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("tokens", [1, 9, 300])                   # 300 x 10 heads x 64: threaded
def test_rope_low_precision_gives_torchs_bits(dtype, tokens):
    """Products of two bfloat16/float16 values are exact in float32, so rounding after each op
    as torch does gives torch's bits exactly; the q/k rows are a strided view of the qkv rows."""
    ops = NativeOps.for_model(dtype, torch.device("cpu"))
    heads, kvh, d = 8, 2, 64
    g = torch.Generator().manual_seed(tokens)
    qkv = (torch.randn(tokens, (heads + 2 * kvh) * d, generator=g) * 3).to(dtype)
    qkv[:, (heads + kvh) * d:] = float("nan")
    qk = qkv[:, : (heads + kvh) * d].view(tokens, heads + kvh, d)
    angles = torch.rand(tokens, d // 2, generator=g) * 50
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype)[:, None, :], emb.sin().to(dtype)[:, None, :]
    want = qk * cos + rotate_half(qk) * sin                          # torch, in dtype
    assert ops.rope_(qk, cos, sin) is qk
    assert_torch_bits(qk, want)
    assert qkv[:, (heads + kvh) * d:].isnan().all()


@needs_ops
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("rows,dim", [(3, 100), (1100, 64)])         # 100: a 4-lane tail; 1100 x 64: threaded
@pytest.mark.parametrize("gemma", [False, True])
def test_add_rms_norm_low_precision_matches_torch_and_float64(dtype, rows, dim, gemma):
    """x += delta gives torch's bits; the norm rounds where transformers' RMSNorm does (Llama:
    w * round(norm(x)); Gemma: round(norm(x) * (1 + w)) with a float32 weight), and is within
    rounding of float64."""
    from runtime.model.ops import RMSNorm

    ops = NativeOps.for_model(dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(rows + dim)
    wide = (torch.randn(rows, dim + 7, generator=g) * 3).to(dtype)
    x = wide[:, 2:2 + dim]
    delta = (torch.randn(rows, dim + 5, generator=g)[:, :dim]).to(dtype)
    norm = RMSNorm((torch.randn(dim, generator=g) * 0.3).to(dtype), 1e-5, offset=1.0 if gemma else 0.0)
    summed = x + delta
    edges = (wide[:, :2].clone(), wide[:, 2 + dim:].clone())
    out = ops.add_rms_norm(x, delta, norm.weight, 1e-5)
    assert torch.equal(x, summed)
    assert torch.equal(wide[:, :2], edges[0]) and torch.equal(wide[:, 2 + dim:], edges[1])
    assert_torch_bits(out, norm(summed), max_share=0.01)
    s64 = summed.double()
    ref = s64 * torch.rsqrt(s64.pow(2).mean(-1, keepdim=True) + 1e-5) * norm.weight.double()
    torch.testing.assert_close(out.double(), ref, rtol=4 * ULPS[dtype], atol=1e-6)


@needs_ops
@pytest.mark.parametrize("dtype", LOW)
@pytest.mark.parametrize("rows,inter", [(1, 40), (64, 1376)])
def test_silu_mul_low_precision_matches_torch_even_where_exp_overflows(dtype, rows, inter):
    ops = NativeOps.for_model(dtype, torch.device("cpu"))
    g = torch.Generator().manual_seed(rows)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    gate_up[0, :4] = torch.tensor([-200.0, 200.0, 0.0, -90.0])      # exp(200), exp(90) overflow float32
    gate, up = gate_up.chunk(2, dim=-1)
    out = ops.silu_mul(gate_up)
    assert_torch_bits(out, torch.nn.functional.silu(gate) * up, max_share=0.01)
    ref = torch.nn.functional.silu(gate.double()) * up.double()
    torch.testing.assert_close(out.double(), ref, rtol=4 * ULPS[dtype], atol=1e-6)


ULPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}
