// oatoplan: fused decoder ops for ggml's CPU backend (the CPU half of a partial-offload plan).
//
// Compiled into libggml-cpu by patches/0002; ggml_cpu_try_fuse_ops() calls oato_cpu_try_fuse() before its own
// RMS_NORM+MUL fusion. Every fused path gives bit-identical results to the unfused nodes: the same vec_dot on the
// same quantized activation, the same element-wise functions on chunks aligned to 16 floats (so the SIMD/scalar
// split is the unfused one), and no multiply-add contraction across the fused steps.
//
// OATO_CPU_DISABLE_FUSION=1 turns them off (GGML_CPU_DISABLE_FUSION=1 turns off these and ggml's own).
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_compute_params;
struct ggml_cgraph;

// fused patterns, in the order oato_cpu_fusion_counts() reports them
enum oato_fused_op {
    OATO_FUSED_MUL_MAT_GLU = 0, // MUL_MAT(up, x), MUL_MAT(gate, x), GLU(gate, up)  (SWIGLU, GEGLU), batch 1
    OATO_FUSED_MUL_MAT_ADD = 1, // MUL_MAT(w, x), ADD(., residual or bias), batch 1
    OATO_FUSED_RMS_NORM_MUL_ADD = 2, // RMS_NORM(x), MUL(., w), ADD(., residual)
    OATO_FUSED_COUNT = 3,
};

// Runs the fused op starting at cgraph->nodes[node_n] on this thread's share when the nodes match a pattern.
// Returns the number of following nodes it also computed (>= 1), or 0 when nothing was fused. Every thread of the
// graph calls it with the same arguments and takes the same decision.
int oato_cpu_try_fuse(const struct ggml_cgraph * cgraph, int node_n, const struct ggml_compute_params * params);

// Nodes executed through each fused pattern since the library was loaded (counts[OATO_FUSED_COUNT]); tests use it
// to prove that a fused path ran.
GGML_BACKEND_API void oato_cpu_fusion_counts(int64_t * counts);

// 1 when the fused ops are on (the default), 0 when OATO_CPU_DISABLE_FUSION=1.
GGML_BACKEND_API int oato_cpu_fusion_enabled(void);

// Turn the fused ops on (1) or off (0) between graph computations (benchmarks compare both on one loaded model).
GGML_BACKEND_API void oato_cpu_fusion_set_enabled(int enabled);

#ifdef __cplusplus
}
#endif
