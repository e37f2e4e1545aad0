#!/usr/bin/env bash
# Server benchmark (issue 8, item 7): restore throughput through `appliance serve` as it is now
# (hyper + tokio, plain HTTP and HTTPS) against the thread-per-connection server it replaced
# (commit 60ee574, built in a worktree), in one run, same image, same store, same restorer, to a
# file on loopback. Runs alternate between the servers; cold page cache before each; medians.
# Usage: bench/serve.sh [SIZE_GIB] [USED_FRACTION] [RUNS]   (results appended to docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
size=${1:-2}
used=${2:-0.45}
runs=${3:-5}
OLD_REV=${OLD_REV:-60ee574}
scripts/setup
cargo build --release -q -p appliance -p restorer -p bmr-tests
old=${OLD_TREE:-target/bench/old-server}
if [ ! -x "$old/target/release/appliance" ]; then
  rm -rf "$old"
  git worktree add -f "$old" "$OLD_REV" >/dev/null
  (cd "$old" && cargo build --release -q -p appliance)
fi
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
img="$work/mixed-${size}g.img"
[ -f "$img" ] || target/release/fixture build big_mixed "$img" --size "${size}G" --used "$used"
bytes=$(stat -c %s "$img")
store="$work/sstore"; rm -rf "$store"
target/release/appliance init --store "$store" >/dev/null
target/release/appliance ingest --store "$store" --host bench "$img" >/dev/null

base=$((20000 + RANDOM % 20000))
new_port=$base; old_port=$((base + 1)); tls_port=$((base + 2)); boot_port=$((base + 3))
target/release/appliance serve --store "$store" --listen 127.0.0.1:$new_port 2>/dev/null &
p1=$!
"$old/target/release/appliance" serve --store "$store" --listen 127.0.0.1:$old_port 2>/dev/null &
p2=$!
target/release/appliance serve --store "$store" --tls --tls-listen 127.0.0.1:$tls_port \
  --listen 127.0.0.1:$boot_port 2>/dev/null &
p3=$!
out="$work/serve-target.img"
cleanup() { kill $p1 $p2 $p3 2>/dev/null || true; rm -f "$out"; }
trap cleanup EXIT
sleep 1

declare -A walls
names=("old server (60ee574), HTTP" "new server (hyper), HTTP" "new server (hyper), HTTPS")
urls=("http://127.0.0.1:$old_port/store" "http://127.0.0.1:$new_port/store" "https://127.0.0.1:$tls_port/store")
for r in $(seq 1 "$runs"); do
  for i in 0 1 2; do
    rm -f "$out"; truncate -s "$bytes" "$out"
    extra=""; [ "$i" = 2 ] && extra="--ca $store/private/tls/ca.pem"
    measure "${names[$i]} run $r" "target/release/restorer restore --from ${urls[$i]} --host bench --target $out $extra > /dev/null"
    walls[$i]+="$LAST_WALL "
  done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -n | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
{
  echo
  echo "### Server: old vs new, $(date -u +%Y-%m-%d) ($(nproc) cores, ${size} GiB image, ${used} used, $runs alternating runs each)"
  echo
  echo "Restore to a file over loopback, the same store and restorer; wall time of each run and the median."
  echo
  echo "| server | runs (s) | median (s) |"
  echo "|---|---|---|"
  for i in 0 1 2; do
    echo "| ${names[$i]} | ${walls[$i]} | $(echo "${walls[$i]}" | median) |"
  done
} | tee -a docs/benchmarks.md
