#!/usr/bin/env bash
# Ingest benchmark (issue 2): one realistic disk image (default 4 GiB, 45% used: text, binaries,
# random data, duplicates), ingested by `appliance ingest`, `casync make` and
# `partclone.extfs -c | zstd`, in the same run, from a cold page cache each time.
# Usage: bench/ingest.sh [SIZE_GIB] [USED_FRACTION]   (results appended to docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
size=${1:-4}
used=${2:-0.45}
scripts/setup
command -v bc >/dev/null || apt-get install -y -qq bc >/dev/null
cargo build --release -q -p appliance -p bmr-tests
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
img="$work/mixed-${size}g.img"
[ -f "$img" ] || target/release/fixture build big_mixed "$img" --size "${size}G" --used "$used"
echo "image: $img ($(du -h --apparent-size "$img" | cut -f1) logical, $(du -h "$img" | cut -f1) allocated)" >&2

rm -rf "$work/store" "$work/castr" "$work/pc.zst" "$work/img.caibx"
target/release/appliance init --store "$work/store" >/dev/null
measure "appliance ingest" "target/release/appliance ingest --store $work/store --host bench $img > $work/ingest.out"
row "appliance ingest" "$(filebytes "$work/store/chunks")"
cat "$work/ingest.out" >&2

measure "casync make" "casync make --store=$work/castr $work/img.caibx $img"
row "casync make" "$(filebytes "$work/castr")"

# partclone needs the filesystem itself: a read-only loop device over the ext4 partition.
start=$(sfdisk -J "$img" | python3 -c 'import json,sys; t=json.load(sys.stdin)["partitiontable"]; p=[p for p in t["partitions"] if p["type"].upper().startswith("0FC63DAF")][0]; print(p["start"]*512, p["size"]*512)')
read -r off len <<< "$start"
loop=$(losetup -r -f --show -o "$off" --sizelimit "$len" "$img")
trap 'losetup -d "$loop" 2>/dev/null || true' EXIT
measure "partclone.extfs -c | zstd" "partclone.extfs -c -s $loop -o - -q 2>/dev/null | zstd -3 -T0 -q -o $work/pc.zst"
row "partclone.extfs -c \\| zstd -3 -T0" "$(stat -c %s "$work/pc.zst")"

{
  echo
  echo "### Ingest, $(date -u +%Y-%m-%d), ${size} GiB image, ${used} used ($(nproc) cores)"
  echo
  print_table "stored bytes"
} | tee -a docs/benchmarks.md
