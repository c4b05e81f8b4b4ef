"""Kernel benchmark of `flash_attn_with_kvcache` against its peers (issue 4).

Run it as ``python -m flashdecode.bench [--quick] [--out DIR] ...`` or ``flashdecode bench ...``
(both call `flashdecode.bench.cli.main`). Modules: `shapes` (the grid), `timing` (median GPU time,
cold L2), `ceiling` (measured bandwidth), `peers` (the implementations and the fp32 reference),
`runner` (one run), `report` (tables, JSON, Markdown, plot).
"""
