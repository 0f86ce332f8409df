#!/usr/bin/env bash
# The H100 runs behind benchmarks/results/, as steps that can be split over device calls on one machine (each call
# starts a step only if the previous ones left their output on this machine, else it redoes them). Run from the
# repository root with `.device/` carried (see gpu_session.sh beside it); results go to $OUT; the work directory on
# the GPU machine is $OATO_WORK (default /tmp/oato), as in gpu_session.sh.
#   bash benchmarks/sessions/h100_chain.sh build profile validate    # first call
#   bash benchmarks/sessions/h100_chain.sh bench512 bench2048         # next call, at once (the machine stays 30 s)
# Steps: build (oatoplan's patched CUDA build), profile (with decode calibration), validate / validate2048,
# bench512 / bench2048, gputests (tests/gpu), fused (fused CPU ops and prefetching dot products on/off, two placements), hostmem / cpuhalf /
# cputrace (where the CPU half of a decode loses time), tests (the fused-ops and dot-product tests on this CPU),
# matvec (benchmarks/matvec_kernel.sh against the built libggml-cpu), gemma (real Gemma 3 270M, GPU vs CPU: the file
# travels in parts, appended to $W/gemma.part by earlier calls, see benchmarks/results/README.md).
# Mixture of experts (issue #18): moemodel (the full Qwen3-30B-A3B-shaped file, 17.3 GiB, from the header that
# `gpu_session.sh prepare` saved as .device/qwen3-30b-a3b.moeheader), moeprofile (profile run --model on it, to
# $W/h200-qwen3moe.json), moebench (bench at each of $MOE_VRAMS x $MOE_PROMPTS with tg128; one bench per pair,
# e.g. MOE_VRAMS=8GiB MOE_PROMPTS=512 for a single one; a pair already measured on this machine is skipped, so a
# call cut short resumes), moerouting (the routing spread of the full file).
# Weight streaming (issue #17): streamcheck (on/off identity and prefill, Gemma 3 270M and Qwen2-7B shapes, FFN of
# $CPU_FFN blocks on the host), streamsweep (2/3/6 slots, host blocks first or spread, against predictions); gputests
# runs tests/gpu/test_stream_gpu.py on both shapes. build + profile + gputests fit one call (about 390 s on the H200
# machine), bench2048 + bench512 the next (about 240 s).
# Segment KV cache (issue #21): segtests (tests/gpu/test_segment_kv_gpu.py), segattn (tests/gpu/
# test_segment_attention_gpu.py), segbenchN (bench at --ctx 32768, depth N), segoverflow (a chat past the plan's
# first segment), segfit (parallel completions of one 8k prompt that fit $VRAM of KV). attncopies: benchmarks/attn_copies.py (the profile's CPU attention from the caches?).
set -uo pipefail
W=${OATO_WORK:-/tmp/oato}
export OATO_WORK=$W OATOPLAN_CACHE=${OATOPLAN_CACHE:-$W/cache}
S="bash benchmarks/sessions/gpu_session.sh"
G="$S python3 -m oatoplan"
MODEL=$W/qwen2-7b.gguf
PROFILE=${PROFILE:-$W/h100.json}   # PROFILE=oatoplan/profiles/h100-qwen2-7b.json: bench with the shipped profile
VRAM=${VRAM:-2.5GiB}
MOE=$W/qwen3moe.gguf
MOE_PROFILE=${MOE_PROFILE:-$W/h200-qwen3moe.json}
MOE_VRAMS=${MOE_VRAMS:-8GiB 12GiB}
MOE_PROMPTS=${MOE_PROMPTS:-512 2048}
ensure_build() {
  if [ ! -d $W/site/llama_cpp ]; then
    $S start-patched > $OUT/start.log 2>&1
    WAIT_S=420 $S wait > $OUT/wait.log 2>&1 || { tail -5 $OUT/wait.log; exit 1; }
    tail -1 $OUT/wait.log
  fi
}
ensure_profile() {
  ensure_build
  if [ ! -f $PROFILE ]; then
    timeout 300 $G profile run --model $MODEL --out $PROFILE > $OUT/profile.log 2>&1; echo "profile rc=$?"
    tail -2 $OUT/profile.log; cp $PROFILE $OUT/$(basename $PROFILE)
    $G profile show $PROFILE 2>&1 | head -8
  fi
}
ensure_moe_model() {
  if [ ! -f $MOE ]; then
    [ -f .device/qwen3-30b-a3b.moeheader ] || { echo "no .device/qwen3-30b-a3b.moeheader: run gpu_session.sh prepare"; exit 1; }
    echo "moemodel: writing $MOE (17.3 GiB of random blocks)"; date
    timeout 400 $S python3 -m benchmarks.make_model .device/qwen3-30b-a3b.moeheader $MOE.part && mv $MOE.part $MOE \
      || { echo "moemodel failed"; exit 1; }
    date
  fi
  ls -la $MOE
}
ensure_moe_profile() {
  ensure_build; ensure_moe_model
  if [ ! -f $MOE_PROFILE ]; then
    echo "moeprofile: profile run --model $MOE"; date
    timeout 560 $G -v profile run --model $MOE --out $MOE_PROFILE > $OUT/moeprofile.log 2>&1; echo "moeprofile rc=$?"
    date; tail -3 $OUT/moeprofile.log
  fi
  [ -f $MOE_PROFILE ] && cp $MOE_PROFILE $OUT/ && $G profile show $MOE_PROFILE 2>&1 | head -8
}
for step in "$@"; do
  case $step in
  moemodel) ensure_moe_model ;;
  moeprofile) ensure_moe_profile ;;
  moerouting)
    ensure_build; ensure_moe_model
    timeout 300 $S python3 -m benchmarks.moe_routing $MOE --tokens 16 --tokens 512 --threads 16 \
      --out $OUT/moe-routing.json 2>&1 | grep -v "^llama\|^load\|^print_info" | tail -3 ;;
  moebench)
    ensure_moe_profile
    for vram in $MOE_VRAMS; do
      for n in $MOE_PROMPTS; do
        name=moe-bench-$vram-pp$n
        if [ -f $W/$name.json ]; then echo "$name: done before"; cp $W/$name.* $OUT/ 2>/dev/null; continue; fi
        echo "$name"; date
        timeout 540 $G bench $MOE --vram $vram --profile $MOE_PROFILE --prompt $n --gen 128 --reps 3 \
          --out $W/$name.json > $OUT/$name.log 2>&1; echo "$name rc=$?"
        cp $W/$name.* $OUT/ 2>/dev/null; tail -12 $OUT/$name.log
      done
    done ;;
  streamsplit)
    # weight streaming's fixed cost per streamed upload, measured; $W/h200-ss.json: the profile holding it
    ensure_profile; rm -f $W/h200-ss.json
    timeout 300 $S python3 -m benchmarks.stream_split $MODEL --profile $PROFILE --reps ${REPS:-10} \
      --out $OUT/stream-split.json --profile-out $W/h200-ss.json > $OUT/streamsplit.log 2>&1; echo "streamsplit rc=$?"
    grep -v "^llama\|^load\|^print_info" $OUT/streamsplit.log | tail -6; cp $W/h200-ss.json $OUT/ 2>/dev/null ;;
  rpcgpu|rpcgpu7b)
    # issue #19: an rpc-server serving this GPU on loopback beside it: Gemma 3 270M's shape (rpcgpu), the 7B (rpcgpu7b)
    ensure_profile
    spec="$W/gemma3-270m.gguf --prompt 128 --gen 32 --budget-mib 160"
    [ $step = rpcgpu7b ] && spec="$MODEL --prompt 512 --gen 64 --budget-mib ${RPC_BUDGET_MIB:-2560}"
    name=rpc-gpu-$(basename ${spec%% *} .gguf)
    timeout 400 $S python3 -m benchmarks.rpc_check $spec --gpu --profile $PROFILE --reps 3 --budget-s 0.1 \
      --out $OUT/$name.json > $OUT/$name.log 2>&1; echo "$name rc=$?"
    grep -v "^llama\|^load\|^print_info\|^\s*$" $OUT/$name.log | tail -12 ;;
  build) ensure_build ;;
  profile) ensure_profile ;;
  validate|validate2048)
    ensure_profile
    n=${step#validate}; n=${n:-512}
    timeout 150 $G profile validate $MODEL --profile $PROFILE --reps 3 --prompt $n --gen 64 \
      --out $OUT/validate-pp$n.json > $OUT/validate$n.log 2>&1; echo "validate $n rc=$?"; tail -7 $OUT/validate$n.log ;;
  fused)
    ensure_profile
    for placement in ffn-cpu layer-offload; do
      timeout 240 $S python3 -m benchmarks.fused_decode $MODEL --placement $placement \
        --profile $PROFILE --out $OUT/fused-$placement.json 2>&1 | tail -1
    done ;;
  streamcheck|streamsweep)
    # weight streaming on/off with FFN weights in pinned host memory: identical tokens, prefill of each, all-GPU;
    # streamsweep: the 7B with 2..8 slots, host blocks first or spread, against the cost model's prediction
    if [ $step = streamcheck ]; then ensure_build; specs=("$W/gemma3-270m.gguf --cpu-ffn 18 --gen 64" "$MODEL --cpu-ffn ${CPU_FFN:-18} --gen 32")
    else ensure_profile; specs=("$MODEL --cpu-ffn 18 --slots 2 3 6 --no-all-gpu" "$MODEL --cpu-ffn 18 --slots 2 3 6 --spread"); fi
    prof=""; [ -f $PROFILE ] && prof="--profile $PROFILE"
    for spec in "${specs[@]}"; do
      timeout 240 $S python3 -m benchmarks.stream_check $spec --ubatch ${UBATCH:-512} $prof \
        --prompt 512 2048 --out $OUT/stream-check.jsonl > $OUT/streamcheck.log 2>&1; echo "$step $spec rc=$?"
      grep -v '^{' $OUT/streamcheck.log | grep -iv "warn" | tail -4
    done
    python3 -c "import json, sys
for line in open(sys.argv[1]):
    d = json.loads(line); d.pop('tokens'); d.pop('command'); print({k: v for k, v in d.items() if not k.endswith('_s')})" \
      $OUT/stream-check.jsonl ;;
  gputests)
    ensure_build
    OATO_STREAM_TEST_MODELS=$W/gemma3-270m.gguf:$MODEL timeout ${GPUTESTS_S:-200} $S python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu \
      ${GPUTESTS_ARGS:-} > $OUT/gputests.log 2>&1
    echo "gputests rc=$?"; tail -3 $OUT/gputests.log ;;
  tests)
    ensure_build
    timeout 240 $S python3 -m pytest -q -p no:cacheprovider tests/test_fused.py \
      tests/test_matvec.py tests/test_trace.py > $OUT/tests.log 2>&1; echo "tests rc=$?"; tail -3 $OUT/tests.log ;;
  matvec)
    ensure_build
    LCPP_SRC=$W/llama-cpp-python-0.3.36/vendor/llama.cpp GGML_LIB=$W/site/llama_cpp/lib timeout 200 \
      bash benchmarks/matvec_kernel.sh 1.5 1,8,16 5 > $OUT/matvec-kernel.jsonl; echo "matvec rc=$?"
    python3 -c "import json, statistics, sys
for line in open(sys.argv[1]):
    d = json.loads(line)
    print(d if 'gbps' not in d else (d['kernel'], d['type'], d['threads'], round(statistics.median(d['gbps']), 1)))" \
      $OUT/matvec-kernel.jsonl ;;
  hostmem)
    timeout 120 python3 -m benchmarks.host_memory_read --out $OUT/host-memory-read.json 2>&1 | tail -4 ;;
  cpuhalf)
    ensure_profile
    for placement in ffn-cpu layer-offload; do
      for memory in pinned pageable pageable-repack; do
        timeout 100 $S python3 -m benchmarks.cpu_half_decode $MODEL --placement $placement \
          --memory $memory --profile $PROFILE --out $OUT/cpu-half-decode.jsonl 2>&1 | tail -1
      done
      OMP_WAIT_POLICY=active timeout 100 $S python3 -m benchmarks.cpu_half_decode $MODEL \
        --placement $placement --profile $PROFILE --out $OUT/cpu-half-decode.jsonl 2>&1 | tail -1
    done ;;
  cputrace)
    ensure_profile
    for placement in ffn-cpu layer-offload; do
      timeout 100 $S python3 -m benchmarks.cpu_half_decode $MODEL --placement $placement \
        --threads 16,8 --trace --profile $PROFILE --out $OUT/cpu-half-trace.jsonl 2>&1 | tail -1
    done
    OATO_CPU_MATVEC=ggml timeout 100 $S python3 -m benchmarks.cpu_half_decode \
      $MODEL --placement ffn-cpu --threads 16,8 --trace --profile $PROFILE --out $OUT/cpu-half-trace.jsonl \
      2>&1 | tail -1 ;;
  gemma)
    ensure_build
    echo "${GEMMA_SHA256:-none}  $W/gemma.part" | sha256sum -c - || exit 1
    mv $W/gemma.part $W/gemma3-270m-q4_k_m.gguf
    timeout 120 $S python3 -m benchmarks.gpu_patched_check $W/gemma3-270m-q4_k_m.gguf 32 \
      > $OUT/gemma-gpu-vs-cpu.json 2> $OUT/gemma.log; echo "gemma rc=$?"; cut -c1-600 $OUT/gemma-gpu-vs-cpu.json ;;
  segbench*)
    # issue #21: a chat at depth N in a context of 32768 (the user asked -c 32768), prompt 128, tg128
    ensure_profile
    d=${step#segbench}
    timeout 560 $G bench $MODEL --vram $VRAM --profile $PROFILE --ctx 32768 --depth $d --prompt 128 --gen 128 \
      --reps ${REPS:-3} --out $OUT/bench-ctx32768-depth$d.json > $OUT/segbench$d.log 2>&1; echo "segbench $d rc=$?"
    tail -8 $OUT/segbench$d.log ;;
  segoverflow)
    # issue #21: the depth-1024 plan's chat run on to 2048 and 4096 (past its first segment), against the stock cache
    ensure_profile
    timeout 500 $S python3 -m benchmarks.segment_overflow $MODEL --vram $VRAM --profile $PROFILE --ctx 32768 \
      --plan-depth 1024 --depths 1024 2048 4096 --out $OUT/segment-overflow.json > $OUT/segoverflow.log 2>&1
    echo "segoverflow rc=$?"; grep -v "^llama\|^load\|^print_info" $OUT/segoverflow.log | tail -10 ;;
  gemmapart)
    # the real Gemma 3 270M in parts (split -n 5 -d into gemma-parts/g0N.gguf, git-ignored), one carried per call
    for f in gemma-parts/g0*.gguf; do [ -f "$f" ] && cp "$f" $W/ && echo "carried $f"; done ;;
  segtests)
    # with all five parts on this machine: the real Gemma (its sha256 checked), else the shape-faithful stand-in
    ensure_build; real=$W/gemma-3-270m-q4_k_m.gguf
    if [ ! -f $real ] && [ -f $W/g04.gguf ]; then
      cat $W/g00.gguf $W/g01.gguf $W/g02.gguf $W/g03.gguf $W/g04.gguf > $real.part
      echo "${GEMMA_SHA256:-none}  $real.part" | sha256sum -c - && mv $real.part $real
    fi
    [ -f $real ] && export OATO_GEMMA_MODEL=$real || export OATO_GEMMA_MODEL=$W/gemma3-270m.gguf
    echo "segtests on $OATO_GEMMA_MODEL"
    OATO_STREAM_TEST_MODELS=$W/gemma3-270m.gguf:$MODEL timeout 200 $S python3 -m pytest -q -p no:cacheprovider -m gpu \
      tests/gpu/test_segment_kv_gpu.py > $OUT/segtests.log 2>&1; echo "segtests rc=$?"; tail -5 $OUT/segtests.log ;;
  segattn)
    # the CUDA flash attention nodes that write the log-sum-exp (patches/0009), and the segmented attention on CUDA0
    ensure_build
    timeout 200 $S python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_segment_attention_gpu.py \
      > $OUT/segattn.log 2>&1; echo "segattn rc=$?"; tail -5 $OUT/segattn.log ;;
  segfit)
    # issue #21: completions of one 8k prompt on the 7B shape, all on CUDA0: the sequences whose KV fits $VRAM, measured
    ensure_build
    timeout 400 $S python3 -m benchmarks.segment_kv_shared $MODEL --fit --gpu --budget $VRAM --threads 16 \
      --out $OUT/segment-kv-fit.json > $OUT/segfit.log 2>&1; echo "segfit rc=$?"
    grep -v "^llama\|^load\|^print_info" $OUT/segfit.log | grep "sequences\|{" | tail -8 ;;
  attncopies)
    # does the profile time CPU decode attention from the caches? (8 against 64 copies a graph)
    ensure_build
    timeout 120 $S python3 -m benchmarks.attn_copies --threads 16 --out $OUT/attn-copies.json 2>&1 | tail -4 ;;
  bench*)
    ensure_profile
    n=${step#bench}; n=${n%ttft}; objective=total; [ "$step" = "${step%ttft}" ] || objective=ttft
    timeout 280 $G bench $MODEL --vram $VRAM --profile $PROFILE --prompt $n --gen 128 --reps 3 --objective $objective \
      --out $OUT/bench-pp$n-$objective.json > $OUT/bench$n$objective.log 2>&1; echo "bench $n $objective rc=$?"
    tail -11 $OUT/bench$n$objective.log ;;
  esac
done
