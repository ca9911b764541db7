#!/usr/bin/env bash
# Runs every libFuzzer target of fuzz/ (built in the fuzz preset's build dir) for a set time and
# prints per target: executions, coverage (libFuzzer's cov: edges), and any crash found.
#
# Usage: scripts/fuzz.sh [SECONDS] [TARGET...]   (SECONDS default FUZZ_SECONDS or 60; TARGET
# is a name such as memslot, default all). Each target reads fuzz/corpus/<target>/ (never
# written) and grows its own work corpus under the build dir; a crash leaves its input in
# the build dir's artifacts/<target>/ and makes the exit status 1.
set -u -o pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2
build=build/fuzz
seconds=${1:-${FUZZ_SECONDS:-60}}
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
  for f in fuzz/fuzz_*.cc; do
    n=${f#fuzz/fuzz_}
    targets+=("${n%.cc}")
  done
fi

status=0
summary=()
for t in "${targets[@]}"; do
  exe=$build/fuzz/fuzz_$t
  if [ ! -x "$exe" ]; then
    echo "fuzz: $exe is not built (make fuzz builds it)" >&2
    exit 2
  fi
  work=$build/corpus/$t
  art=$build/artifacts/$t/
  log=$build/logs/$t.log
  mkdir -p "$work" "$art" "$(dirname "$log")"
  args=(-max_total_time="$seconds" -print_final_stats=1 -timeout=30 -rss_limit_mb=2048
        -artifact_prefix="$art")
  [ -f "fuzz/$t.dict" ] && args+=(-dict="fuzz/$t.dict")
  echo "== fuzz_$t for ${seconds}s (log: $log)"
  "$exe" "${args[@]}" "$work" "fuzz/corpus/$t" >"$log" 2>&1
  rc=$?
  execs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -1)
  [ -n "$execs" ] || execs=$(grep -o '^#[0-9]*' "$log" | tail -1 | tr -d '#')
  cov=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | sed 's/cov: //')
  if [ $rc -eq 0 ]; then
    crash=none
  else
    crash="CRASH (exit $rc): $(grep -m1 -E 'DISAGREEMENT|ERROR:' "$log" | cut -c1-160);"
    crash+=" input $(sed -n "s/.*Test unit written to //p" "$log" | tail -1)"
    status=1
  fi
  line=$(printf '%-14s executions %10s   edges (cov) %6s   crash: %s' "$t" "${execs:-0}" \
         "${cov:-?}" "$crash")
  echo "$line"
  summary+=("$line")
done
echo "== fuzz summary (${seconds}s per target)"
printf '%s\n' "${summary[@]}"
exit $status
