"""The model's fused layers (RMSNorm + residual add, SiLU-and-mul, and the projections with the
norm or the activation fused in) against a float64 oracle.

The oracle follows Hugging Face's Llama layers with each rounding written out; it shares no code
with `flashdecode.models.layers`. Both paths are checked: PyTorch ("reference") and the Triton
kernels ("triton", in the interpreter on CPU). Also: a whole tiny model on the Triton path gives
transformers' logits.
"""

from __future__ import annotations

import os

import pytest
import torch

from conftest import BACKEND_PARAMS, set_backend
from flashdecode.models import layers
from flashdecode.models.layers import linear, norm_linear, rms_norm, silu_and_mul, silu_mul_linear

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# one unit in the last place, relative, of each dtype
ULP = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def oracle_rms_norm(x, weight, eps, residual=None):
    dtype = x.dtype
    if residual is not None:
        x = (x.double() + residual.double()).to(dtype)
    s = x.double()
    normed = (s / torch.sqrt(s.pow(2).mean(-1, keepdim=True) + eps)).to(dtype)
    return normed.double() * weight.double(), (x if residual is not None else None)


def oracle_silu_and_mul(gate_up):
    gate, up = gate_up.double().chunk(2, dim=-1)
    act = (gate / (1 + torch.exp(-gate))).to(gate_up.dtype).double()
    return act * up


def close_in_ulps(actual, expected, dtype, ulps=2.0):
    """Each element within ``ulps`` units of ``dtype``'s precision of the float64 value."""
    assert actual.dtype == dtype
    err = (actual.double() - expected).abs()
    bound = ulps * ULP[dtype] * expected.abs() + 1e-30
    tiny = expected.abs() < 2.0**-14  # denormal range of the low-precision dtypes: absolute bound
    ok = (err <= bound) | (tiny & (err <= 2.0**-24))
    assert bool(ok.all()), f"max error {err.max().item():.3g} (worst relative {(err / bound).max().item():.2f} x bound)"


@pytest.fixture(params=BACKEND_PARAMS)
def path(request, monkeypatch):
    set_backend(monkeypatch, request.param)
    return request.param


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hidden", [64, 576])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_oracle(path, device, dtype, hidden, with_residual):
    g = torch.Generator().manual_seed(hidden + 7 * with_residual)
    rows = 5
    # strided input: every other row of a wider buffer
    x = (torch.randn(2 * rows, hidden + 8, generator=g) * 3)[::2, :hidden].to(device=device, dtype=dtype)
    residual = torch.randn(rows, hidden, generator=g).to(device=device, dtype=dtype) if with_residual else None
    weight = (1 + 0.5 * torch.randn(hidden, generator=g)).to(device=device, dtype=dtype)
    before = (x.clone(), None if residual is None else residual.clone())
    out, new_residual = rms_norm(x, weight, 1e-5, residual)
    want, want_residual = oracle_rms_norm(x.cpu(), weight.cpu(), 1e-5, None if residual is None else residual.cpu())
    # weight * normed is rounded once from the exact product: at most half a unit, plus the sum's order
    close_in_ulps(out.cpu(), want, dtype, ulps=2.0 if dtype != torch.float32 else 64.0)
    assert out.shape == x.shape
    if with_residual:
        torch.testing.assert_close(new_residual.cpu(), want_residual, atol=0, rtol=ULP[dtype])
    else:
        assert new_residual is None
    assert torch.equal(x, before[0]) and (residual is None or torch.equal(residual, before[1])), "inputs modified"


def test_rms_norm_three_dims_and_empty(path, device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 96, generator=g).to(device)
    w = torch.rand(96, generator=g).to(device) + 0.5
    out, _ = rms_norm(x, w, 1e-6)
    want, _ = oracle_rms_norm(x.cpu(), w.cpu(), 1e-6)
    assert out.shape == (2, 3, 96)
    close_in_ulps(out.cpu(), want, torch.float32, ulps=64.0)
    empty, res = rms_norm(x[:0], w, 1e-6, x[:0])
    assert empty.shape == (0, 3, 96) and res.shape == (0, 3, 96)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("intermediate", [128, 1536, 3000])
def test_silu_and_mul_matches_oracle(path, device, dtype, intermediate):
    g = torch.Generator().manual_seed(intermediate)
    gate_up = (torch.randn(3, 2 * intermediate, generator=g) * 4).to(device=device, dtype=dtype)
    out = silu_and_mul(gate_up)
    assert out.shape == (3, intermediate)
    want = oracle_silu_and_mul(gate_up.cpu())
    # silu is rounded (1 rounding + fp32 transcendental error), then the product is rounded again
    close_in_ulps(out.cpu(), want, dtype, ulps=3.0 if dtype != torch.float32 else 64.0)


@pytest.mark.interpreter
def test_tiny_model_on_the_triton_path_matches_transformers(tmp_path, monkeypatch):
    """A prefill, then one-token decode steps (every projection on the fused single-row GEMV),
    give transformers' logits."""
    from flashdecode.models import AttentionMetadata, load_model
    from test_models_safetensors import IDS, hf_logits, make_tiny_model_dir, prefill_logits

    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        # The model is loaded onto the CPU; with compiled kernels (a GPU test pass) the Triton
        # path needs CUDA tensors, which the engine's GPU tests cover.
        pytest.skip("checked on CPU tensors through the interpreter")
    hf = make_tiny_model_dir(str(tmp_path))
    model = load_model(str(tmp_path), tokenizer=False).model
    set_backend(monkeypatch, "triton")
    want = hf_logits(hf, IDS)
    first, pool, tables = prefill_logits(model, [IDS[:6]], page_size=4, slack=len(IDS))
    torch.testing.assert_close(first, want[:6], atol=2e-4, rtol=2e-4)

    launches = []
    real = layers.gemv_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                launches.append(kwargs["PROLOGUE"])
                return real[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(layers, "gemv_kernel", Spy())
    steps = []
    for t in range(6, 10):
        meta = AttentionMetadata(cache_seqlens=torch.tensor([t], dtype=torch.int32),
                                 block_table=torch.tensor(tables, dtype=torch.int32))
        with torch.inference_mode():
            steps.append(model(torch.tensor([IDS[t]]), meta, pool)[0])
    torch.testing.assert_close(torch.stack(steps), want[6:10], atol=2e-4, rtol=2e-4)
    per_step = 4 * model.config.num_layers + 1  # qkv, o, gate_up, down per layer; the head
    assert len(launches) == 4 * per_step and set(launches) == {0, 1, 2, 3}


# ---- projections (single rows take the fused GEMV kernel on the Triton path) --------------------

PROJECTIONS = ["linear", "norm", "add-norm", "silu-mul"]


def oracle_projection(kind, x, residual, norm_weight, weight, bias, eps):
    """``(y, f, new residual)`` in float64: ``f`` the projection's input rounded to x's dtype as
    the unfused layers round it, ``y = f @ weight.T + bias`` exactly."""
    dtype = x.dtype
    new_residual = None
    if kind == "linear":
        f = x.double()
    elif kind == "silu-mul":
        f = oracle_silu_and_mul(x).to(dtype).double()
    else:
        normed, new_residual = oracle_rms_norm(x, norm_weight, eps, residual if kind == "add-norm" else None)
        f = normed.to(dtype).double()
    y = f @ weight.double().T
    if bias is not None:
        y = y + bias.double()
    return y, f, new_residual


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", PROJECTIONS)
@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("n, k, with_bias", [(40, 576, False), (130, 1100, True)], ids=["40x576", "130x1100-bias"])
def test_projections_match_oracle(path, device, dtype, kind, rows, n, k, with_bias, monkeypatch):
    g = torch.Generator().manual_seed(n + k + rows + 13 * PROJECTIONS.index(kind))
    width = 2 * k if kind == "silu-mul" else k
    x = (torch.randn(rows, width, generator=g) * 2).to(device=device, dtype=dtype)
    residual = torch.randn(rows, k, generator=g).to(device=device, dtype=dtype)
    norm_weight = (1 + 0.5 * torch.randn(k, generator=g)).to(device=device, dtype=dtype)
    weight = (torch.randn(n, k, generator=g) / k**0.5).to(device=device, dtype=dtype)
    bias = torch.randn(n, generator=g).to(device=device, dtype=dtype) if with_bias else None
    before = x.clone(), residual.clone()
    new_residual = None
    if kind == "linear":
        y = linear(x, weight, bias)
    elif kind == "silu-mul":
        y = silu_mul_linear(x, weight, bias)
    else:
        y, new_residual = norm_linear(x, residual if kind == "add-norm" else None, norm_weight, 1e-5, weight, bias)
    want, f, want_residual = oracle_projection(kind, x.cpu(), residual.cpu(), norm_weight.cpu(), weight.cpu(),
                                               None if bias is None else bias.cpu(), 1e-5)
    assert y.shape == (rows, n) and y.dtype == dtype
    # output rounding + float32 accumulation over k + a few one-unit flips in the rounded input
    mass = f.abs() @ weight.cpu().double().abs().T
    bound = ULP[dtype] * want.abs() + k * 2.0**-24 * mass + 2 * ULP[dtype] * (f.abs().max() * weight.cpu().double().abs().max())
    if dtype == torch.float32:
        bound = bound + 8 * ULP[dtype] * mass
    err = (y.cpu().double() - want).abs()
    assert bool((err <= bound).all()), f"max error {err.max().item():.3g}, worst {(err / bound).max().item():.2f} x bound"
    if kind == "add-norm":
        torch.testing.assert_close(new_residual.cpu(), want_residual, atol=0, rtol=ULP[dtype])
    else:
        assert new_residual is None
    assert torch.equal(x, before[0]) and torch.equal(residual, before[1]), "inputs modified"
    if path == "triton":  # a single row takes the fused kernel, unless FLASHDECODE_GEMV=0
        assert layers._takes_gemv(x, weight) == (rows == 1)
        monkeypatch.setenv("FLASHDECODE_GEMV", "0")
        assert not layers._takes_gemv(x, weight)
        monkeypatch.setenv("FLASHDECODE_GEMV", "1")
        assert layers._takes_gemv(x, weight) == (rows == 1)


def test_projection_arguments_are_checked(path, device, monkeypatch):
    x = torch.randn(1, 10, device=device)
    with pytest.raises(ValueError, match="gate_up"):
        silu_mul_linear(x, torch.randn(4, 4, device=device))  # 10 != 2 * 4
    monkeypatch.setenv("FLASHDECODE_GEMV", "sometimes")
    if path == "triton":
        with pytest.raises(ValueError, match="FLASHDECODE_GEMV"):
            linear(x, torch.randn(3, 10, device=device))


@pytest.mark.parametrize("n, k", [(960, 576), (576, 1536), (49152, 576), (6144, 4096), (28672, 4096), (4096, 14336)])
def test_gemv_config_covers_the_reduction_and_fills_the_card(n, k):
    cfg = layers.gemv_config(n, k)
    tiles = -(-k // cfg.block_k)
    assert tiles * cfg.block_k >= k > (tiles - 1) * cfg.block_k
    assert cfg.block_k <= layers.GEMV_MAX_BLOCK_K and cfg.block_n <= layers.GEMV_MAX_BLOCK_N
    assert -(-n // cfg.block_n) >= 36  # at least a quarter of the SMs of a large card busy


def test_pdl_is_only_for_cuda_and_its_switch_is_checked(monkeypatch):
    monkeypatch.delenv("FLASHDECODE_PDL", raising=False)
    assert not layers.pdl_enabled(torch.device("cpu"))  # default on, but never for CPU tensors
    monkeypatch.setenv("FLASHDECODE_PDL", "0")
    assert not layers.pdl_enabled(torch.device("cpu"))
    monkeypatch.setenv("FLASHDECODE_PDL", "yes")
    with pytest.raises(ValueError, match="FLASHDECODE_PDL"):
        layers.pdl_enabled(torch.device("cpu"))
