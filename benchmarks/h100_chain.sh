#!/usr/bin/env bash
# The H100 runs behind benchmarks/results/, as steps that can be split over device calls on one machine (each call
# starts a step only if the previous ones left their output on this machine, else it redoes them). Run from the
# repository root with `.device/` carried (see gpu_session.sh); results go to $OUT.
#   bash benchmarks/h100_chain.sh build profile validate    # first call
#   bash benchmarks/h100_chain.sh bench512 bench2048         # next call, at once (the machine stays 30 s)
set -uo pipefail
W=/tmp/oato
G="bash benchmarks/gpu_session.sh python3 -m oatoplan"
MODEL=$W/qwen2-7b.gguf
PROFILE=$W/h100.json
VRAM=${VRAM:-2.5GiB}
ensure_build() {
  if [ ! -d $W/site/llama_cpp ]; then
    bash benchmarks/gpu_session.sh start > $OUT/start.log 2>&1
    WAIT_S=420 bash benchmarks/gpu_session.sh wait > $OUT/wait.log 2>&1 || { tail -5 $OUT/wait.log; exit 1; }
    tail -1 $OUT/wait.log
  fi
}
ensure_profile() {
  ensure_build
  if [ ! -f $PROFILE ]; then
    timeout 150 $G profile --model $MODEL --out $PROFILE > $OUT/profile.log 2>&1; echo "profile rc=$?"
    tail -2 $OUT/profile.log; cp $PROFILE $OUT/h100.json
  fi
}
for step in "$@"; do
  case $step in
  build) ensure_build ;;
  profile) ensure_profile ;;
  validate)
    ensure_profile
    timeout 120 $G profile --validate $MODEL --profile $PROFILE --reps 3 --prompt 512 --gen 64 \
      --out $OUT/validate-pp512.json > $OUT/validate.log 2>&1; echo "validate rc=$?"; tail -7 $OUT/validate.log ;;
  bench*)
    ensure_profile
    n=${step#bench}
    timeout 280 $G bench $MODEL --vram $VRAM --profile $PROFILE --prompt $n --gen 128 --reps 3 \
      --out $OUT/bench-pp$n.json > $OUT/bench$n.log 2>&1; echo "bench $n rc=$?"; tail -11 $OUT/bench$n.log ;;
  esac
done
