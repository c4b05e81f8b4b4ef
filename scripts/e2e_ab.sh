#!/usr/bin/env bash
# A/B of decode settings end to end, in one call on the GPU machine: for each setting (a list of
# VAR=value pairs, "" for the defaults), the batch-1 workload of the end-to-end benchmark
# (flashdecode only) on both model shapes; a table of tokens/s (and % of roofline) is printed
# last. Results go to $OUT/ab-<i>/ (or bench_results/ab-<i>/).
#
#   bash scripts/e2e_ab.sh "" "FLASHDECODE_ATTENTION_PDL=0" "FLASHDECODE_GEMV=0 FLASHDECODE_PDL=0"
#
# Variables: PYTHON (default python3), MODELS (default "smollm2-135m llama3-8b"), WORKLOADS
# (default batch1; "batch1 throughput" adds the 256-request workload, about 30 s more per
# setting), RUN_TIMEOUT (seconds per setting, default 100).

set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
MODELS="${MODELS:-smollm2-135m llama3-8b}"
WORKLOADS="${WORKLOADS:-batch1}"
BASE="${OUT:-bench_results}"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
mkdir -p "$BASE"
[ $# -gt 0 ] || set -- ""

i=0
for setting in "$@"; do
    i=$((i + 1))
    echo "=== setting $i: ${setting:-defaults}"
    # shellcheck disable=SC2086
    env $setting timeout "${RUN_TIMEOUT:-100}" "$PY" -m flashdecode.bench --e2e --out "$BASE/ab-$i" --budget 60 \
        --e2e-models $MODELS --e2e-impls flashdecode --e2e-workloads $WORKLOADS >"$BASE/ab-$i.log" 2>&1 \
        || echo "setting $i: exit $? (log: $BASE/ab-$i.log)"
done

i=0
echo
echo "flashdecode tok/s per model and workload (batch 1: % of roofline)"
for setting in "$@"; do
    i=$((i + 1))
    "$PY" - "$BASE/ab-$i/e2e_results.json" "${setting:-defaults}" <<'EOF'
import json, sys
path, label = sys.argv[1], sys.argv[2]
try:
    rows = json.load(open(path))["rows"]
except (OSError, ValueError, KeyError):
    print(f"{label:50s} no results")
    raise SystemExit(0)
cells = [f"{r['model']} {r['workload']} {r['tokens_per_s']:.1f}"
         + (f" ({r['pct_roofline']:.1f}%)" if r.get("pct_roofline") is not None else "")
         for r in rows if r.get("status") == "ok" and r.get("tokens_per_s")]
print(f"{label:50s} " + " | ".join(cells))
EOF
done
