#!/usr/bin/env bash
# Restore benchmark (issue 3): the same realistic image (default 4 GiB, 45% used) restored from
# `appliance serve` on loopback to a file and to a loop device, side by side in one run with raw
# `dd` (this machine's write limit), `curl | zstd -d | dd` of the whole image, `casync extract` from
# an HTTP store and `curl | zstd -d | partclone.restore`. Cold page cache before each run.
# Then the figure issue 12 asks for: restorer -> loop device against `dd oflag=direct` writing the
# same number of bytes (the used bytes) to the same loop device, alternating, RUNS times, medians,
# and their ratio (target: at most 1.15).
# Usage: bench/restore.sh [SIZE_GIB] [USED_FRACTION] [RUNS]   (results appended to docs/benchmarks.md)
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
size=${1:-4}
used=${2:-0.45}
runs=${3:-3}
scripts/setup
cargo build --release -q -p appliance -p restorer -p bmr-tests
work=${BENCH_DIR:-target/bench}
mkdir -p "$work"
img="$work/mixed-${size}g-${used}.img"
[ -f "$img" ] || target/release/fixture build big_mixed "$img" --size "${size}G" --used "$used"
bytes=$(stat -c %s "$img")

# Inputs for every tool, prepared untimed.
rstore="$work/rstore"; rm -rf "$rstore" "$work/r.castr" "$work/r.caibx"
target/release/appliance init --store "$rstore" >/dev/null
target/release/appliance ingest --store "$rstore" --host bench "$img" >/dev/null
casync make --store="$work/r.castr" "$work/r.caibx" "$img" >/dev/null
zstd -3 -T0 -q -f "$img" -o "$work/r.img.zst"
read -r off len < <(sfdisk -J "$img" | python3 -c 'import json,sys; t=json.load(sys.stdin)["partitiontable"]; p=[p for p in t["partitions"] if p["type"].upper().startswith("0FC63DAF")][0]; print(p["start"]*512, p["size"]*512)')
srcloop=$(losetup -r -f --show -o "$off" --sizelimit "$len" "$img")
partclone.extfs -c -s "$srcloop" -o - -q 2>/dev/null | zstd -3 -T0 -q > "$work/r.pc.zst"
losetup -d "$srcloop"
used_bytes=$(python3 -c "import json;m=json.load(open('$(ls -d "$rstore"/hosts/bench/snapshots/*/manifest.json | head -1)'));print(m['disks'][0]['totals']['used_bytes'])")

port=$((20000 + RANDOM % 20000)); hport=$((port + 1))
target/release/appliance serve --store "$rstore" --listen 127.0.0.1:$port 2>/dev/null &
serve_pid=$!
python3 -m http.server --bind 127.0.0.1 $hport --directory "$work" >/dev/null 2>&1 &
http_pid=$!
out="$work/restore-target.img"
tloop=""
cleanup() {
  kill $serve_pid $http_pid 2>/dev/null || true
  [ -n "$tloop" ] && losetup -d "$tloop" 2>/dev/null || true
  rm -f "$out"
}
trap cleanup EXIT
sleep 1
fresh() { rm -f "$out"; truncate -s "$bytes" "$out"; }

fresh
measure "dd raw copy" "dd if=$img of=$out bs=4M oflag=direct conv=notrunc status=none"
dd_wall=$LAST_WALL
row "dd if=image of=file bs=4M oflag=direct (write limit)" "$bytes"

fresh
measure "restorer -> file" "target/release/restorer restore --from http://127.0.0.1:$port/store --host bench --target $out --json > $work/r.json"
fetched=$(python3 -c "import json;d=json.load(open('$work/r.json'));s=d.get('summary',d);print(sum(x['fetched_bytes'] for x in (s['disks'] if 'disks' in s else s)))" 2>/dev/null || echo 0)
row "restorer restore -> file" "$fetched"

fresh
tloop=$(losetup -f --show "$out")
measure "restorer -> loop" "target/release/restorer restore --from http://127.0.0.1:$port/store --host bench --target $tloop > /dev/null"
row "restorer restore -> loop device" "$fetched"
measure "dd raw copy -> loop" "dd if=$img of=$tloop bs=4M oflag=direct status=none"
row "dd if=image of=loop bs=4M oflag=direct" "$bytes"
losetup -d "$tloop"; tloop=""
# The direct-write time of the used bytes, against the restore, in turn, on two loop devices over
# the same file: `--direct-io=on` (the loop driver writes to the virtual disk with O_DIRECT: the
# disk's write limit, the figure of the target) and the default page-cache loop (its writes are a
# memory copy in a kernel thread that competes with the restorer for the 2 cores; reported too).
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
used_blocks=$(( (used_bytes + 4194303) / 4194304 ))
declare -A RATIO
for dio in on off; do
  tloop=$(losetup -f --show --direct-io=$dio "$out")
  r_walls=(); d_walls=()
  for _ in $(seq "$runs"); do
    measure "restorer -> loop dio=$dio (ratio run)" "target/release/restorer restore --from http://127.0.0.1:$port/store --host bench --target $tloop > /dev/null"
    r_walls+=("$LAST_WALL")
    measure "dd used bytes -> loop dio=$dio" "dd if=$img of=$tloop bs=4M count=$used_blocks iflag=direct oflag=direct status=none"
    d_walls+=("$LAST_WALL")
  done
  losetup -d "$tloop"; tloop=""
  r_med=$(median "${r_walls[@]}"); d_med=$(median "${d_walls[@]}")
  ratio=$(python3 -c "print(round($r_med/$d_med, 2))")
  echo "loop dio=$dio: restore / dd of the used bytes: $r_med s / $d_med s = ${ratio}x" >&2
  RATIO[$dio]="restorer ${r_walls[*]} s (median $r_med), dd ${d_walls[*]} s (median $d_med): **${ratio}x**"
done

fresh
measure "curl | zstd -d | dd" "curl -s http://127.0.0.1:$hport/r.img.zst | zstd -d -T0 -q | dd of=$out bs=4M iflag=fullblock oflag=direct conv=notrunc status=none"
row "curl \\| zstd -d \\| dd (whole image)" "$(stat -c %s "$work/r.img.zst")"

fresh
measure "casync extract (HTTP)" "casync extract --store=http://127.0.0.1:$hport/r.castr http://127.0.0.1:$hport/r.caibx $out"
row "casync extract from HTTP store" "$(filebytes "$work/r.castr")"

rm -f "$out"; truncate -s "$len" "$out"
measure "curl | zstd -d | partclone.restore" "curl -s http://127.0.0.1:$hport/r.pc.zst | zstd -d -q | partclone.restore -s - -O $out >/dev/null 2>&1"
row "curl \\| zstd -d \\| partclone.restore (ext4 partition)" "$(stat -c %s "$work/r.pc.zst")"

{
  echo
  echo "### Restore, $(date -u +%Y-%m-%d), ${size} GiB image, ${used} used ($(nproc) cores), loopback HTTP"
  echo
  echo "Used bytes: $used_bytes; raw dd write bandwidth this run: $(python3 -c "print(round($bytes/1e6/$dd_wall))") MB/s;"
  echo "target wall time for the restorer (1.2 x used / dd bandwidth): $(python3 -c "print(round(1.2*$used_bytes/($bytes/$dd_wall),2))") s."
  echo
  echo "Against \`dd iflag=direct oflag=direct\` of the used bytes to the same loop device, $runs alternating runs:"
  echo "- loop with direct I/O (the disk's write limit; target at most 1.15): ${RATIO[on]}"
  echo "- page-cache loop (writes are a memory copy on the same 2 cores): ${RATIO[off]}"
  echo
  print_table "bytes over the network"
} | tee -a docs/benchmarks.md
