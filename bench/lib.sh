# Shared helpers of the benchmarks: run a command under /usr/bin/time and keep one result row.
# Each row: name, wall s, user+sys CPU s, peak RSS MiB, bytes (stored or transferred).

RESULTS=()

# measure NAME CMD...: run CMD (a shell string) under GNU time; sets LAST_WALL etc.
measure() {
  local name=$1; shift
  local tf; tf=$(mktemp)
  sync
  echo 3 > /proc/sys/vm/drop_caches 2>/dev/null || true
  /usr/bin/time -f '%e %U %S %M' -o "$tf" bash -c "$*"
  read -r LAST_WALL u s LAST_RSS_KB < "$tf"
  LAST_CPU=$(echo "$u + $s" | bc)
  rm -f "$tf"
  echo "  $name: wall ${LAST_WALL}s cpu ${LAST_CPU}s peak $((LAST_RSS_KB / 1024)) MiB" >&2
}

# row NAME BYTES: record the last measurement with a byte figure.
row() {
  RESULTS+=("| $1 | $LAST_WALL | $LAST_CPU | $((LAST_RSS_KB / 1024)) | $(numfmt --to=iec-i --suffix=B "$2") ($2) |")
}

print_table() {
  echo "| tool | wall (s) | CPU (s) | peak RSS (MiB) | $1 |"
  echo "|---|---|---|---|---|"
  printf '%s\n' "${RESULTS[@]}"
}

# filebytes DIR: the bytes of the files under DIR (directories' own sizes left out).
filebytes() {
  find "$1" -type f -printf '%s\n' | awk '{s += $1} END {printf "%.0f\n", s}'
}
