#!/usr/bin/env bash
# The whole story on the embedded digits benchmark, offline, on a CPU, in one command:
# fit a small diffusion pipeline on the ID digits, generate synthetic ID images (SIO) and latent-space
# outliers (OAL), train baseline / SIO / OAL with 3 seeds each, evaluate, print one comparison table.
# After fit and the baseline, two lanes run side by side (SIO images + SIO training | OAL outliers + OAL
# training), each on half the cores with its output in WORKDIR/logs; then the evaluation.
#
#   bash quickstart.sh [WORKDIR]        (default ./quickstart; finished steps are skipped on a rerun,
#                                         so a rerun into a finished folder only prints the table again)
#   QUICK=1 bash quickstart.sh DIR      (tiny settings: what test_smoke.py runs to keep this working)
set -euo pipefail
cd "$(dirname "$0")"
work=${1:-quickstart}
py=${PYTHON:-python}
seeds="0,1,2"  # each trainer takes all seeds in one process (one start-up instead of three)
if [ "${QUICK:-0}" = 1 ]; then
  fit="--steps 20 --vae-steps 10 --batch-size 64 --check-per-class 2"
  sio="--per-class 6 --steps 2"
  oal="--iterations 2 --samples-per-iteration 2 --steps 2 --features-per-class 40 --knn-k 10 --knn-draws 50 --boundary 5 --repeats 2"
  n_epochs=2
  seeds="0,1"
else
  fit=""
  sio="--per-class 200 --batch-size 120"  # 120 images per pipeline call: 2x the images/s of 16 on a CPU
  oal="--iterations 30 --steps 25 --batch-size 48"  # 16 iterations of 3 images per pipeline call
  n_epochs=30  # the digits recipe of both trainers, spelled out so a finished run can be recognised
fi
epochs="--epochs $n_epochs --resume"  # --resume: an interrupted run continues where it stopped (a new one starts at epoch 1)

stage_times=$(mktemp) lane_times="" lane_pids=""
stage() {  # stage NAME COMMAND...: run it and note its wall time for the table at the end (in a lane: its output to $work/logs/NAME.log)
  local name=$1 start=$(date +%s.%N) file=$stage_times note="" log; shift
  if [ -n "${lane:-}" ]; then
    file=$lane_file note="  (lane $lane)" log="$work/logs/${name%% *}.log"  # "sio 0,1,2" -> logs/sio.log
    mkdir -p "$work/logs"
    echo "lane $lane: $name (output in $log)"
    "$@" > "$log" 2>&1 || { echo "quickstart: $name failed (lane $lane); the end of $log:" >&2; tail -n 15 "$log" >&2; exit 1; }
  else
    "$@"
  fi
  awk -v n="$name" -v a="$start" -v b="$(date +%s.%N)" -v s="$note" 'BEGIN { printf "%-14s %7.1f s%s\n", n, b - a, s }' >> "$file"
}
# two lanes at once, each with half the threads (OMP_NUM_THREADS, else the cores): the small models here run only ~20%
# faster on a second core, so two one-thread processes get ~1.6x the work done. lanes 1 2 runs the functions lane1 and
# lane2 and fails as soon as either fails
lanes() {
  local n start=$(date +%s.%N) threads=$(( ${OMP_NUM_THREADS:-$(getconf _NPROCESSORS_ONLN 2>/dev/null || echo 2)} / 2 ))
  [ "$threads" -ge 1 ] || threads=1
  for n in "$@"; do
    lane_file=$(mktemp) lane_times="$lane_times $lane_file"
    (lane=$n OMP_NUM_THREADS=$threads; export OMP_NUM_THREADS; "lane$n") &
    lane_pids="$lane_pids $!"
  done
  local left=$lane_pids pid
  while [ -n "${left// }" ]; do
    for pid in $left; do
      if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" || { stop_lanes; exit 1; }
        left=${left/ $pid/}
      fi
    done
    sleep 0.2
  done
  lane_pids=""
  if [ -n "$(cat $lane_times)" ]; then
    cat $lane_times >> "$stage_times"
    awk -v a="$start" -v b="$(date +%s.%N)" -v t="$threads" 'BEGIN { printf "%-14s %7.1f s  (lanes side by side, %d thread(s) each)\n", "lanes", b - a, t }' >> "$stage_times"
  fi
}
stop_lanes() { local pid; for pid in $lane_pids; do pkill -TERM -P "$pid" 2>/dev/null; kill -TERM "$pid" 2>/dev/null; done; lane_pids=""; }
trap 'stop_lanes; rm -f "$stage_times" $lane_times' EXIT
trap 'exit 130' INT TERM
total_start=$(date +%s.%N)

complete() { [ -f "$1/manifest.json" ] && grep -q '"complete": true' "$1/manifest.json"; }  # a finished set or pipeline
finished() { [ -f "$work/runs/$1/log.jsonl" ] && tail -n 1 "$work/runs/$1/log.jsonl" | grep -q "^{\"epoch\": $n_epochs,"; }
all_finished() { local s; for s in ${seeds//,/ }; do finished "$1_s$s" || return 1; done; }  # all_finished ce: runs ce_s0, ce_s1, ...

complete "$work/pipeline" || stage fit $py generate.py fit --dataset digits --out "$work/pipeline" $fit
all_finished ce || stage "ce $seeds" $py train_sio.py --dataset digits --seed "$seeds" --out "$work/runs/ce_s{seed}" $epochs
lane1() {  # SIO
  complete "$work/sio_samples" || stage sio-images $py generate.py sio --pipeline "$work/pipeline" --dataset digits --out "$work/sio_samples" $sio
  all_finished sio || stage "sio $seeds" $py train_sio.py --dataset digits --synthetic "$work/sio_samples" --seed "$seeds" --out "$work/runs/sio_s{seed}" $epochs
}
lane2() {  # OAL, with the seed-0 baseline as its teacher
  complete "$work/outliers" || stage oal-outliers $py generate.py oal --pipeline "$work/pipeline" --teacher "$work/runs/ce_s0" --dataset digits \
    --out "$work/outliers" $oal
  all_finished oal || stage "oal $seeds" $py train_oal.py --dataset digits --teacher "$work/runs/ce_s0" --init "$work/runs/ce_s{seed}" \
    --outliers "$work/outliers" --seed "$seeds" --out "$work/runs/oal_s{seed}" $epochs
}
lanes 1 2
runs() { local out=""; for s in ${seeds//,/ }; do out="$out,$work/runs/$1_s$s"; done; echo "${out#,}"; }
# evaluated again only when a stage ran now or the last evaluation did not finish (a rerun into a finished folder: no process at all)
if [ -s "$stage_times" ] || ! [ -f "$work/results/results.json" ] || ! grep -q '^## comparison' "$work/evaluate.log" 2>/dev/null; then
  stage evaluate $py evaluate.py "baseline=$(runs ce)" "sio=$(runs sio)" "oal=$(runs oal)" --detectors msp,ebo,knn --out "$work/results" \
    --cache "$work/cache" --overwrite > "$work/evaluate.log"
fi
sed -n '/^## comparison/,$p' "$work/evaluate.log"
printf '\nwall time per stage:\n'
cat "$stage_times"
awk -v a="$total_start" -v b="$(date +%s.%N)" 'BEGIN { printf "%-14s %7.1f s\n", "total", b - a }'
