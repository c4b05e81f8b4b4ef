#!/usr/bin/env bash
# Nsight Compute counters of one decode call, flashdecode (contiguous and paged) against
# SDPA-cuDNN, on the shapes given (default: the two furthest behind cuDNN in run 26, 9/3 heads
# and MQA, plus 128,2048). GPU only; needs `ncu` on the PATH. Run from anywhere:
#
#   bash scripts/ncu_decode.sh                     # default shapes
#   SHAPES="1,32768,32/8,128" bash scripts/ncu_decode.sh
#
# Sections: speed of light, memory workload, occupancy, launch statistics, warp states and
# instruction counts, plus the warp stall reasons per issued instruction (the CLI does not print
# the warp-state section's stall chart, so they are asked for as metrics). Clocks are left as
# they are (`--clock-control none`). The report goes to $OUT/ncu_decode.txt (or ncu_decode.txt
# here), one block per kernel; the kernels of the op's value checks are filtered out by name.
# The stall metrics were run in a separate ncu call on an H200 (run 30); this script with them
# together was not run yet.

set -u
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
SHAPES="${SHAPES:-64,2048,9/3,64 32,8192,32/1,128 128,2048,32/8,128}"
REPORT="${OUT:-.}/ncu_decode.txt"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"

if ! command -v ncu >/dev/null 2>&1; then
    echo "ncu not found on the PATH" >&2
    exit 2
fi
# shellcheck disable=SC2086
ncu --clock-control none --profile-from-start off \
    --kernel-name regex:'attention_split|combine_splits|cudnn' \
    --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
    --section LaunchStats --section WarpStateStats --section InstructionStats \
    --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' \
    "$PY" scripts/profile_decode.py --one-call --shapes $SHAPES >"$REPORT" 2>&1
rc=$?
echo "ncu exit $rc; report: $REPORT ($(wc -l <"$REPORT") lines)"
grep -E "^  [a-z_]+.*\(|Duration|Elapsed Cycles|SM Active Cycles|DRAM Throughput|Achieved Occupancy|Registers Per Thread|Waves Per SM|^    Issued Instructions|stalled_(long|short)_scoreboard|stalled_(wait|barrier)|profiled one call" \
    "$REPORT" | head -160
exit $rc
