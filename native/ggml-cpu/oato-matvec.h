// oatoplan: faster batch-1 dot products for ggml's CPU backend, bit-identical to ggml's own.
//
// Decode on the CPU is a chain of mat-vecs whose dot products (ggml_vec_dot_q4_K_q8_K, ..._q6_K_q8_K) are AVX2 code
// on x86 in every build. Traced on the H100 machine's Xeon, they read weights at 5 GB/s per core (80 GB/s on 16
// cores) where the cores can read ~6 (95 GB/s): at 8 threads the dot products, not the memory, set the pace. With
// AVX-512 VNNI the same integer sums take about half the instructions: a 512-bit step covers two 32-weight sub-blocks
// and vpdpwssd does ggml's scale-multiply-and-add in one. The integer sums of every 32-bit lane are exactly ggml's
// (integer addition is associative), and the float steps are ggml's, in ggml's order: results are bit-identical.
#pragma once

#include "ggml.h"
#include "ggml-cpu.h"

#ifdef __cplusplus
extern "C" {
#endif

// The faster vec_dot for weights of `type` times their vec_dot_type (Q8_K) if this CPU has one (checked once at run
// time: AVX-512 F/BW/VL/VNNI), else NULL. Same contract as ggml's vec_dot with nrc == 1.
ggml_vec_dot_t oato_cpu_fast_vec_dot(enum ggml_type type);

#ifdef __cplusplus
}
#endif
