#!/usr/bin/env bash
# File-level restore benchmark (issue 10): listing a 100k-file ext4 snapshot. An ext4 image holds
# one directory of N files (default 100,000) and a tree of N more in 100 directories; it is
# ingested, then listed and walked through the chunks by `appliance files`, beside debugfs
# reading the same image directly (no snapshot, no chunks: the floor).
#
#   N=100000 bench/files.sh          (results: $WORK/results.txt)
#
# Needs e2fsprogs and GNU time (scripts/setup installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
. bench/lib.sh
N=${N:-100000}
WORK=${WORK:-$(pwd)/target/bench-files}
rm -rf "$WORK"; mkdir -p "$WORK/tree/flat" "$WORK/tree/deep"
cargo build -q --release -p appliance
APP=$(pwd)/target/release/appliance
( cd "$WORK/tree/flat" && seq -f 'file%06g.txt' 1 "$N" | xargs touch )
for d in $(seq -f 'd%03g' 1 100); do mkdir "$WORK/tree/deep/$d"; done
( cd "$WORK/tree/deep" && seq 1 "$N" | awk '{printf "d%03d/f%06d\n", ($1 % 100) + 1, $1}' | xargs touch )
truncate -s 4G "$WORK/fs.img"
mkfs.ext4 -q -F -N $((N * 2 + 10000)) -d "$WORK/tree" "$WORK/fs.img"
"$APP" init --store "$WORK/store" >/dev/null
"$APP" ingest --store "$WORK/store" --host files "$WORK/fs.img" >/dev/null
ls_cmd="$APP files ls --store $WORK/store --host files"
measure "appliance files ls /flat ($N entries)" "$ls_cmd /flat > $WORK/ls.txt"
row "appliance files ls /flat ($N entries)" "$(stat -c %s "$WORK/ls.txt")"
measure "appliance files export / (2 x $N files) to /dev/null" "$APP files export --store $WORK/store --host files / -o /dev/null 2>/dev/null"
row "appliance files export / (tar of 2 x $N files)" 0
measure "debugfs ls -l /flat on the raw image" "debugfs -R 'ls -l /flat' $WORK/fs.img > $WORK/debugfs.txt 2>/dev/null"
row "debugfs ls -l /flat (raw image, no snapshot)" "$(stat -c %s "$WORK/debugfs.txt")"
echo "listed $(wc -l < "$WORK/ls.txt") entries" >&2
print_table "output bytes" | tee "$WORK/results.txt"
