#!/usr/bin/env bash
# Runs metald's fuzz targets (fuzz/, cargo-fuzz and libFuzzer).
#
#   scripts/fuzz.sh short [TARGET...]         each target for FUZZ_SECONDS (default 5)
#   scripts/fuzz.sh long [RUNS] [TARGET...]   each target for RUNS executions (default 1000000)
#
# The test suite (scripts/test.sh) runs `short`. It builds without
# optimisation or AddressSanitizer, which keeps the build to a few minutes;
# `long` builds optimised with AddressSanitizer, for the unsafe code in
# dependencies. Both build in fuzz/target (git-ignored).
#
# Seeds are fuzz/corpus/<target>/ and are only read; what a run learns goes
# to fuzz/target/corpus/<target>/ and is reused by the next run. A crash,
# hang or leak fails the script, naming the input that reproduces it
# (fuzz/artifacts/<target>/) and the command that replays it. Each target's
# output is in fuzz/target/logs/<mode>-<target>.log; the summary gives its
# executions and seconds.
#
# cargo-fuzz needs nightly compiler flags; RUSTC_BOOTSTRAP=1 allows them on
# the stable toolchain. scripts/setup.sh installs cargo-fuzz when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x "$HOME/.cargo/bin/cargo" ] && export PATH="$HOME/.cargo/bin:$PATH"

ALL=(rpc_proto rpc_json auth_token firecracker_metrics qmp_reply cloudhypervisor_api)
usage() { sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

mode=${1:-}
shift || true
case $mode in
  short)
    build=(--dev --sanitizer none)
    limit=(-max_total_time="${FUZZ_SECONDS:-5}")
    ;;
  long)
    runs=1000000
    if [[ ${1:-} =~ ^[0-9]+$ ]]; then runs=$1; shift; fi
    build=(--release --sanitizer address)
    limit=(-runs="$runs")
    ;;
  *) usage ;;
esac
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${ALL[@]}")
for t in "${targets[@]}"; do
  [ -f "fuzz/fuzz_targets/$t.rs" ] || { echo "fuzz: no target $t (have: ${ALL[*]})" >&2; exit 2; }
done

cargo fuzz --version >/dev/null 2>&1 || bash scripts/setup.sh
export RUSTC_BOOTSTRAP=1

echo "== fuzz: building ${targets[*]} (${build[*]})"
start=$SECONDS
if [ "${targets[*]}" = "${ALL[*]}" ]; then
  cargo fuzz build "${build[@]}"
else
  for t in "${targets[@]}"; do cargo fuzz build "${build[@]}" "$t"; done
fi
echo "== fuzz: built in $((SECONDS - start)) s"

logs=fuzz/target/logs
mkdir -p "$logs"
summary=()
failed=0
for t in "${targets[@]}"; do
  work=fuzz/target/corpus/$t
  mkdir -p "$work" "fuzz/artifacts/$t"
  args=(-timeout=10 "${limit[@]}")
  [ -f "fuzz/dict/$t.dict" ] && args+=(-dict="fuzz/dict/$t.dict")
  log=$logs/$mode-$t.log
  marker=$(mktemp)
  echo "== fuzz: $t (${limit[*]})"
  began=$SECONDS
  rc=0
  cargo fuzz run "${build[@]}" "$t" "$work" "fuzz/corpus/$t" -- "${args[@]}" >"$log" 2>&1 || rc=$?
  took=$((SECONDS - began))
  done_line=$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)
  if [ "$rc" -eq 0 ] && [ -n "$done_line" ]; then
    n=$(awk '{print $2}' <<<"$done_line")
    summary+=("$(printf '%-20s %10s runs %6s s  no crash' "$t" "$n" "$took")")
  else
    failed=1
    reproducer=$(find "fuzz/artifacts/$t" -type f -newer "$marker" | head -1)
    summary+=("$(printf '%-20s FAILED (exit %s) after %s s, log %s' "$t" "$rc" "$took" "$log")")
    echo "fuzz: $t failed; from $log:" >&2
    # From the first report of the failure (panic, sanitizer, libFuzzer),
    # else the end of the log.
    if grep -q -E 'panicked at|ERROR: ' "$log"; then
      sed -n '/panicked at\|ERROR: /,$p' "$log" | grep -v -E '^#[0-9]+' | head -60 >&2
    else
      tail -40 "$log" >&2
    fi
    if [ -n "$reproducer" ]; then
      echo "fuzz: reproducer: $reproducer" >&2
      echo "fuzz: replay it: RUSTC_BOOTSTRAP=1 cargo fuzz run ${build[*]} $t $reproducer" >&2
    fi
  fi
  rm -f "$marker"
done

echo "== fuzz $mode: summary"
printf '%s\n' "${summary[@]}"
bad=$(printf '%s\n' "${summary[@]}" | grep -c FAILED || true)
echo "fuzz: $((${#targets[@]} - bad)) passed, $bad failed"
exit "$failed"
