"""The model's fused layers (RMSNorm + residual add, SiLU-and-mul) against a float64 oracle.

The oracle follows Hugging Face's Llama layers with each rounding written out; it shares no code
with `flashdecode.models.layers`. Both paths are checked: PyTorch ("reference") and the Triton
kernels ("triton", in the interpreter on CPU). Also: a whole tiny model on the Triton path gives
transformers' logits.
"""

from __future__ import annotations

import pytest
import torch

from conftest import BACKEND_PARAMS, set_backend
from flashdecode.models.layers import rms_norm, silu_and_mul

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
    from flashdecode.models import load_model
    from test_models_safetensors import IDS, hf_logits, make_tiny_model_dir, prefill_logits

    hf = make_tiny_model_dir(str(tmp_path))
    model = load_model(str(tmp_path), tokenizer=False).model
    if torch.cuda.is_available() and not str(model.device).startswith("cpu"):
        pytest.skip("checked on CPU tensors through the interpreter")
    set_backend(monkeypatch, "triton")
    ours, _, _ = prefill_logits(model, [IDS])
    torch.testing.assert_close(ours, hf_logits(hf, IDS), atol=2e-4, rtol=2e-4)
