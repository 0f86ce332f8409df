#!/usr/bin/env bash
# Stages of a GPU-machine session (device tool), each short enough for one call. Run from the repository root with
# `.device/` carried: lcpp.tar.xz (the trimmed llama-cpp-python 0.3.36 sdist, see gpu-workflow.md), whl/ (pure-Python
# wheels the machine lacks: gguf, diskcache, pytest...), *.header (model headers saved by benchmarks.make_model).
#   bash benchmarks/sessions/gpu_session.sh prepare # HERE (developer machine, venv active): fill .device/ (ignored)
#   bash benchmarks/sessions/gpu_session.sh start   # install wheels, start the CUDA build in the background, make
#                                                   # the models
#   bash benchmarks/sessions/gpu_session.sh wait    # wait for the build (up to WAIT_S seconds), install the wheel
#   bash benchmarks/sessions/gpu_session.sh SCRIPT  # any command afterwards, with the environment below
# OATO_WORK: the work directory on the GPU machine (default /tmp/oato): site-packages, the build, the models.
# `oatoplan build` runs there before llama-cpp-python is installed; oatoplan imports without it for that.
set -uo pipefail
REPO=$(pwd)
W=${OATO_WORK:-/tmp/oato}
export PYTHONPATH=$W/site:$REPO PYTHONUNBUFFERED=1
mkdir -p $W
case "${1:-}" in
prepare)
  grep -qx '/.device/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.device/' >> .git/info/exclude; }
  mkdir -p .device/whl && tmp=$(mktemp -d)
  # LCPP_SDIST: a llama_cpp_python-0.3.36.tar.gz you have; else pip fetches it, which takes 7+ minutes here because
  # pip prepares the sdist's metadata by running CMake
  if [ -n "${LCPP_SDIST:-}" ]; then cp "$LCPP_SDIST" "$tmp"/; else
    python -m pip download -q --no-deps --no-binary :all: -d "$tmp" llama-cpp-python==0.3.36 || exit 1; fi
  tar xzf "$tmp"/llama_cpp_python-0.3.36.tar.gz -C "$tmp"
  (cd "$tmp"/llama_cpp_python-0.3.36 && rm -rf .git vendor/llama.cpp/.git \
     vendor/llama.cpp/{models,docs,media,benches,gguf-py,examples,pocs,scripts,conversion,tools/ui})
  tar cJf .device/lcpp.tar.xz -C "$tmp" --transform 's/^llama_cpp_python-0.3.36/llama-cpp-python-0.3.36/' \
     llama_cpp_python-0.3.36
  python -m pip download -q --no-deps -d .device/whl gguf diskcache pytest pluggy iniconfig platformdirs || exit 1
  python -m benchmarks.make_model qwen2-7b .device/qwen2-7b.header --save-header
  python -m benchmarks.make_model gemma3-270m .device/gemma3-270m.header --save-header
  # not *.header: `start` makes a model of every *.header, and this one is 17 GiB (h100_chain.sh moemodel makes it)
  python -m benchmarks.make_model qwen3-30b-a3b .device/qwen3-30b-a3b.moeheader --save-header
  rm -rf "$tmp"; du -sh .device
  ;;
start)
  python3 -m pip install -q --no-index --no-deps --no-compile --target $W/site .device/whl/*.whl || exit 1
  (cd $W && tar xJf "$REPO/.device/lcpp.tar.xz")
  (cd $W/llama-cpp-python-0.3.36 && setsid nohup bash -c "CMAKE_ARGS='-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90' \
     python3 -m pip wheel --no-build-isolation --no-deps --no-cache-dir -w $W/dist . > $W/build.log 2>&1; \
     echo \$? > $W/build.rc" > /dev/null 2>&1 &)
  date +%s > $W/build.start
  for header in .device/*.header; do
    name=$(basename "$header" .header)
    python3 -m benchmarks.make_model "$header" "$W/$name.gguf" || exit 1
  done
  ls -la $W
  ;;
start-patched)
  # like start, but the wheel is oatoplan's patched build: oatoplan build --cuda from the carried (trimmed) tree
  python3 -m pip install -q --no-index --no-deps --no-compile --target $W/site .device/whl/*.whl || exit 1
  (cd $W && tar xJf "$REPO/.device/lcpp.tar.xz")
  setsid nohup bash -c "OATOPLAN_CACHE=$W/cache python3 -m oatoplan -v build --cuda --cuda-arch 90 ${OATO_BUILD_FLAGS:-} \
     --source $W/llama-cpp-python-0.3.36 --no-build-isolation --no-install > $W/build.log 2>&1; \
     rc=\$?; mkdir -p $W/dist; cp $W/cache/wheels/*/llama_cpp_python-*.whl $W/dist/ 2>/dev/null; \
     echo \$rc > $W/build.rc" > /dev/null 2>&1 &
  date +%s > $W/build.start
  for header in .device/*.header; do
    name=$(basename "$header" .header)
    python3 -m benchmarks.make_model "$header" "$W/$name.gguf" || exit 1
  done
  ;;
wait)
  deadline=$(( $(date +%s) + ${WAIT_S:-540} ))
  while [ ! -f $W/build.rc ] && [ "$(date +%s)" -lt "$deadline" ]; do sleep 5; done
  if [ ! -f $W/build.rc ]; then echo "build still running after $(( $(date +%s) - $(cat $W/build.start) )) s"; exit 3; fi
  echo "build rc=$(cat $W/build.rc) after $(( $(stat -c %Y $W/build.rc) - $(cat $W/build.start) )) s"
  tail -3 $W/build.log
  [ "$(cat $W/build.rc)" = 0 ] || exit 1
  python3 -m pip install -q --no-index --no-deps --no-compile --target $W/site $W/dist/llama_cpp_python-*.whl || exit 1
  python3 -c "import llama_cpp; from oatoplan.machine import devices; print(llama_cpp.__file__, devices())"
  ;;
*)
  # The CUDA build of llama-cpp-python 0.3.36 made this way segfaults in llama_model::print_info() on every model
  # load: libllama's std::ostream calls bind to libstdc++ template copies exported by libggml-cuda.so (seen with
  # cuda-gdb on 2026-11-22). Putting the real libstdc++ first in the global scope avoids it; a linker fix belongs
  # in `oatoplan build` (issue #7).
  export LD_PRELOAD=${LD_PRELOAD:-/lib/x86_64-linux-gnu/libstdc++.so.6}
  "$@"
  ;;
esac
