"""Tensors on a CUDA device other than the current one.

Triton kernels, streams, events and graphs act on the current CUDA device; the op, the merge and
the engine must launch on their tensors' device instead (`flashdecode.cuda_device`). These tests
put everything on ``cuda:1`` while ``cuda:0`` is current, so they need two GPUs and are skipped
on machines with fewer. A device index past the last GPU is a clear error (any GPU machine).
"""

from __future__ import annotations

import pytest
import torch

from conftest import make_generator, randn, set_backend
from test_contract import Case, run_case

pytestmark = pytest.mark.gpu
two_gpus = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")

OTHER = "cuda:1"

CASES = [
    # decode with the fused append and rotary, paged (the Triton kernel), and its contiguous twin
    Case(4101, "bf16", B=3, H=8, Hk=2, D=128, page=16, Sq=1, append="padded", S_new=1, rot=1.0, causal=True,
         max_len=300, min_len=100, twin=True),
    # plain paged decode, 16-slot pages, no append (the Gluon kernel on Hopper)
    Case(4102, "bf16", B=4, H=32, Hk=8, D=128, page=16, Sq=1, max_len=2000, min_len=1000, twin=True),
    # packed queries and appended keys with left padding (a chunk of prefill)
    Case(4103, "fp16", B=2, H=4, Hk=1, D=64, qlayout="varlen", Sq=5, append="packed", S_new=5, causal=True,
         leftpad=True, max_len=200),
]


@two_gpus
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_op_on_a_gpu_that_is_not_current(case, monkeypatch):
    set_backend(monkeypatch, "triton")
    with torch.cuda.device(0):
        run_case(case, OTHER)  # value checks on: their kernel runs on cuda:1 too
        assert torch.cuda.current_device() == 0


@two_gpus
def test_merge_on_a_gpu_that_is_not_current():
    from flashdecode import merge_attention_states

    g = make_generator(4111)
    B, Sq, H, D = 3, 2, 4, 64
    out_a, out_b = (randn(g, B, Sq, H, D, dtype=torch.bfloat16, device=OTHER) for _ in range(2))
    lse_a, lse_b = (randn(g, B, H, Sq, scale=3.0, device=OTHER) for _ in range(2))
    with torch.cuda.device(0):
        out, lse = merge_attention_states(out_a, lse_a, out_b, lse_b)
        assert torch.cuda.current_device() == 0
    assert out.device == torch.device(OTHER) and lse.device == torch.device(OTHER)
    # float64 on the CPU: the union's log-sum-exp and the outputs weighted by each side's share
    la, lb = lse_a.double().cpu(), lse_b.double().cpu()
    want_lse = torch.logaddexp(la, lb)
    wa = torch.exp(la - want_lse).transpose(1, 2)[..., None]
    wb = torch.exp(lb - want_lse).transpose(1, 2)[..., None]
    want = wa * out_a.double().cpu() + wb * out_b.double().cpu()
    torch.testing.assert_close(lse.double().cpu(), want_lse, rtol=0, atol=1e-5)
    err = (out.double().cpu() - want).abs().max().item()
    assert err <= 2 * 2.0**-8 * want.abs().max().item(), f"merged output off by {err}"  # NaN fails too


@two_gpus
def test_engine_on_a_gpu_that_is_not_current(tmp_path):
    from flashdecode.engine import LLM, SamplingParams
    from test_models_safetensors import make_tiny_model_dir

    make_tiny_model_dir(str(tmp_path), "llama", seed=5)
    prompts = ["w1 w2 w3 w4 w5 w6 w7", "w9", "w20 w21 w22 w23"]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # float32 on both GPUs: the same kernels on the same inputs give the same tokens
    want = [o.token_ids for o in LLM(str(tmp_path), device="cuda:0", dtype="float32", seed=0).generate(prompts, greedy)]
    with torch.cuda.device(0):
        llm = LLM(str(tmp_path), device=OTHER, dtype="float32", seed=0)  # CUDA graphs on: captured on cuda:1
        got = [o.token_ids for o in llm.generate(prompts, greedy)]
        streamed = "".join(llm.stream(prompts[0], greedy))
        assert torch.cuda.current_device() == 0
    assert got == want
    assert streamed == llm.tokenizer.decode(want[0], skip_special_tokens=True)


def test_a_device_index_past_the_last_gpu_is_a_clear_error(tmp_path):
    from flashdecode.bench.runner import resolve_device as bench_device
    from flashdecode.engine import LLM
    from test_models_safetensors import make_tiny_model_dir

    make_tiny_model_dir(str(tmp_path), "llama", seed=6)
    missing = f"cuda:{torch.cuda.device_count()}"
    with pytest.raises(ValueError, match="does not exist"):
        LLM(str(tmp_path), device=missing)
    with pytest.raises(RuntimeError, match="CUDA device"):
        bench_device(missing)
