"""Contiguous cache B=128 L=2048 32/8 heads: time with padded capacities (partition camping test)."""
import sys
import torch
from flashdecode import flash_attn_with_kvcache
from flashdecode.bench import timing

B, L, H, HK, D = 128, 2048, 32, 8, 128
for pad in (0, 16, 64, 1024):
    states = []
    for c in range(2):
        g = torch.Generator(device="cuda").manual_seed(c)
        k = torch.randn(B, L + pad, HK, D, device="cuda", dtype=torch.bfloat16, generator=g)
        v = torch.randn(B, L + pad, HK, D, device="cuda", dtype=torch.bfloat16, generator=g)
        q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
        sl = torch.full((B,), L, device="cuda", dtype=torch.int32)
        states.append((q, k, v, sl))
    t = timing.measure_cuda(lambda st: flash_attn_with_kvcache(st[0], st[1], st[2], cache_seqlens=st[3]), states,
                            timer="graph")
    print(f"pad {pad:5d}: {t.median_us:8.1f} us", flush=True)
    del states
    torch.cuda.empty_cache()
