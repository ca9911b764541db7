#!/usr/bin/env bash
# Runs the shell commands of the documentation, as a reader would after `make build`.
#
# Usage: scripts/check-docs.sh [--build-dir DIR] [--list] [FILE.md...]
#   (default files: README.md DESIGN.md BENCHMARKS.md docs/*.md scenarios/README.md)
#
# The convention, for whoever writes docs:
# - Only the lines of ```sh fenced blocks are commands. Output, JSON, C++ and console
#   transcripts go in other fences (```, ```json, ```cpp) and are never run.
# - Each ```sh block runs as one bash script with `set -e` from the repository root, so a line
#   may set a variable (`G=build/release/tools/gfnmap/gfnmap`) that later lines of the same
#   block use. A line fails the block when it exits non-zero, or when the first command of a
#   pipeline does (`$G explain --json x.json | head -40` checks $G's status, not head's).
# - A trailing comment may carry markers, separated by `;`, each piece exactly one of:
#     `# needs /dev/kvm`     skipped, with the reason printed, when /dev/kvm cannot be opened;
#     `# needs userfaultfd`  skipped when neither the syscall nor /dev/userfaultfd is usable;
#     `# slow`               skipped unless GFNMAP_DOCS_SLOW=1 (benchmarks, whole suites);
#     `# exit N`             the command must exit with status N (e.g. a deliberate mismatch).
#   Other comment text is free: `$G run --memory 64M   # the main job; needs /dev/kvm`.
# - Never run, only checked statically (they build, install or run whole test suites, and this
#   check itself runs inside `make test`): lines starting with `make`, `cmake`, `ctest`,
#   `sudo`. Every line, run or not, may name only build directories the presets create
#   (build/release, build/asan, build/tsan).
# - Every block is bounded by GFNMAP_DOCS_TIMEOUT seconds (default 120); a whole check should
#   take well under two minutes on two cores, so keep sizes small (`--memory 64M`) and mark
#   long commands `# slow`.
#
# With --build-dir DIR (CTest passes its build directory), `build/release` in the commands
# stands for DIR. Exit status: 0 all run commands passed, 1 a command failed (the doc, the
# block's line and the command are named), 2 bad usage.
set -u -o pipefail

root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root" || exit 2

build_dir=build/release
list_only=0
files=()
while [ $# -gt 0 ]; do
  case "$1" in
    --build-dir) build_dir=${2:?--build-dir needs a directory}; shift 2 ;;
    --list) list_only=1; shift ;;
    -h|--help) sed -n '2,/^set -u/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    -*) echo "check-docs: unknown option $1" >&2; exit 2 ;;
    *) files+=("$1"); shift ;;
  esac
done
if [ ${#files[@]} -eq 0 ]; then
  files=(README.md DESIGN.md BENCHMARKS.md docs/*.md scenarios/README.md)
fi
set -f  # the checker itself never expands globs of the commands it reads

# `build/release` in the docs stands for the build under test.
subst=""
if [ "$(realpath -m "$build_dir")" != "$(realpath -m "$root/build/release")" ]; then
  subst=$(realpath -m "$build_dir")
fi

timeout_s=${GFNMAP_DOCS_TIMEOUT:-120}
slow=${GFNMAP_DOCS_SLOW:-0}

kvm_reason=""
if [ ! -e /dev/kvm ]; then
  kvm_reason="/dev/kvm does not exist"
elif ! { exec 9<>/dev/kvm; } 2>/dev/null; then
  kvm_reason="/dev/kvm cannot be opened read-write"
else
  exec 9>&-
fi
uffd_reason=""
if ! { [ "$(id -u)" -eq 0 ] || [ "$(cat /proc/sys/vm/unprivileged_userfaultfd 2>/dev/null)" = 1 ] ||
       { [ -r /dev/userfaultfd ] && [ -w /dev/userfaultfd ]; }; }; then
  uffd_reason="userfaultfd needs privileges here (vm.unprivileged_userfaultfd=0, /dev/userfaultfd not usable)"
fi

# Extracts the ```sh blocks of one file as records "start\x1fline\x1fcode\x1fcomment", one
# per command line (continuation lines ending in \ are joined; comment-only and empty lines are
# dropped), and a record "start\x1fEND\x1f\x1f" after each block. The comment starts at the
# first unquoted `#` that begins a word.
extract() {
  awk '
    function trim(x) { sub(/^[ \t]+/, "", x); sub(/[ \t]+$/, "", x); return x }
    function emit(start, n, s,    q, i, c, code, comment) {
      q = ""; code = s; comment = ""
      for (i = 1; i <= length(s); i++) {
        c = substr(s, i, 1)
        if (q != "") { if (c == q) q = ""; else if (c == "\\" && q == "\"") i++; continue }
        if (c == "\\") { i++; continue }
        if (c == "\"" || c == "\047") { q = c; continue }
        if (c == "#" && (i == 1 || substr(s, i - 1, 1) ~ /[ \t]/)) {
          code = substr(s, 1, i - 1); comment = substr(s, i + 1); break
        }
      }
      code = trim(code)
      if (code != "") print start "\037" n "\037" code "\037" trim(comment)
    }
    BEGIN { inb = 0; pend = ""; pline = 0 }
    /^```/ {
      if (!inb && $0 ~ /^```sh[ \t]*$/) { inb = 1; start = NR; next }
      if (inb) { if (pend != "") emit(start, pline, pend); pend = ""
                 print start "\037END\037\037"; inb = 0; next }
    }
    inb {
      line = $0
      if (pend == "") pline = NR
      if (line ~ /\\$/) { pend = pend substr(line, 1, length(line) - 1) " "; next }
      emit(start, pline, pend line); pend = ""
    }' "$1"
}

trim() { local s=$1; s=${s#"${s%%[![:space:]]*}"}; s=${s%"${s##*[![:space:]]}"}; REPLY=$s; }

failures=0
ran=0
skipped=0
t_start=$(date +%s)

fail() {  # doc, line, command, message
  echo "FAIL $1:$2: $3"
  echo "     $4"
  failures=$((failures + 1))
}

# Runs one block's script; $1 doc, $2 block start line, $3 script file.
run_block() {
  local doc=$1 start=$2 script=$3 log state rc t0 t1
  log=$(mktemp) state=$(mktemp)
  t0=$(date +%s)
  GFNMAP_DOCS_STATE=$state timeout -k 10 "$timeout_s" bash "$script" >"$log" 2>&1 </dev/null
  rc=$?
  t1=$(date +%s)
  if [ $rc -eq 0 ]; then
    echo "ok   $doc:$start (block, $((t1 - t0)) s)"
  else
    local where cmd
    where=$(cut -f1 "$state" 2>/dev/null)
    cmd=$(cut -f2- "$state" 2>/dev/null)
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
      fail "$doc" "${where:-$start}" "$cmd" "timed out: the block ran longer than ${timeout_s} s"
    else
      fail "$doc" "${where:-$start}" "$cmd" "exit status $rc (block at line $start); its output ends:"
    fi
    tail -n 30 "$log" | sed 's/^/     | /'
  fi
  rm -f "$log" "$state"
}

for doc in "${files[@]}"; do
  [ -f "$doc" ] || { echo "check-docs: no such file $doc" >&2; exit 2; }
  script=""
  body=""
  while IFS=$'\037' read -r start lineno code comment; do
    if [ "$lineno" = END ]; then
      if [ -n "$body" ] && [ $list_only -eq 0 ]; then
        script=$(mktemp)
        {
          echo 'set -e'
          echo '__pipe() { local s=$1; if [ "$s" -ne 0 ] && [ "$s" -ne 141 ]; then exit "$s"; fi; }'
          printf '%s' "$body"
        } >"$script"
        run_block "$doc" "$start" "$script"
        rm -f "$script"
      fi
      body=""
      continue
    fi
    # Static check: build directories must be ones the presets create.
    prev=""
    for tok in $code; do
      tok=${tok#*=}
      tok=${tok#[\"\']}
      case "$tok" in
        build/*|build-*) bad=1 ;;
        build) case "$prev" in -B|-S|--build|--test-dir|--install) bad=1 ;; *) bad=0 ;; esac ;;
        *) bad=0 ;;
      esac
      case "$tok" in
        build/release|build/release/*|build/asan|build/asan/*|build/tsan|build/tsan/*) bad=0 ;;
      esac
      [ $bad -eq 0 ] || fail "$doc" "$lineno" "$code" "names $tok: the presets create only build/release, build/asan and build/tsan"
      prev=$tok
    done
    # Markers.
    reason="" expect=""
    IFS=';' read -r -a pieces <<<"$comment"
    for p in "${pieces[@]}"; do
      trim "$p"; p=$REPLY
      case "$p" in
        "needs /dev/kvm") [ -z "$kvm_reason" ] || reason="needs /dev/kvm: $kvm_reason" ;;
        "needs userfaultfd") [ -z "$uffd_reason" ] || reason="needs userfaultfd: $uffd_reason" ;;
        slow) [ "$slow" = 1 ] || reason="slow (GFNMAP_DOCS_SLOW=1 runs it)" ;;
      esac
      if [[ $p =~ ^exit\ ([0-9]+)$ ]]; then expect=${BASH_REMATCH[1]}; fi
    done
    first=$code
    while [[ $first =~ ^[A-Za-z_][A-Za-z0-9_]*=[^[:space:]]*[[:space:]]+(.*)$ ]]; do
      first=${BASH_REMATCH[1]}
    done
    case "$first" in
      make|make\ *|cmake|cmake\ *|ctest|ctest\ *|sudo\ *) reason="not run by the checker (builds, installs or runs suites)" ;;
    esac
    if [ $list_only -eq 1 ]; then
      printf '%s:%s\t%s\t%s\n' "$doc" "$lineno" "${reason:-run}${expect:+, exit $expect}" "$code"
      continue
    fi
    if [ -n "$reason" ]; then
      echo "skip $doc:$lineno: $reason: $code"
      skipped=$((skipped + 1))
      continue
    fi
    ran=$((ran + 1))
    run=$code
    [ -z "$subst" ] || run=${run//build\/release/$subst}
    printf -v quoted '%q' "$code"
    body+="printf '%s\\t%s\\n' $lineno $quoted >\"\$GFNMAP_DOCS_STATE\""$'\n'
    body+="echo + $quoted"$'\n'
    if [ -n "$expect" ]; then
      body+="set +e"$'\n'"$run"$'\n'"__rc=\$?"$'\n'"set -e"$'\n'
      body+="if [ \$__rc -ne $expect ]; then echo \"exit status \$__rc, expected $expect\"; exit 1; fi"$'\n'
    else
      body+="$run"$'\n'"__pipe \"\${PIPESTATUS[0]}\""$'\n'
    fi
  done < <(extract "$doc")
done

[ $list_only -eq 1 ] && exit 0
echo "check-docs: $ran commands run, $skipped skipped, $failures failed, $(( $(date +%s) - t_start )) s"
[ $failures -eq 0 ]
