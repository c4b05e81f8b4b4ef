#!/usr/bin/env bash
# A/B of the kernel benchmark between versions of the code, in one call on the GPU machine.
#
# A "tree" is a folder that holds a `flashdecode/` package; "." is the working tree. Make one for
# an older commit before the call (on a machine with the repository's history), e.g. the attention
# kernels of commit ca96e63 with everything else as it is now:
#
#   bash scripts/ab_trees.sh --prepare ab/before ca96e63 flashdecode/attention
#
# (`ab/` is ignored by git; carry it to the GPU machine.) Then, on the GPU machine:
#
#   bash scripts/ab_trees.sh ab/before .
#
# A tree may carry environment variables for its runs, `DIR:VAR=value[,VAR=value]`, to A/B a knob
# of one version: `bash scripts/ab_trees.sh . .:FLASHDECODE_LATE_ROW_SUM=1`.
#
# Each round runs `python -m flashdecode.bench` once per tree, with that tree first on PYTHONPATH;
# rounds alternate the order (A B, then B A) so that drift of the card hits both. A table of the
# best median µs per shape and implementation, per tree, is printed last; a cell whose output
# failed the benchmark's check against its fp32 reference in any round is marked "!" (and the
# script exits 1). Results go to $OUT/ab-trees/ (or bench_results/ab-trees/).
#
# Variables: PYTHON (default python3), ROUNDS (default 2), BENCH_ARGS (default
# "--shapes decode append --peers flashdecode flashdecode-paged flashdecode-noappend sdpa-cudnn --no-plot").

set -u
cd "$(dirname "$0")/.."

if [ "${1:-}" = "--prepare" ]; then
    [ $# -ge 3 ] || { echo "usage: $0 --prepare DIR COMMIT [PATH ...]" >&2; exit 2; }
    dir="$2" commit="$3"
    shift 3
    [ $# -gt 0 ] || set -- flashdecode
    rm -rf "$dir" && mkdir -p "$dir"
    cp -r flashdecode "$dir/"
    find "$dir" -name __pycache__ -prune -exec rm -rf {} +
    for path in "$@"; do
        rm -rf "${dir:?}/$path"
        git archive "$commit" "$path" | tar -x -C "$dir" || exit 1
    done
    echo "$dir: flashdecode of the working tree, with $* from $commit"
    exit 0
fi

[ $# -ge 2 ] || { echo "usage: $0 TREE TREE [TREE ...]   (or --prepare DIR COMMIT [PATH ...])" >&2; exit 2; }
PY="${PYTHON:-python3}"
case "$PY" in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # each bench runs inside its tree
ROUNDS="${ROUNDS:-2}"
BENCH_ARGS="${BENCH_ARGS:---shapes decode append --peers flashdecode flashdecode-paged flashdecode-noappend sdpa-cudnn --no-plot}"
BASE="${OUT:-bench_results}/ab-trees"
mkdir -p "$BASE"
BASE="$(cd "$BASE" && pwd)"  # absolute: each bench runs inside its tree
trees=("$@")

for round in $(seq 1 "$ROUNDS"); do
    order=("${trees[@]}")
    if [ $((round % 2)) -eq 0 ]; then  # reverse the order every other round
        order=()
        for ((i = ${#trees[@]} - 1; i >= 0; i--)); do order+=("${trees[$i]}"); done
    fi
    for tree in "${order[@]}"; do
        name=$(echo "$tree" | tr '/.:=,' '_____')
        out="$BASE/r$round-$name"
        dir="${tree%%:*}"
        envs=()
        [ "$dir" != "$tree" ] && IFS=',' read -r -a envs <<<"${tree#*:}"
        echo "=== round $round: $tree"
        # Run from inside the tree: `python -m` puts the current folder first on sys.path.
        (cd "$dir" && env "${envs[@]}" "$PY" -c "import flashdecode; print('  flashdecode from', flashdecode.__file__)")
        # shellcheck disable=SC2086
        (cd "$dir" && env "${envs[@]}" "$PY" -m flashdecode.bench --out "$out" $BENCH_ARGS) >"$out.log" 2>&1 \
            || echo "round $round $tree: exit $? (log: $out.log)"
    done
done

"$PY" - "$BASE" "$ROUNDS" "${trees[@]}" <<'EOF'
import json, sys
from pathlib import Path

base, rounds, trees = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
best = {}  # (shape, impl) -> {tree: us}
wrong = set()  # (shape, impl, tree) whose output failed the benchmark's check in some round
for tree in trees:
    name = "".join("_" if c in "/.:=," else c for c in tree)
    for r in range(1, rounds + 1):
        path = base / f"r{r}-{name}" / "results.json"
        try:
            rows = json.loads(path.read_text())["rows"]
        except (OSError, ValueError, KeyError):
            print(f"no results: {path}")
            continue
        for row in rows:
            if row.get("status") == "ok" and row.get("us"):
                cell = best.setdefault((row["shape"], row["impl"]), {})
                cell[tree] = min(cell.get(tree, float("inf")), row["us"])
                if row.get("correct") is False:
                    wrong.add((row["shape"], row["impl"], tree))
print()
print("best median us over the rounds; ratio = last tree / first tree")
print(f"{'shape':28s} {'impl':22s} " + " ".join(f"{t[-14:]:>14s}" for t in trees) + "   ratio")
for (shape, impl), cell in best.items():
    us = [cell.get(t) for t in trees]
    ratio = f"{us[-1] / us[0]:.3f}" if us[0] and us[-1] else "-"
    cells = [(f"{u:.1f}" + ("!" if (shape, impl, t) in wrong else "")) if u else "-" for t, u in zip(trees, us)]
    print(f"{shape:28s} {impl:22s} " + " ".join(f"{c:>14s}" for c in cells) + f"   {ratio}")
if wrong:
    print(f"! = WRONG output in at least one round ({len(wrong)} cells): see that tree's log and results.json")
    sys.exit(1)
EOF
