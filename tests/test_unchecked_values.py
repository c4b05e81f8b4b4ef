"""With value checks off (`check_values=False`), bad lengths or block tables never write outside
the sequence's own valid pages, on either backend: pages outside the pool, negative entries and
slots past the capacity are skipped, and the rest of the cache is left as it was."""

import pytest
import torch

from flashdecode import flash_attn_with_kvcache


def test_bad_values_with_checks_off_write_nothing_outside(backend, device):
    g = torch.Generator().manual_seed(7)
    num_pages, page, hk, d = 6, 4, 2, 16
    k_cache = torch.randn(num_pages, page, hk, d, generator=g).to(device)
    v_cache = torch.randn(num_pages, page, hk, d, generator=g).to(device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    # Sequence 0 owns page 2 then an entry outside the pool; sequence 1 owns page 4 then a -1.
    table = torch.tensor([[2, 99], [4, -1]], dtype=torch.int32, device=device)
    seqlens = torch.tensor([2, 3], dtype=torch.int32, device=device)  # 2 + 5 and 3 + 5 pass capacity 8
    q = torch.randn(2, 1, 4, d, generator=g).to(device)
    k = torch.randn(2, 5, hk, d, generator=g).to(device)
    v = torch.randn(2, 5, hk, d, generator=g).to(device)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=seqlens, block_table=table,
                                  check_values=False)
    assert torch.isfinite(out).all()
    untouched = [0, 1, 3, 5]
    assert torch.equal(k_cache[untouched], before_k[untouched])
    assert torch.equal(v_cache[untouched], before_v[untouched])
    # The valid slots were written: sequence 0 slots 2..3 of page 2, sequence 1 slot 3 of page 4.
    assert torch.equal(v_cache[2, 2:4], v[0, :2])
    assert torch.equal(v_cache[4, 3], v[1, 0])
    assert torch.equal(v_cache[2, :2], before_v[2, :2])
    assert torch.equal(v_cache[4, :3], before_v[4, :3])


def test_checks_on_refuse_the_same_call(device):
    k_cache = torch.randn(6, 4, 2, 16, device=device)
    table = torch.tensor([[2, 99]], dtype=torch.int32, device=device)
    q = torch.randn(1, 1, 4, 16, device=device)
    k = torch.randn(1, 1, 2, 16, device=device)
    try:
        flash_attn_with_kvcache(q, k_cache, k_cache.clone(), k, k, cache_seqlens=torch.tensor([5], dtype=torch.int32,
                                device=device), block_table=table)
    except ValueError as exc:
        assert "block_table" in str(exc)
    else:
        raise AssertionError("a block-table entry outside the pool was accepted")


@pytest.mark.interpreter
def test_bad_values_with_checks_off_stay_inside_on_the_tma_path(device, monkeypatch):
    """The same for a contiguous 16-bit cache read through tensor descriptors (FLASHDECODE_TMA=1):
    a batch index outside the cache and lengths past the capacity give finite results and leave
    the cache as it was (nothing to append)."""
    from flashdecode.attention.kernels import launch

    taken = []
    descriptors = launch.kv_descriptors
    monkeypatch.setattr(launch, "kv_descriptors", lambda *a: taken.append(descriptors(*a)) or taken[-1])
    monkeypatch.setenv("FLASHDECODE_TMA", "1")
    monkeypatch.setenv("FLASHDECODE_BACKEND", "triton")
    g = torch.Generator().manual_seed(8)
    k_cache = torch.randn(3, 40, 2, 32, generator=g).to(torch.bfloat16).to(device)
    v_cache = torch.randn(3, 40, 2, 32, generator=g).to(torch.bfloat16).to(device)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    q = torch.randn(2, 1, 4, 32, generator=g).to(torch.bfloat16).to(device)
    seqlens = torch.tensor([50, 17], dtype=torch.int32, device=device)  # 50 > capacity 40
    batch_idx = torch.tensor([7, -1], dtype=torch.int32, device=device)  # neither is a row of the cache
    out = flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens, cache_batch_idx=batch_idx,
                                  check_values=False)
    assert torch.isfinite(out.float()).all()
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)
    if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] >= 9:
        assert taken and taken[-1] is not None  # the descriptor path ran
