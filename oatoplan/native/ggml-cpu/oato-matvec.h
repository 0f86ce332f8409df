// oatoplan: ggml's batch-1 dot products with software prefetch, for ggml's CPU backend.
//
// Decode on the CPU streams every weight once per token through ggml_vec_dot_q4_K_q8_K / ..._q6_K_q8_K. On the H100
// machine's Xeon those read 71 GB/s with 16 threads where the cores can read ~120: the hardware prefetchers leave
// each core waiting on memory between blocks. The same kernels with a software prefetch 4 KiB ahead read ~100 GB/s
// and give bit-identical results (oato-matvec.c). Used by ggml's MUL_MAT (patches/0004) and oatoplan's fused ops.
//
// OATO_CPU_MATVEC=ggml, or oato_cpu_matvec_set_enabled(0), keeps ggml's own kernels.
#pragma once

#include "ggml.h"
#include "ggml-backend.h"
#include "ggml-cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

// The vec_dot to use for weights of `type` (same contract as ggml's type_traits_cpu[type].vec_dot): oatoplan's
// prefetching kernel for Q4_K and Q6_K on an AVX2 build while enabled, else ggml's own.
ggml_vec_dot_t oato_cpu_vec_dot(enum ggml_type type);

// 1 when the prefetching kernels are on (the default), 0 when OATO_CPU_MATVEC=ggml.
GGML_BACKEND_API int oato_cpu_matvec_enabled(void);

// Turn them on (1) or off (0) between graph computations (benchmarks compare both on one loaded model).
GGML_BACKEND_API void oato_cpu_matvec_set_enabled(int enabled);

#ifdef __cplusplus
}
#endif
