// oatoplan: per-op wall time of the CPU backend inside real graphs (see oato-trace.h).

#include "oato-trace.h"

#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>

#if defined(_WIN32)
#include <windows.h>
#else
#include <time.h>
#endif

static int oato_trace_on = -1;                       // -1: not read from the environment yet
static _Atomic int64_t oato_trace_last_arrival_ns;   // max over the threads of the current graph
static int64_t oato_trace_totals[OATO_TRACE_TOTAL_COUNT];
static int64_t oato_trace_op_ns[GGML_OP_COUNT];
static int64_t oato_trace_op_count[GGML_OP_COUNT];
static int64_t oato_trace_op_fused[GGML_OP_COUNT];
static int64_t oato_trace_op_weight_bytes[GGML_OP_COUNT];

static int64_t oato_trace_now_ns(void) {
#if defined(_WIN32)
    LARGE_INTEGER t, f;
    QueryPerformanceCounter(&t);
    QueryPerformanceFrequency(&f);
    return (int64_t) ((double) t.QuadPart * 1e9 / (double) f.QuadPart);
#else
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t) ts.tv_sec * 1000000000 + ts.tv_nsec;
#endif
}

static int oato_trace_enabled(void) {
    // read on the calling thread before the team starts (graph_begin), so the workers see a settled value
    if (oato_trace_on < 0) {
        const char * env = getenv("OATO_CPU_TRACE");
        oato_trace_on = env != NULL && atoi(env) != 0;
    }
    return oato_trace_on;
}

int64_t oato_cpu_trace_graph_begin(void) {
    if (!oato_trace_enabled()) {
        return 0;
    }
    const int64_t t0 = oato_trace_now_ns();
    atomic_store_explicit(&oato_trace_last_arrival_ns, t0, memory_order_relaxed);
    return t0;
}

void oato_cpu_trace_graph_end(int64_t t0_ns) {
    if (t0_ns == 0) {
        return;
    }
    oato_trace_totals[OATO_TRACE_N_GRAPHS] += 1;
    oato_trace_totals[OATO_TRACE_GRAPH_NS] += oato_trace_now_ns() - t0_ns;
    oato_trace_totals[OATO_TRACE_START_NS] += atomic_load_explicit(&oato_trace_last_arrival_ns, memory_order_relaxed) - t0_ns;
}

void oato_cpu_trace_arrive(void) {
    if (oato_trace_on != 1) {
        return;
    }
    const int64_t t = oato_trace_now_ns();
    int64_t seen = atomic_load_explicit(&oato_trace_last_arrival_ns, memory_order_relaxed);
    while (t > seen && !atomic_compare_exchange_weak_explicit(&oato_trace_last_arrival_ns, &seen, t,
                                                              memory_order_relaxed, memory_order_relaxed)) {
    }
}

int64_t oato_cpu_trace_node_begin(int ith) {
    return ith == 0 && oato_trace_on == 1 ? oato_trace_now_ns() : 0;
}

void oato_cpu_trace_node_end(const struct ggml_cgraph * cgraph, int node_first, int node_last, int64_t t0_ns) {
    if (t0_ns == 0) {
        return;
    }
    const struct ggml_tensor * first = ggml_graph_node((struct ggml_cgraph *) cgraph, node_first);
    const int op = first->op;
    oato_trace_op_ns[op]    += oato_trace_now_ns() - t0_ns;
    oato_trace_op_count[op] += 1;
    oato_trace_op_fused[op] += node_last > node_first;
    for (int i = node_first; i <= node_last; i++) {
        const struct ggml_tensor * node = ggml_graph_node((struct ggml_cgraph *) cgraph, i);
        if (node->op == GGML_OP_MUL_MAT && node->src[0] != NULL) {
            oato_trace_op_weight_bytes[op] += (int64_t) ggml_nbytes(node->src[0]);
        }
    }
}

int oato_cpu_trace_n_ops(void) {
    return GGML_OP_COUNT;
}

void oato_cpu_trace_read(int64_t * totals, int64_t * op_ns, int64_t * op_count, int64_t * op_fused,
                         int64_t * op_weight_bytes) {
    memcpy(totals, oato_trace_totals, sizeof(oato_trace_totals));
    memcpy(op_ns, oato_trace_op_ns, sizeof(oato_trace_op_ns));
    memcpy(op_count, oato_trace_op_count, sizeof(oato_trace_op_count));
    memcpy(op_fused, oato_trace_op_fused, sizeof(oato_trace_op_fused));
    memcpy(op_weight_bytes, oato_trace_op_weight_bytes, sizeof(oato_trace_op_weight_bytes));
}

void oato_cpu_trace_reset(void) {
    memset(oato_trace_totals, 0, sizeof(oato_trace_totals));
    memset(oato_trace_op_ns, 0, sizeof(oato_trace_op_ns));
    memset(oato_trace_op_count, 0, sizeof(oato_trace_op_count));
    memset(oato_trace_op_fused, 0, sizeof(oato_trace_op_fused));
    memset(oato_trace_op_weight_bytes, 0, sizeof(oato_trace_op_weight_bytes));
}

void oato_cpu_trace_set_enabled(int enabled) {
    oato_trace_on = enabled != 0;
}
