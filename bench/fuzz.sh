#!/usr/bin/env bash
# The long fuzzing run (docs/fuzzing.md): every target for MINUTES minutes (default 30), one after
# the other, each from its committed seeds plus the work corpus kept under target/fuzz/corpus/ from
# earlier runs, which this run grows. With JOBS > 1, that many targets run at once (the machine
# has 2 cores: mind the other users of it).
# Usage: bench/fuzz.sh [MINUTES] [TARGET...]     JOBS=2 bench/fuzz.sh 60
# Findings: target/fuzz/artifacts/<target>/ (the script exits non-zero and names them).
# To shrink the work corpus and fold new seeds into the repo (small ones only):
#   target/fuzz/x86_64-unknown-linux-gnu/release/<t> -merge=1 fuzz/corpus/<t> target/fuzz/corpus/<t>
set -euo pipefail
cd "$(dirname "$0")/.."
minutes=${1:-30}
shift || true
scripts/fuzz --build-only
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(gpt mbr ext ntfs fat swap qcow2 manifest index round chunk http_head initramfs)
jobs=${JOBS:-1}
status=0
if [ "$jobs" -le 1 ]; then
  scripts/fuzz --time $((minutes * 60)) "${targets[@]}" || status=$?
else
  printf '%s\n' "${targets[@]}" |
    xargs -P "$jobs" -I{} scripts/fuzz --time $((minutes * 60)) {} || status=$?
fi
exit $status
