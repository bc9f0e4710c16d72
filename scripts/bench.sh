#!/usr/bin/env bash
# kiln's benchmarks, each beside an anchor measured in the same run (docs/BENCHMARKS.md):
#   ledger: reserve+commit pairs per second vs pgbench -N (simple-update) TPS, same server, same
#           clients, runs interleaved;
#   assets: the 2000 px master and whole kits from a 4000x4000 JPEG vs vipsthumbnail making a
#           2000 px thumbnail of the same file, all pinned to one core;
#   queue:  reserve+enqueue transactions per second vs pgbench -N, idle pickup latency over
#           sequential jobs, and queue + ledger overhead as a share of an Essentials kit;
#   http:   `kiln serve` on PostgreSQL loaded by wrk from a second process on loopback: job
#           status polls and kit submissions per second with p50/p99, vs a trivial axum handler
#           (the HTTP ceiling) and pgbench -S (the database ceiling), same clients, interleaved;
#   cutout: kiln's learned cut-out vs rembg (U²-Net-p through onnxruntime, PyPI) on the rendered
#           test photos at phone resolution, both on one core: time and IoU with the truth.
# BENCH=ledger, BENCH=assets, BENCH=queue, BENCH=http or BENCH=cutout runs one of them. Prints
# Markdown tables.
set -euo pipefail
cd "$(dirname "$0")/.."
which=${BENCH:-all}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'; }

if [ "$which" = all ] || [ "$which" = assets ]; then
    if ! command -v vipsthumbnail >/dev/null; then
        echo "bench: installing libvips-tools for vipsthumbnail" >&2
        if [ "$(id -u)" = 0 ]; then apt-get install -y -qq libvips-tools >/dev/null; else sudo apt-get install -y -qq libvips-tools >/dev/null; fi
    fi
    cargo build -q --release -p kiln-assets --example kit_bench
    out=$(realpath -m "${CARGO_TARGET_DIR:-target}/kit-bench")
    runs=${BENCH_RUNS:-5}
    results=$(taskset -c 0 "${CARGO_TARGET_DIR:-target}/release/examples/kit_bench" "$out" "$runs")
    vips=()
    for _ in $(seq 1 "$runs"); do
        t0=$(date +%s%N)
        VIPS_CONCURRENCY=1 taskset -c 0 vipsthumbnail "$out/upload.jpg" -s 2000 -o "$out/vips.jpg[Q=92]"
        vips+=("$(( ($(date +%s%N) - t0) / 1000 ))")
    done
    m_vips=$(printf '%s\n' "${vips[@]}" | median | awk '{ printf "%.1f", $1 / 1000 }')
    get() { printf '%s\n' "$results" | awk -v k="$1" '$1 == k { print $2 }'; }
    cat <<MD

| 4000x4000 JPEG upload, one core, median of $runs | ms | vs vipsthumbnail -s 2000 |
|---|---|---|
| vipsthumbnail -s 2000 (whole process) | $m_vips | 1.00 |
| kiln decode alone | $(get decode) | $(ratio "$(get decode)" "$m_vips") |
| kiln cut-out model alone (U²-Net-p, 320x320) | $(get model) | $(ratio "$(get model)" "$m_vips") |
| kiln 2000x2000 master (decode, cut-out, place on white, encode) | $(get master) | $(ratio "$(get master)" "$m_vips") |
| kiln Essentials kit | $(get essentials) | $(ratio "$(get essentials)" "$m_vips") |
| kiln Caratzon kit | $(get caratzon) | $(ratio "$(get caratzon)" "$m_vips") |
MD
fi
if [ "$which" = all ] || [ "$which" = cutout ]; then
    cargo build -q --release -p kiln-assets --example cutout_eval
    py=$(scripts/ensure-rembg.sh)
    out=$(realpath -m "${CARGO_TARGET_DIR:-target}/cutout-bench")
    runs=${BENCH_RUNS:-3}
    kiln=$(taskset -c 0 "${CARGO_TARGET_DIR:-target}/release/examples/cutout_eval" "$out" 1 "$runs")
    names=$(awk '$2 == "learned" { print $1 }' <<<"$kiln")
    # shellcheck disable=SC2086
    anchor=$(OMP_NUM_THREADS=1 taskset -c 0 "$py" scripts/cutout_anchor.py "$out" "$runs" $names)
    echo
    echo "| photo (phone resolution, one core, median of $runs) | kiln learned: IoU / transparent / ms | rembg u2netp: IoU / transparent / ms | kiln time vs rembg |"
    echo "|---|---|---|---|"
    for n in $names; do
        read -r ki kt km < <(awk -v n="$n" '$1 == n && $2 == "learned" { print $3, $4, $6 }' <<<"$kiln")
        read -r ri rt rm < <(awk -v n="$n" '$1 == n { print $3, $4, $5 }' <<<"$anchor")
        echo "| $n | $ki / $kt / $km | $ri / $rt / $rm | $(ratio "$km" "$rm") |"
    done
    awk '$2 == "learned" { i += $3; t += $6; n++ } END { printf "| mean | IoU %.4f, %.0f ms |", i / n, t / n }' <<<"$kiln"
    awk '{ i += $3; t += $5; n++ } END { printf " IoU %.4f, %.0f ms | |\n", i / n, t / n }' <<<"$anchor"
    echo
    echo "(colour-only cut-out, for reference: $(awk '$2 == "colour" { printf "%s IoU %s, %s ms; ", $1, $3, $6 }' <<<"$kiln"))"
fi
if [ "$which" = all ] || [ "$which" = ledger ] || [ "$which" = queue ] || [ "$which" = http ]; then

clients=${BENCH_CLIENTS:-8}
seconds=${BENCH_SECONDS:-5}
runs=${BENCH_RUNS:-5}
admin=${KILN_TEST_PG_URL:-postgres://postgres:postgres@127.0.0.1:5432/postgres}
root=${admin%/*}

command -v pgbench >/dev/null || { echo "pgbench is missing (Debian: postgresql-contrib / postgresql-client)"; exit 1; }
recreate() { psql "$admin" -qc "DROP DATABASE IF EXISTS $1 WITH (FORCE)" -c "CREATE DATABASE $1" >/dev/null; }
recreate kiln_bench_pgbench
pgbench -q -i -s "$clients" "$root/kiln_bench_pgbench" >/dev/null 2>&1
pgbench_tps() {
    pgbench -n -N -c "$clients" -j "$clients" -T "$seconds" "$root/kiln_bench_pgbench" 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
fi

if [ "$which" = all ] || [ "$which" = ledger ]; then
cargo build -q --release -p kiln-ledger --example ledger_bench
bench_bin=${CARGO_TARGET_DIR:-target}/release/examples/ledger_bench

kiln_own=() kiln_shared=() pg=()
for i in $(seq 1 "$runs"); do
    recreate kiln_bench_ledger
    kiln_own+=("$("$bench_bin" "$root/kiln_bench_ledger" "$clients" "$seconds")")
    recreate kiln_bench_ledger
    kiln_shared+=("$("$bench_bin" "$root/kiln_bench_ledger" "$clients" "$seconds" shared)")
    pg+=("$(pgbench_tps)")
    echo "run $i: kiln ${kiln_own[-1]} pairs/s (own accounts), ${kiln_shared[-1]} (one account); pgbench -N ${pg[-1]} tps" >&2
done
psql "$admin" -qc "DROP DATABASE IF EXISTS kiln_bench_ledger WITH (FORCE)" >/dev/null

m_own=$(printf '%s\n' "${kiln_own[@]}" | median)
m_shared=$(printf '%s\n' "${kiln_shared[@]}" | median)
m_pg=$(printf '%s\n' "${pg[@]}" | median)
cat <<MD

| measure ($clients clients, ${seconds}s x $runs runs, median) | per second | vs pgbench -N |
|---|---|---|
| pgbench -N (simple-update) transactions | $m_pg | 1.00 |
| kiln reserve+commit pairs, one account per client | $m_own | $(ratio "$m_own" "$m_pg") |
| kiln reserve+commit pairs, all clients on one account | $m_shared | $(ratio "$m_shared" "$m_pg") |
MD
fi

if [ "$which" = all ] || [ "$which" = queue ]; then
cargo build -q --release -p kit-worker --example queue_bench
qbin=${CARGO_TARGET_DIR:-target}/release/examples/queue_bench
enq=() pg=() ratios=()
for i in $(seq 1 "$runs"); do
    recreate kiln_bench_queue
    enq+=("$("$qbin" "$root/kiln_bench_queue" enqueue "$clients" "$seconds")")
    pg+=("$(pgbench_tps)")
    ratios+=("$(ratio "${enq[-1]}" "${pg[-1]}")")
    echo "run $i: reserve+enqueue ${enq[-1]} tx/s; pgbench -N ${pg[-1]} tps; ratio ${ratios[-1]}" >&2
done
recreate kiln_bench_queue
pickup_jobs=${BENCH_PICKUP_JOBS:-1000}
read -r p50 p99 < <("$qbin" "$root/kiln_bench_queue" pickup "$pickup_jobs")
recreate kiln_bench_queue
kits=${BENCH_KITS:-21}
read -r e2e gen pub over share < <("$qbin" "$root/kiln_bench_queue" overhead "$kits")
psql "$admin" -qc "DROP DATABASE IF EXISTS kiln_bench_queue WITH (FORCE)" >/dev/null
m_enq=$(printf '%s\n' "${enq[@]}" | median)
m_pg=$(printf '%s\n' "${pg[@]}" | median)
m_ratio=$(printf '%s\n' "${ratios[@]}" | median)
min_ratio=$(printf '%s\n' "${ratios[@]}" | sort -g | head -1)
cat <<MD

| queue ($clients clients, ${seconds}s x $runs runs) | value | vs anchor |
|---|---|---|
| pgbench -N (simple-update) transactions per second, median | $m_pg | 1.00 |
| reserve + enqueue per second (one guarded statement: hold, kit_jobs row, apalis task; wake-up after commit), median | $m_enq | $m_ratio (median of same-run ratios; lowest $min_ratio; goal >= 0.5) |
| idle pickup, enqueue start -> claim, $pickup_jobs sequential jobs: p50 / p99 | $p50 ms / $p99 ms | goal < 10 / < 50 ms |
| Essentials kit through the queue, end to end (median of $kits) | $e2e ms | 1.00 |
| the same kit rendered directly / its files published directly (reference) | $gen ms / $pub ms | |
| queue + ledger overhead per kit (end to end less the worker's own render and writes), median | $over ms | $(awk -v s="$share" 'BEGIN { printf "%.1f%%", s * 100 }') of the kit (goal < 5%) |
MD
fi
if [ "$which" = all ] || [ "$which" = http ]; then
if ! command -v wrk >/dev/null; then
    echo "bench: installing wrk" >&2
    if [ "$(id -u)" = 0 ]; then apt-get install -y -qq wrk >/dev/null; else sudo apt-get install -y -qq wrk >/dev/null; fi
fi
cargo build -q --release -p kiln --bin kiln --example http_bench
rel=${CARGO_TARGET_DIR:-target}/release
work=$(mktemp -d)
pids=()
cleanup_http() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup_http EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do curl -sf "http://127.0.0.1:$1/$2" >/dev/null && return 0; sleep 0.05; done; echo "bench: nothing answers on port $1" >&2; exit 1; }
recreate kiln_bench_http
export KILN_DATABASE_URL="$root/kiln_bench_http" KILN_STORAGE="$work/objects"
export KILN_SUBMIT_BURST=100000000 KILN_SUBMIT_PER_MINUTE=100000000
"$rel/kiln" migrate >/dev/null
admin_key=$("$rel/kiln" --json accounts create --plan atelier --admin | python3 -c 'import json,sys; print(json.load(sys.stdin)["api_key"])')
read -r member member_key < <("$rel/kiln" --json accounts create --plan atelier | python3 -c 'import json,sys; a=json.load(sys.stdin); print(a["id"], a["api_key"])')
kport=$(free_port); aport=$(free_port)
RUST_LOG=warn "$rel/kiln" serve --no-work --listen "127.0.0.1:$kport" 2>"$work/serve.log" & pids+=($!)
"$rel/examples/http_bench" anchor "127.0.0.1:$aport" & pids+=($!)
wait_port "$kport" healthz; wait_port "$aport" ""
curl -sf -X POST "http://127.0.0.1:$kport/v1/admin/accounts/$member/grants" -H "Authorization: Bearer $admin_key" \
    -H 'content-type: application/json' -d '{"credits": 1000000000, "reference": "bench"}' >/dev/null
design_px=${BENCH_DESIGN_PX:-1200}
"$rel/examples/http_bench" design "$work/design.jpg" "$design_px"
spec='{"style_number": "B-1", "name": "Bench Ring", "category": "ring"}'
job=$(curl -sf -X POST "http://127.0.0.1:$kport/v1/kits" -H "Authorization: Bearer $member_key" \
    -F "design=@$work/design.jpg;type=image/jpeg" -F "spec=$spec" -F kit=essentials \
    | python3 -c 'import json,sys; print(json.load(sys.stdin)["job"]["id"])')
# The multipart body wrk sends for each submission (no Idempotency-Key: each is a new order).
python3 - "$work/design.jpg" "$spec" "$work/order.body" <<'PY'
import sys
design, spec, out = open(sys.argv[1], "rb").read(), sys.argv[2].encode(), sys.argv[3]
b = b"kilnbench"
parts = [b"--" + b + b'\r\nContent-Disposition: form-data; name="spec"\r\n\r\n' + spec + b"\r\n",
         b"--" + b + b'\r\nContent-Disposition: form-data; name="kit"\r\n\r\nessentials\r\n',
         b"--" + b + b'\r\nContent-Disposition: form-data; name="design"; filename="d.jpg"\r\nContent-Type: image/jpeg\r\n\r\n' + design + b"\r\n",
         b"--" + b + b"--\r\n"]
open(out, "wb").write(b"".join(parts))
PY
cat >"$work/order.lua" <<LUA
wrk.method = "POST"
local f = io.open("$work/order.body", "rb"); wrk.body = f:read("*a"); f:close()
wrk.headers["Content-Type"] = "multipart/form-data; boundary=kilnbench"
wrk.headers["Authorization"] = "Bearer $member_key"
LUA
# wrk's requests/s, p50 and p99 in ms; refuses a run with any non-2xx answer or socket error.
load() {
    local out
    out=$(wrk -t2 -c"$clients" -d"${seconds}s" --latency "$@")
    if grep -qE 'Non-2xx|Socket errors' <<<"$out"; then echo "bench: wrk saw failures:" >&2; echo "$out" >&2; exit 1; fi
    awk 'function ms(v) { if (v ~ /us$/) return v / 1000; if (v ~ /ms$/) return v + 0; if (v ~ /s$/) return v * 1000; return v }
         $1 == "50%" { p50 = ms($2) } $1 == "99%" { p99 = ms($2) } $1 == "Requests/sec:" { rps = $2 }
         END { printf "%.0f %.2f %.2f\n", rps, p50, p99 }' <<<"$out"
}
pgbench_select() {
    pgbench -n -S -c "$clients" -j "$clients" -T "$seconds" "$root/kiln_bench_pgbench" 2>/dev/null \
        | sed -n 's/^tps = \([0-9.]*\).*/\1/p'
}
anc=() anc50=() anc99=() sel=() pol=() pol50=() pol99=() sub=() sub50=() sub99=() ratios=()
for i in $(seq 1 "$runs"); do
    read -r r a b < <(load "http://127.0.0.1:$aport/"); anc+=("$r") anc50+=("$a") anc99+=("$b")
    sel+=("$(pgbench_select)")
    read -r r a b < <(load -H "Authorization: Bearer $member_key" "http://127.0.0.1:$kport/v1/jobs/$job"); pol+=("$r") pol50+=("$a") pol99+=("$b")
    read -r r a b < <(load -s "$work/order.lua" "http://127.0.0.1:$kport/v1/kits"); sub+=("$r") sub50+=("$a") sub99+=("$b")
    lower=$(awk -v a="${anc[-1]}" -v b="${sel[-1]}" 'BEGIN { print (a < b) ? a : b }')
    ratios+=("$(ratio "${pol[-1]}" "$lower")")
    echo "run $i: axum ${anc[-1]}/s; pgbench -S ${sel[-1]} tps; polls ${pol[-1]}/s (p99 ${pol99[-1]} ms, ${ratios[-1]}x the lower ceiling); submissions ${sub[-1]}/s (p99 ${sub99[-1]} ms)" >&2
done
med() { printf '%s\n' "$@" | median; }
m_anc=$(med "${anc[@]}"); m_sel=$(med "${sel[@]}"); m_pol=$(med "${pol[@]}"); m_sub=$(med "${sub[@]}")
cat <<MD

| HTTP on loopback, wrk -t2 -c$clients, ${seconds}s x $runs runs, median | per second | p50 ms | p99 ms | vs the lower ceiling |
|---|---|---|---|---|
| trivial axum handler (HTTP ceiling) | $m_anc | $(med "${anc50[@]}") | $(med "${anc99[@]}") | |
| pgbench -S, $clients clients (database ceiling) | $m_sel | | | |
| job status polls, GET /v1/jobs/{id} (API key + job read) | $m_pol | $(med "${pol50[@]}") | $(med "${pol99[@]}") | $(med "${ratios[@]}") (median of same-run ratios; goal >= 0.5, p99 < 20 ms) |
| kit submissions, POST /v1/kits (${design_px} px JPEG decoded, stored, reserve + enqueue) | $m_sub | $(med "${sub50[@]}") | $(med "${sub99[@]}") | |
MD
cleanup_http; trap - EXIT
psql "$admin" -qc "DROP DATABASE IF EXISTS kiln_bench_http WITH (FORCE)" >/dev/null
fi
# Only the database sections made it (BENCH=assets or BENCH=cutout set no $admin).
if [ -n "${admin:-}" ]; then
    psql "$admin" -qc "DROP DATABASE IF EXISTS kiln_bench_pgbench WITH (FORCE)" >/dev/null 2>&1 || true
fi
