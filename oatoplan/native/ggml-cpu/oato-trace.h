// oatoplan: where the CPU backend's time goes inside a real graph (the CPU half of a partial-offload decode).
//
// Compiled into libggml-cpu by patches/0003. Off by default (one relaxed load per node); OATO_CPU_TRACE=1 or
// oato_cpu_trace_set_enabled(1) turns it on. Thread 0 times every node from its start to the end of the barrier
// after it (its own share plus the wait for the slowest thread), so the per-op times add up to the graph's time
// less the start of the thread team, which is counted apart (entry to the last thread's arrival).
#pragma once

#include "ggml.h"
#include "ggml-backend.h"

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_cgraph;

// graph totals, in the order oato_cpu_trace_read() fills them
enum oato_trace_total {
    OATO_TRACE_N_GRAPHS = 0, // ggml_graph_compute calls
    OATO_TRACE_GRAPH_NS = 1, // their wall time, entry to return
    OATO_TRACE_START_NS = 2, // entry to the last thread's arrival in the node loop (thread team start)
    OATO_TRACE_TOTAL_COUNT = 3,
};

// hooks (ggml-cpu.c): a graph starts / ends on the calling thread; a thread enters the node loop; thread 0
// finished nodes [node_first, node_last] (a fused span is one entry, under its first node's op) that began at t0_ns
int64_t oato_cpu_trace_graph_begin(void);
void    oato_cpu_trace_graph_end(int64_t t0_ns);
void    oato_cpu_trace_arrive(void);
int64_t oato_cpu_trace_node_begin(int ith);
void    oato_cpu_trace_node_end(const struct ggml_cgraph * cgraph, int node_first, int node_last, int64_t t0_ns);

// Since the last reset: totals[OATO_TRACE_TOTAL_COUNT]; per GGML_OP: thread-0 ns, entries, fused entries, and the
// bytes of the MUL_MAT weights (src0) the entries read. Each array has oato_cpu_trace_n_ops() elements.
GGML_BACKEND_API int  oato_cpu_trace_n_ops(void);
GGML_BACKEND_API void oato_cpu_trace_read(int64_t * totals, int64_t * op_ns, int64_t * op_count, int64_t * op_fused,
                                          int64_t * op_weight_bytes);
GGML_BACKEND_API void oato_cpu_trace_reset(void);
GGML_BACKEND_API void oato_cpu_trace_set_enabled(int enabled);

#ifdef __cplusplus
}
#endif
