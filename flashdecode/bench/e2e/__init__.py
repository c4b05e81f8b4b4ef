"""End-to-end generation benchmark (issue 6): flashdecode's engine vs Hugging Face transformers.

Run it as ``python -m flashdecode.bench --e2e [...]`` or ``flashdecode bench-e2e [...]``.

Models are random-weight Llamas of real shapes (``MODEL_SHAPES``: SmolLM2-135M and Llama-3-8B,
plus ``tiny`` for CPU smoke tests), built with transformers directly on the device in the
benchmark dtype (bf16 on CUDA). flashdecode's model is built from the same tensors in memory (no
checkpoint is written, no tokenizer is needed: prompts are token ids), so both engines run the
very same weights on the same card in the same process.

Workloads (``Workload``):

* ``batch1``: one request, prompt 512 tokens, 256 new tokens, greedy, EOS ignored. Prefill time
  is measured separately (``max_tokens=1``), so ``decode tok/s = (new - 1) / (total - prefill)``,
  each time the fastest of its runs;
  its share of the roofline is ``decode tok/s * bytes read per step / measured read bandwidth``,
  with bytes per step = every weight read once (lm_head included, one embedding row) + the K/V of
  the average context (prompt + new/2).
* ``throughput``: 256 requests, prompt lengths uniform in [64, 1024], output lengths uniform in
  [64, 512] (per-request ``max_tokens``, EOS ignored); output tokens/s = requested output tokens /
  wall time. transformers runs them in padded batches (left padding, sorted by output length,
  each batch generating up to its longest request); only the requested tokens count.

Implementations: ``flashdecode`` (the engine as `LLM()` builds it: decode steps replayed as CUDA
graphs on a GPU), ``flashdecode-eager`` (``cuda_graphs=False``; on CUDA only), ``hf-dynamic``
(``generate()``, dynamic cache), ``hf-static``
(``cache_implementation="static"``, no torch.compile) and, opt-in, ``hf-static-compile`` (static
cache with transformers' automatic compile; batch 1 only). Every failure becomes a row's error;
nothing raises out of `run`. ``budget_s`` stops starting new rows; reports are rewritten after
every row, so a killed run still leaves them.

Outputs in ``out``: ``e2e_results.json`` (every figure, card, versions, date), ``e2e_results.md``
(for BENCHMARKS.md) and ``e2e_table.txt`` (the table printed last).

Modules: `config` (model shapes, implementations, workloads, options), `roofline` (bytes per step),
`workloads` (prompts and requests), `models` (building both engines over the same weights),
`runners` (one implementation on one workload), `orchestrate` (the run and `main`), `report`
(derived figures, targets, tables).
"""

from flashdecode.bench.e2e.config import (
    DEFAULT_IMPLS, DEFAULT_MODELS, FULL_WORKLOAD, IMPLS, JSON_FILE, MD_FILE, MODEL_SHAPES, TABLE_FILE, TINY_WORKLOAD,
    WORKLOADS, E2EOptions, Workload, resolve_dtype, resolve_impls, resolve_models, resolve_workloads,
)
from flashdecode.bench.e2e.orchestrate import base_row, main, options_from_args, run
from flashdecode.bench.e2e.report import (
    derive, evaluate_targets, format_markdown, format_report, table_rows, write_reports,
)
from flashdecode.bench.e2e.roofline import (
    batch1_bytes_per_step, kv_bytes_per_token, num_parameters, roofline_tokens_per_s, weight_bytes_per_step,
)
from flashdecode.bench.e2e.runners import hf_generate
from flashdecode.bench.e2e.workloads import hf_batches, throughput_requests

__all__ = [
    "DEFAULT_IMPLS", "DEFAULT_MODELS", "FULL_WORKLOAD", "IMPLS", "JSON_FILE", "MD_FILE", "MODEL_SHAPES", "TABLE_FILE",
    "TINY_WORKLOAD", "WORKLOADS", "E2EOptions", "Workload", "base_row", "batch1_bytes_per_step", "derive",
    "evaluate_targets", "format_markdown", "format_report", "hf_batches", "hf_generate", "kv_bytes_per_token", "main",
    "num_parameters", "options_from_args", "resolve_dtype", "resolve_impls", "resolve_models", "resolve_workloads",
    "roofline_tokens_per_s", "run", "table_rows", "throughput_requests", "weight_bytes_per_step", "write_reports",
]
