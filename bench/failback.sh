#!/usr/bin/env bash
# Failback benchmark (issue 5): a disk of SIZE_GIB GiB (45% data) runs as a failover VM, CHANGE_PCT %
# of it is rewritten inside the VM, then the "repaired server" (a file holding the original
# snapshot) is brought up to date three ways, side by side in one run:
#   - restorer failback           (rounds + cutover; prints the cutover window)
#   - restorer restore            (a full restore of the snapshot onto a blank file, for scale)
#   - casync extract --seed       (the server's disk as seed, the VM's final disk as the index)
# over plain loopback and, as root, over a veth pair into a network namespace limited to RATE
# with tc (the appliance and the casync store are served from inside the namespace).
#
#   SIZE_GIB=4 CHANGE_PCT=2 RATE=1gbit bench/failback.sh        (results: $WORK/results.txt)
#
# The VM boots nothing (its disk is raw test data): its disk is written through QEMU's block layer
# (HMP qemu-io), which is where a guest's writes land. Needs qemu-system-x86, qemu-utils, casync,
# python3, iproute2 (scripts/setup installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-4}
CHANGE_PCT=${CHANGE_PCT:-2}
RATE=${RATE:-1gbit}
WORK=${WORK:-/tmp/bmr-bench-failback}
NS=bmrfb$$
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p appliance -p restorer
A=$CARGO_TARGET_DIR/release/appliance
R=$CARGO_TARGET_DIR/release/restorer
rm -rf "$WORK"; mkdir -p "$WORK"; W=$(cd "$WORK" && pwd)
S=$W/store
size=$((SIZE_GIB << 30))
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  "$A" failover delete --force --store "$S" --name bench 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
}
trap cleanup EXIT
log() { echo "$*" | tee -a "$W/results.txt"; }

# Source disk: 45% random data in 64 MiB runs spread over the disk, the rest zeros.
python3 - "$W/source.raw" "$size" <<'EOF'
import os, sys
path, size = sys.argv[1], int(sys.argv[2])
run = 64 << 20
with open(path, "wb") as f:
    f.truncate(size)
    for k in range(size // run):
        if (k * 45) % 100 < 45:
            f.seek(k * run); f.write(os.urandom(run))
EOF
"$A" init --store "$S" >/dev/null
"$A" ingest --store "$S" --host srv --raw "$W/source.raw" | tail -1
"$A" failover start --store "$S" --host srv --name bench --accel auto --net none --memory 128 --cpus 1 >/dev/null
cp --sparse=always "$S/private/failover/bench/disk0.base.raw" "$W/server.raw"   # the repaired server

# CHANGE_PCT % of the disk rewritten inside the VM, 1 MiB writes at random places.
qmp=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["qmp"])' "$S/private/failover/bench/state.json")
head -c $((1 << 20)) /dev/urandom > "$W/mib.bin"
python3 - "$qmp" "$size" "$CHANGE_PCT" "$W/mib.bin" <<'EOF'
import json, random, socket, sys
qmp, size, pct, pattern = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
s = socket.socket(socket.AF_UNIX); s.connect(qmp); f = s.makefile("rw"); f.readline()
def cmd(c, a=None):
    f.write(json.dumps({"execute": c, **({"arguments": a} if a else {})}) + "\n"); f.flush()
    while True:
        r = json.loads(f.readline())
        if "return" in r or "error" in r: return r
cmd("qmp_capabilities")
mib = 1 << 20
random.seed(5)
for _ in range(int(size * pct / 100) // mib):
    off = random.randrange(size // mib) * mib
    cmd("human-monitor-command", {"command-line": f'qemu-io disk0 "write -s {pattern} {off} {mib}"'})
EOF
"$A" failover status --store "$S" --name bench | grep changed | tee -a "$W/results.txt"

serve() {  # serve [netns] -> sets URL; the appliance and a static casync store
  local host=127.0.0.1 wrap=()
  if [ -n "${1:-}" ]; then host=10.231.0.2; wrap=(ip netns exec "$NS"); fi
  "${wrap[@]}" "$A" serve --store "$S" --listen "$host:18950" >"$W/serve.log" 2>&1 & pids+=($!)
  "${wrap[@]}" python3 -m http.server --bind "$host" 18951 --directory "$W/casync" >/dev/null 2>&1 & pids+=($!)
  URL=http://$host:18950/store; CAURL=http://$host:18951
  sleep 1
}
stop_servers() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; pids=(); sleep 0.5; }

measure() {  # measure LABEL -> failback, full restore, casync
  local label=$1
  cp --sparse=always "$S/private/failover/bench/disk0.base.raw" "$W/server.raw"
  "$A" failover start --store "$S" --name bench >/dev/null 2>&1 || true
  /usr/bin/time -f "%e s %M KiB" -o "$W/fb.time" "$R" failback --json --from "$URL" --vm bench \
      --target "$W/server.raw" --pubkey "$S/pubkey" --stop-timeout 2s --verify delta >"$W/fb.json"
  python3 - "$W/fb.json" "$label" <<'EOF' | tee -a "$W/results.txt"
import json, sys
r = json.load(open(sys.argv[1]))
print(f"{sys.argv[2]}: failback {r['total_seconds']:.1f}s, {r['total_bytes_fetched']/1e6:.1f} MB fetched, "
      f"{len(r['rounds'])} rounds, cutover window {r['cutover_window_seconds']:.2f}s")
for x in r["rounds"]:
    print(f"   round {x['round']}{' final' if x['final'] else ''}: {x['slots_considered']} slots, "
          f"{x['slots_written']} written, {x['bytes_fetched']/1e6:.1f} MB, {x['seconds']:.2f}s")
EOF
  rm -f "$W/blank.raw"; truncate -s "$size" "$W/blank.raw"
  local t0; t0=$(date +%s%N)
  "$R" restore --from "$URL" --host srv --target "$W/blank.raw" --json >"$W/full.json"
  log "$label: full restore $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  cp --sparse=always "$S/private/failover/bench/disk0.base.raw" "$W/seed.raw"
  t0=$(date +%s%N)
  casync extract --seed="$W/seed.raw" --store="$CAURL/store.castr" "$CAURL/final.caibx" "$W/casync-out.raw" 2>/dev/null
  log "$label: casync extract --seed $(( ($(date +%s%N) - t0) / 1000000 )) ms"
  # After the cutover the VM is failed back: roll it back for the next measurement.
}

# The VM's final disk as casync sees it (made once, outside the timings).
"$A" failover stop --store "$S" --name bench --hard >/dev/null
top=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["disks"][0]["overlays"][-1])' "$S/private/failover/bench/state.json")
qemu-img convert -U -O raw "$S/private/failover/bench/$top" "$W/final.raw"
mkdir -p "$W/casync"
casync make --store="$W/casync/store.castr" "$W/casync/final.caibx" "$W/final.raw" >/dev/null

serve; measure loopback; stop_servers
if [ "$(id -u)" = 0 ] && command -v tc >/dev/null; then
  ip netns add "$NS"
  ip link add "v$NS" type veth peer name "p$NS"
  ip link set "p$NS" netns "$NS"
  ip addr add 10.231.0.1/30 dev "v$NS"; ip link set "v$NS" up
  ip netns exec "$NS" ip addr add 10.231.0.2/30 dev "p$NS"
  ip netns exec "$NS" ip link set "p$NS" up; ip netns exec "$NS" ip link set lo up
  tc qdisc add dev "v$NS" root tbf rate "$RATE" burst 256kb latency 50ms
  ip netns exec "$NS" tc qdisc add dev "p$NS" root tbf rate "$RATE" burst 256kb latency 50ms
  serve netns; measure "$RATE"; stop_servers
else
  log "(not root or no tc: the $RATE measurement is skipped)"
fi
echo "results in $W/results.txt"
