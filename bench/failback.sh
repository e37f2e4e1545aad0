#!/usr/bin/env bash
# Failback benchmark (issue 5). Two parts, each over plain loopback and, as root with tc, over a
# veth pair into a network namespace limited to RATE (the appliance and the casync store are served
# from inside the namespace, the restorer and casync run outside it).
#
# Part A: a SIZE_GIB GiB disk (USED_PCT % random data in 64 MiB runs, the rest zeros) runs as a
#   failover VM; CHANGE_PCT % of the disk is rewritten inside it (1 MiB writes at random places);
#   then the "repaired server" (a file holding the original snapshot) is brought up to date three
#   ways, side by side: `restorer failback` (rounds + cutover), the VM's stop then `restorer
#   restore` of its final disk onto a blank file (a full restore), `casync extract --seed` (the
#   server's original disk as seed). Wall time, bytes the tools report, bytes counted on the link. On loopback also the
#   local hashing rate of a first round (a failback run again onto the exact target: a pure
#   comparison) against `dd` of the used data, HASH_REPEAT times alternately. The page cache is
#   dropped before each command.
# Part B: the cutover window for a DELTA_MIB final delta on disks of CUT_SIZES GiB (CUT_USED_PCT %
#   data). `restorer failback --max-rounds 1 --api GATE` runs, GATE being a small pass-through of
#   its API requests: when the appliance has answered the round-1 request (round 1 frozen and
#   published), GATE writes DELTA_MIB of fresh random data into the VM before it hands the answer
#   on, so the final round (asked after it) carries exactly that delta, without a race.
#
#   SIZE_GIB=4 CHANGE_PCT=2 RATE=1gbit bench/failback.sh       (results: $WORK/results.txt)
#   PARTS=A or PARTS=B runs one part; KEEP=1 keeps the work files.
#
# The VMs boot nothing (their disks are raw test data), so they never answer the ACPI power button:
# at cutover the appliance forces them off after --stop-timeout (STOP_TIMEOUT, 1s here). Their
# disks are written through QEMU's block layer (HMP qemu-io), which is where a guest's writes land.
# Needs qemu-system-x86, qemu-utils, casync, python3, iproute2 (scripts/setup installs them).
set -euo pipefail
cd "$(dirname "$0")/.."
SIZE_GIB=${SIZE_GIB:-4}
USED_PCT=${USED_PCT:-45}
CHANGE_PCT=${CHANGE_PCT:-2}
RATE=${RATE:-1gbit}
CUT_SIZES=${CUT_SIZES:-4 16}
CUT_USED_PCT=${CUT_USED_PCT:-10}
DELTA_MIB=${DELTA_MIB:-64}
HASH_REPEAT=${HASH_REPEAT:-3}
STOP_TIMEOUT=${STOP_TIMEOUT:-1s}
PARTS=${PARTS:-AB}
KEEP=${KEEP:-0}
WORK=${WORK:-/tmp/bmr-bench-failback}
NS=bmrfb$$
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p appliance -p restorer
A=$(realpath "$CARGO_TARGET_DIR/release/appliance")
R=$(realpath "$CARGO_TARGET_DIR/release/restorer")
rm -rf "$WORK"; mkdir -p "$WORK"; W=$(cd "$WORK" && pwd)
S=$W/store
PY=$W/bench.py
pids=() vms=() netns=0
cleanup() {
  set +e
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null; done
  for v in "${vms[@]}"; do "$A" failover delete --force --store "$S" --name "$v" >/dev/null 2>&1; done
  [ "$netns" = 1 ] && { ip netns del "$NS"; ip link del "v$NS"; } 2>/dev/null
  if [ "$KEEP" != 1 ]; then
    rm -rf "$S" "$W/casync" "$W"/*.raw "$W"/*.bin
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM
trap 'echo "failed at line $LINENO: $BASH_COMMAND" >&2' ERR
log() { echo "$*" | tee -a "$W/results.txt"; }
cold() { sync; echo 3 > /proc/sys/vm/drop_caches; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$1" "$(now)"; }
jq1() { python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(eval(sys.argv[2]))" "$@"; }

cat >"$PY" <<'EOF'
import json, os, random, socket, sys, time
MIB = 1 << 20
RUN = 64 * MIB

def mkdisk(path, size, pct):
    """USED_PCT % random data in 64 MiB runs spread over the disk, the rest a hole."""
    runs = []
    with open(path, "wb") as f:
        f.truncate(size)
        for k in range(size // RUN):
            if (k * pct) % 100 < pct:
                f.seek(k * RUN)
                for _ in range(RUN // (8 * MIB)):
                    f.write(os.urandom(8 * MIB))
                runs.append(k)
    print(" ".join(map(str, runs)))

class Qmp:
    def __init__(self, path):
        self.s = socket.socket(socket.AF_UNIX)
        self.s.connect(path)
        self.f = self.s.makefile("rw")
        json.loads(self.f.readline())
        self.cmd("qmp_capabilities")
    def cmd(self, c, a=None):
        self.f.write(json.dumps({"execute": c, **({"arguments": a} if a else {})}) + "\n")
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                sys.exit("QMP: QEMU closed the connection")
            r = json.loads(line)
            if "error" in r:
                sys.exit(f"QMP {c}: {r['error']}")
            if "return" in r:
                return r["return"]
    def write(self, pattern, off, length):
        out = self.cmd("human-monitor-command",
                       {"command-line": f'qemu-io disk0 "write -s {pattern} {off} {length}"'})
        if out:  # errors come back as text; qemu-io's own output goes to QEMU's log
            sys.exit(f"qemu-io write at {off}: {out!r}")

def scatter(qmp, size, pct, pattern):
    """pct % of the disk rewritten in 1 MiB writes of fresh random data at random MiB offsets."""
    q = Qmp(qmp)
    random.seed(5)
    n = int(size * pct / 100) // MIB
    for _ in range(n):
        with open(pattern, "wb") as f:
            f.write(os.urandom(MIB))
        q.write(pattern, random.randrange(size // MIB) * MIB, MIB)
    print(n)

def gate(port, upstream, qmp, off, length, pattern, record):
    """A pass-through of the restorer's API requests (`restorer failback --api`). The first
    non-final round request goes to the appliance; once the appliance answered (the round is
    frozen and published) and before the restorer sees the answer, the delta is written into the
    VM. The final round, asked after that, therefore carries exactly the delta."""
    import http.server, urllib.error, urllib.request
    state = {"done": False, "answers": []}
    class H(http.server.BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            req = urllib.request.Request(upstream + self.path.removeprefix("/api/v1"), data=body,
                                         headers={"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=3600) as r:
                    code, answer = r.status, r.read()
            except urllib.error.HTTPError as e:
                code, answer = e.code, e.read()
            if code == 200 and not json.loads(body).get("final") and not state["done"]:
                state["done"] = True
                t0 = time.time()
                q = Qmp(qmp)
                q.write(pattern, off, length)
                q.s.close()
                done = time.time()
                state.update({"round": json.loads(answer)["round"], "offset": off,
                              "write_seconds": round(done - t0, 3),
                              "write_done_ms": int(done * 1000)})
            state["answers"].append(json.loads(answer))
            with open(record, "w") as f:
                json.dump(state, f)
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)
    http.server.ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()

if __name__ == "__main__":
    a = sys.argv
    if a[1] == "mkdisk":
        mkdisk(a[2], int(a[3]), int(a[4]))
    elif a[1] == "scatter":
        scatter(a[2], int(a[3]), float(a[4]), a[5])
    elif a[1] == "gate":
        gate(int(a[2]), a[3], a[4], int(a[5]), int(a[6]), a[7], a[8])
EOF

# --- network: loopback, and a veth pair into a namespace limited to RATE both ways ---
links=(loopback)
if [ "$(id -u)" = 0 ] && command -v tc >/dev/null; then
  netns=1
  ip netns add "$NS"
  ip link add "v$NS" type veth peer name "p$NS"
  ip link set "p$NS" netns "$NS"
  ip addr add 10.231.0.1/30 dev "v$NS"; ip link set "v$NS" up
  ip netns exec "$NS" ip addr add 10.231.0.2/30 dev "p$NS"
  ip netns exec "$NS" ip link set "p$NS" up; ip netns exec "$NS" ip link set lo up
  tc qdisc add dev "v$NS" root tbf rate "$RATE" burst 256kb latency 50ms
  ip netns exec "$NS" tc qdisc add dev "p$NS" root tbf rate "$RATE" burst 256kb latency 50ms
  links+=("$RATE")
else
  echo "(not root or no tc: only loopback is measured)" >&2
fi

# serve LINK: the appliance and a static server of the casync store; sets URL, CAURL, COUNTER.
# COUNTER counts the bytes the client receives: the host end of the veth (server -> client only),
# or lo (both directions, and anything else on loopback).
serve() {
  local host=127.0.0.1 wrap=() port=$((20000 + RANDOM % 20000))
  if [ "$1" != loopback ]; then host=10.231.0.2; wrap=(ip netns exec "$NS"); fi
  "${wrap[@]}" "$A" serve --store "$S" --listen "$host:$port" >>"$W/serve.log" 2>&1 & pids+=($!)
  mkdir -p "$W/casync"
  "${wrap[@]}" python3 -m http.server --bind "$host" $((port + 1)) --directory "$W/casync" \
      >/dev/null 2>&1 & pids+=($!)
  URL=http://$host:$port/store; CAURL=http://$host:$((port + 1))
  if [ "$1" = loopback ]; then COUNTER=/sys/class/net/lo/statistics/rx_bytes
  else COUNTER=/sys/class/net/v$NS/statistics/rx_bytes; fi
  for _ in $(seq 100); do
    curl -sf "$URL/store.json" >/dev/null && curl -sf "$CAURL/" >/dev/null && return 0
    sleep 0.1
  done
  echo "servers did not come up" >&2; return 1
}
stop_servers() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; pids=(); }
wire() { cat "$COUNTER"; }

# new_vm NAME HOST: a failover VM of HOST's latest snapshot; sets BASE (its disk) and QMP.
new_vm() {
  "$A" failover start --store "$S" --host "$2" --name "$1" --accel auto --net none --memory 128 \
      --cpus 1 >/dev/null
  vms+=("$1")
  BASE=$S/private/failover/$1/disk0.base.raw
  QMP=$(jq1 "$S/private/failover/$1/state.json" 'd["qmp"]')
}
# The VM running (started again after a cutover: a rollback), with its QMP socket.
vm_up() {
  local state
  state=$("$A" failover status --store "$S" --name "$1" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  [ "$state" = running ] || "$A" failover start --store "$S" --name "$1" >/dev/null 2>&1
  QMP=$(jq1 "$S/private/failover/$1/state.json" 'd["qmp"]')
}

log "failback benchmark $(date -u +%Y-%m-%dT%H:%MZ), $(nproc) cores, $(uname -r); links: ${links[*]}"
log "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"$A" init --store "$S" >/dev/null

part_a() {
  local size=$((SIZE_GIB << 30)) runs used n
  log ""
  log "## Part A: ${SIZE_GIB} GiB disk, ${USED_PCT}% data, ${CHANGE_PCT}% rewritten in the VM"
  runs=$(python3 "$PY" mkdisk "$W/source.raw" "$size" "$USED_PCT")
  used=$(( $(wc -w <<<"$runs") * (64 << 20) ))
  "$A" ingest --store "$S" --host srv --raw "$W/source.raw" >/dev/null
  rm -f "$W/source.raw"
  new_vm fb-a srv
  n=$(python3 "$PY" scatter "$QMP" "$size" "$CHANGE_PCT" "$W/mib.bin")
  log "used data: $used bytes; $n writes of 1 MiB in the VM"
  "$A" failover status --store "$S" --name fb-a | grep -i changed | tee -a "$W/results.txt"

  # The VM's final disk, for the full restore (ingested as host `final`) and for casync (untimed).
  "$A" failover stop --store "$S" --name fb-a --hard >/dev/null
  local top; top=$(jq1 "$S/private/failover/fb-a/state.json" 'd["disks"][0]["overlays"][-1]')
  qemu-img convert -U -O raw "$S/private/failover/fb-a/$top" "$W/final.raw"
  "$A" ingest --store "$S" --host final --raw "$W/final.raw" >/dev/null
  mkdir -p "$W/casync"
  casync make --store="$W/casync/store.castr" "$W/casync/final.caibx" "$W/final.raw" >/dev/null
  rm -f "$W/final.raw"

  local link w0 t0 t full stopt ca verify
  local -A fb
  for link in "${links[@]}"; do
    serve "$link"
    log "### $link"
    # failback with each --verify: what it wrote read back after cutover (the default), the
    # whole target, or only the final delta (checked inside the cutover window in every mode)
    for verify in written full delta; do
      cp --sparse=always "$BASE" "$W/server.raw"
      vm_up fb-a
      cold; w0=$(wire); t0=$(now)
      "$R" failback --json --from "$URL" --vm fb-a --target "$W/server.raw" --pubkey "$S/pubkey" \
          --stop-timeout "$STOP_TIMEOUT" --verify "$verify" >"$W/fb-$verify-$link.json"
      fb[$verify]=$(secs "$t0"); w=$(( $(wire) - w0 ))
      python3 - "$W/fb-$verify-$link.json" "$S/private/failover/fb-a/state.json" "${fb[$verify]}" "$w" "$used" "$verify" <<'EOF' | tee -a "$W/results.txt"
import json, sys
r, st, used = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), int(sys.argv[5])
ap = {x["round"]: x for x in st["rounds"]}
print(f"failback --verify {sys.argv[6]}: wall {sys.argv[3]}s (restorer {r['total_seconds']:.2f}s, of which the "
      f"after-cutover verify {r['verify_seconds']:.2f}s for {r['verified_slots']} slots), fetched {r['total_bytes_fetched']} bytes, link counter "
      f"{sys.argv[4]} bytes, cutover window {r['cutover_window_seconds']:.2f}s")
for x in r["rounds"]:
    a = ap[x["round"]]
    print(f"   round {x['round']}{' final' if x['final'] else ''}: {x['slots_considered']} slots, "
          f"{x['slots_hashed']} hashed ({x['bytes_hashed']} bytes), {x['slots_written']} written, "
          f"{x['bytes_fetched']} bytes fetched, {x['seconds']:.2f}s (appliance: "
          f"{a['changed_slots']} changed slots, {a['changed_stored_bytes']} stored bytes, "
          f"{a['seconds']:.2f}s)")
x = r["rounds"][0]
local = x["seconds"] - ap[x["round"]]["seconds"]
print(f"   round {x['round']} without the appliance's part: {local:.2f}s to hash {x['bytes_hashed']} bytes "
      f"({used} of them data: {used / local / 1e6:.0f} MB/s) while {x['bytes_fetched']} bytes were "
      f"fetched and written")
EOF
    done
    if [ "$link" = loopback ]; then
      # The local hashing rate against the disk's read speed, HASH_REPEAT times alternately:
      # dd of the used data (buffered reads, as the restorer reads a file), then a failback again
      # onto the now exact target: the VM is failed back, so its final round is applied as a full
      # comparison that fetches nothing.
      for _ in $(seq "$HASH_REPEAT"); do
        cold; t0=$(now)
        for k in $runs; do
          dd if="$W/server.raw" of=/dev/null bs=4M skip=$((k * 16)) count=16 status=none
        done
        t=$(secs "$t0")
        log "dd of the used data ($used bytes, cold cache): ${t}s = $(python3 -c "print(f'{$used / $t / 1e6:.0f}')") MB/s"
        cold; t0=$(now)
        "$R" failback --json --from "$URL" --vm fb-a --target "$W/server.raw" --pubkey "$S/pubkey" \
            --verify delta >"$W/hash.json"
        t=$(secs "$t0")
        python3 - "$W/hash.json" "$used" "$t" <<'EOF' | tee -a "$W/results.txt"
import json, sys
r, used = json.load(open(sys.argv[1])), int(sys.argv[2])
x = r["rounds"][0]
print(f"hash-only failback (exact target): wall {sys.argv[3]}s, round {x['seconds']:.2f}s, "
      f"{x['slots_hashed']} slots hashed ({x['bytes_hashed']} bytes), {x['bytes_fetched']} bytes "
      f"fetched, {x['slots_written']} written; used data {used} bytes -> "
      f"{used / x['seconds'] / 1e6:.0f} MB/s of used data")
EOF
      done
    fi
    # Failing back by a full restore instead: the VM is stopped first (until it is, its writes go
    # on, and a disk restored from before them would lose them), with the same --stop-timeout the
    # failbacks had, then its final disk is restored onto a blank file. That disk was ingested
    # beforehand, untimed: the full restore is not charged the freeze each failback pays.
    vm_up fb-a
    t0=$(now)
    "$A" failover stop --store "$S" --name fb-a --timeout "$STOP_TIMEOUT" >/dev/null
    stopt=$(secs "$t0")
    rm -f "$W/blank.raw"; truncate -s "$size" "$W/blank.raw"
    cold; w0=$(wire); t0=$(now)
    "$R" restore --from "$URL" --host final --target "$W/blank.raw" --pubkey "$S/pubkey" --json \
        >"$W/full-$link.json"
    full=$(secs "$t0"); w=$(( $(wire) - w0 ))
    log "full restore: wall ${full}s, fetched $(jq1 "$W/full-$link.json" 'sum(x["fetched_bytes"] for x in d["disks"])') bytes, link counter $w bytes; the VM's stop before it: ${stopt}s"
    rm -f "$W/blank.raw"
    # casync extract with the server's original disk as seed
    cp --sparse=always "$BASE" "$W/seed.raw"; rm -f "$W/casync-out.raw"
    cold; w0=$(wire); t0=$(now)
    casync extract --seed="$W/seed.raw" --store="$CAURL/store.castr" "$CAURL/final.caibx" \
        "$W/casync-out.raw" 2>"$W/casync.log"
    ca=$(secs "$t0"); w=$(( $(wire) - w0 ))
    log "casync extract --seed: wall ${ca}s, link counter $w bytes"
    rm -f "$W/casync-out.raw" "$W/seed.raw"
    log "failback / full restore time: $(python3 -c "print(f'{${fb[written]} / $full:.3f} (--verify written, the default), {${fb[full]} / $full:.3f} (full), {${fb[delta]} / $full:.3f} (delta)')")"
    log "failback / (VM stop + full restore) time: $(python3 -c "s = $stopt + $full; print(f'{${fb[written]} / s:.3f} (--verify written, the default), {${fb[full]} / s:.3f} (full), {${fb[delta]} / s:.3f} (delta)')")"
    stop_servers
  done
  "$A" failover delete --force --store "$S" --name fb-a >/dev/null
  rm -rf "$W/casync" "$W/server.raw"
}

part_b() {
  local g size link off out gport
  for g in $CUT_SIZES; do
    size=$((g << 30))
    log ""
    log "## Part B: cutover window, ${g} GiB disk, ${CUT_USED_PCT}% data, ${DELTA_MIB} MiB final delta, --stop-timeout $STOP_TIMEOUT"
    python3 "$PY" mkdisk "$W/source.raw" "$size" "$CUT_USED_PCT" >/dev/null
    "$A" ingest --store "$S" --host "cut$g" --raw "$W/source.raw" >/dev/null
    rm -f "$W/source.raw"
    new_vm "fb-cut$g" "cut$g"
    cp --sparse=always "$BASE" "$W/cut.raw"
    for link in "${links[@]}"; do
      serve "$link"
      vm_up "fb-cut$g"
      head -c $((DELTA_MIB << 20)) /dev/urandom > "$W/delta.bin"   # fresh data: nothing dedupes
      off=$(( (RANDOM * 32768 + RANDOM) % ((size - (DELTA_MIB << 20)) >> 22) << 22 ))
      gport=$((20000 + RANDOM % 20000)); rm -f "$W/gate.json"
      python3 "$PY" gate "$gport" "${URL%/store}/api/v1" "$QMP" "$off" $((DELTA_MIB << 20)) \
          "$W/delta.bin" "$W/gate.json" & pids+=($!)
      for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$gport/" && break; sleep 0.1; done
      cold
      "$R" failback --json --from "$URL" --api "http://127.0.0.1:$gport/api/v1" --vm "fb-cut$g" \
          --target "$W/cut.raw" --pubkey "$S/pubkey" --max-rounds 1 --stop-timeout "$STOP_TIMEOUT" \
          --verify delta >"$W/cut-$g-$link.json"
      out=$(cat "$W/gate.json")
      python3 - "$W/cut-$g-$link.json" "$S/private/failover/fb-cut$g/state.json" "$out" "$link" <<'EOF' | tee -a "$W/results.txt"
import json, sys
r, st, w = json.load(open(sys.argv[1])), json.load(open(sys.argv[2])), json.loads(sys.argv[3])
fin = r["rounds"][-1]
a = [x for x in st["rounds"] if x["round"] == fin["round"]][0]
req = st["cutover_requested_ms"]
order = "before" if req >= w["write_done_ms"] else "AFTER (the window includes part of it)"
last = w["answers"][-1]
print(f"{sys.argv[4]}: cutover window {r['cutover_window_seconds']:.2f}s; final round "
      f"{fin['round']}: {a['changed_slots']} changed slots, {a['changed_stored_bytes']} stored bytes, "
      f"appliance {a['seconds']:.2f}s (incl. the VM's stop: {last.get('vm_stop')}); restorer fetched {fin['bytes_fetched']} "
      f"bytes, wrote {fin['slots_written']} slots; the delta write ({w['write_seconds']:.2f}s, after "
      f"round {w['round']} was published) ended {abs(req - w['write_done_ms']) / 1000:.2f}s {order} "
      f"the cutover request")
EOF
      stop_servers
    done
    "$A" failover delete --force --store "$S" --name "fb-cut$g" >/dev/null
    rm -f "$W/cut.raw" "$W/delta.bin"
  done
}

case $PARTS in *A*) part_a ;; esac
case $PARTS in *B*) part_b ;; esac
log ""
log "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo "results in $W/results.txt"
