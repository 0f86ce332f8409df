// oatoplan: fused decoder ops for ggml's CPU backend; see oato-fused.h for what and why.
//
// Decode (batch 1) on the CPU is a chain of mat-vecs and element-wise nodes, and ggml's CPU backend ends every node
// with a barrier of all threads (and a mat-vec has one more after quantizing its activation). Fusing
//   gate + up + GLU        : 5 barriers -> 2, the activation quantized once instead of twice,
//   mat-vec + ADD          : 3 barriers -> 2, the result added while still in cache,
//   RMS_NORM + MUL + ADD   : 3 barriers -> 1,
// saves per layer what costs most when a fast GPU waits on a many-threaded CPU.
#include "oato-fused.h"
#include "oato-matvec.h"

#include "ggml-backend-impl.h"
#include "ggml-cpu-impl.h"
#include "ggml-impl.h"
#include "ggml-cpu.h"
#include "vec.h"

#include <stdlib.h>
#include <string.h>

// rows (and GLU/ADD elements) are handed out in chunks of a multiple of this many, so that every chunk starts on a
// 16-float boundary: the SIMD/scalar split of the element-wise functions is then the unfused one (bit-identical)
#define OATO_ROW_ALIGN 16

static int64_t oato_fusion_counts[OATO_FUSED_COUNT];
static int     oato_fusion_state = -1; // -1: environment not read yet; all threads read the same value

int oato_cpu_fusion_enabled(void) {
    if (oato_fusion_state < 0) {
        const char * env = getenv("OATO_CPU_DISABLE_FUSION");
        oato_fusion_state = (env != NULL && atoi(env) == 1) ? 0 : 1;
    }
    return oato_fusion_state;
}

void oato_cpu_fusion_set_enabled(int enabled) {
    oato_fusion_state = enabled ? 1 : 0;
}

void oato_cpu_fusion_counts(int64_t * counts) {
    memcpy(counts, oato_fusion_counts, sizeof(oato_fusion_counts));
}

// Rows per chunk for nr rows: about four chunks per thread, 16 to 64 rows. Chunks are handed out dynamically, as
// ggml's mul_mat does (a static split waits at the barrier for the slowest thread, e.g. a busy hyper-thread sibling,
// and measured 3-7% slower on the H100 machine's 16 threads).
static int64_t oato_chunk_rows(int64_t nr, int nth) {
    const int64_t rows = nr / (4 * nth) / OATO_ROW_ALIGN * OATO_ROW_ALIGN;
    return MAX(OATO_ROW_ALIGN, MIN(64, rows));
}

// The next chunk [*r0, *r1) for this thread: its own first (chunk ith), then from the shared counter that
// oato_quantize_activation() set to nth. False when none is left.
static bool oato_next_chunk(const struct ggml_compute_params * params, int64_t nr, int64_t * chunk, int64_t * r0,
                            int64_t * r1) {
    const int64_t rows = oato_chunk_rows(nr, params->nth);
    *chunk = *chunk < 0 ? params->ith : ggml_threadpool_chunk_add(params->threadpool, 1);
    *r0 = *chunk * rows;
    *r1 = MIN(nr, *r0 + rows);
    return *r0 < nr;
}

// A mat-vec that ggml's stock path would run row by row with vec_dot: f32 activation of one token, 2-D weight in a
// plain host buffer (not repacked: repacked weights have tensor->extra and their own kernels), no Hadamard hint.
static bool oato_is_plain_matvec(const struct ggml_tensor * mm) {
    if (mm->op != GGML_OP_MUL_MAT || mm->type != GGML_TYPE_F32) {
        return false;
    }
    const struct ggml_tensor * w = mm->src[0];
    const struct ggml_tensor * x = mm->src[1];
    if (w->extra != NULL || (w->buffer != NULL && !ggml_backend_buffer_is_host(w->buffer))) {
        return false;
    }
    // f32 weights are left alone: their vec_dot reads x in place, and a fused output may reuse x's memory
    const struct ggml_type_traits_cpu * traits = ggml_get_type_traits_cpu(w->type);
    return traits->vec_dot != NULL && traits->nrows == 1 && traits->vec_dot_type != GGML_TYPE_F32 &&
        x->type == GGML_TYPE_F32 && x->ne[1] == 1 && x->ne[2] == 1 && x->ne[3] == 1 && ggml_is_contiguous(x) &&
        w->ne[2] == 1 && w->ne[3] == 1 && w->nb[0] == ggml_type_size(w->type) &&
        ggml_is_contiguous(mm) && ggml_get_op_params_i32(mm, 1) != GGML_HINT_SRC0_IS_HADAMARD;
}

// The activation x (n floats) in the weight's vec_dot type (never f32, see above), quantized once by all threads into the work buffer
// (block ranges split as ggml_compute_forward_mul_mat splits them), followed by a barrier. NULL when the work
// buffer is too small (every thread sees the same sizes, so all skip together).
static const void * oato_quantize_activation(const struct ggml_compute_params * params, const struct ggml_tensor * w,
                                             const struct ggml_tensor * x) {
    const enum ggml_type vec_dot_type = ggml_get_type_traits_cpu(w->type)->vec_dot_type;
    const int64_t n  = x->ne[0];
    const int64_t bs = ggml_blck_size(vec_dot_type);
    if (params->wdata == NULL || params->wsize < ggml_row_size(vec_dot_type, n)) {
        return NULL;
    }
    if (params->ith == 0) {   // chunks 0..nth-1 go to the threads by index, the rest from this counter
        ggml_threadpool_chunk_set(params->threadpool, params->nth);
    }
    const int64_t b0 = (params->ith * n / bs) / params->nth;
    const int64_t b1 = ((params->ith + 1) * n / bs) / params->nth;
    if (b1 > b0) {
        ggml_get_type_traits_cpu(vec_dot_type)->from_float(
            (const float *) x->data + b0 * bs, (char *) params->wdata + b0 * ggml_type_size(vec_dot_type), (b1 - b0) * bs);
    }
    ggml_barrier(params->threadpool);
    return params->wdata;
}

// y[r0..r1) = w[r0..r1) . xq
static void oato_matvec_rows(const struct ggml_tensor * w, const void * xq, float * y, int64_t r0, int64_t r1) {
    const ggml_vec_dot_t vec_dot = oato_cpu_vec_dot(w->type);   // ggml's, or the same with prefetch (oato-matvec.h)
    const int n = (int) w->ne[0];
    for (int64_t r = r0; r < r1; r++) {
        vec_dot(n, &y[r], 0, (const char *) w->data + r * w->nb[1], 0, xq, 0, 1);
    }
}

// nodes[i], nodes[i+1]: MUL_MAT of the same activation with same-shaped weights of one vec_dot type;
// nodes[i+2]: GLU (SWIGLU or GEGLU, split form) of exactly those two, each used only there.
static bool oato_match_mul_mat_glu(const struct ggml_cgraph * cgraph, int i) {
    if (i + 2 >= cgraph->n_nodes) {
        return false;
    }
    const struct ggml_tensor * a   = cgraph->nodes[i];
    const struct ggml_tensor * b   = cgraph->nodes[i + 1];
    const struct ggml_tensor * glu = cgraph->nodes[i + 2];
    if (glu->op != GGML_OP_GLU || (glu->flags & GGML_TENSOR_FLAG_COMPUTE) == 0 || (b->flags & GGML_TENSOR_FLAG_COMPUTE) == 0) {
        return false;
    }
    const enum ggml_glu_op glu_op = ggml_get_glu_op(glu);
    if (glu_op != GGML_GLU_OP_SWIGLU && glu_op != GGML_GLU_OP_GEGLU) {
        return false;
    }
    if (!oato_is_plain_matvec(a) || !oato_is_plain_matvec(b) || a->src[1] != b->src[1] ||
        !ggml_are_same_shape(a->src[0], b->src[0]) ||
        ggml_get_type_traits_cpu(a->src[0]->type)->vec_dot_type != ggml_get_type_traits_cpu(b->src[0]->type)->vec_dot_type) {
        return false;
    }
    const bool uses = (glu->src[0] == a && glu->src[1] == b) || (glu->src[0] == b && glu->src[1] == a);
    return uses && glu->type == GGML_TYPE_F32 && ggml_is_contiguous(glu) && ggml_are_same_shape(glu, a) &&
        ggml_node_has_n_uses(cgraph, i, 1) && ggml_node_has_n_uses(cgraph, i + 1, 1);
}

static void oato_mul_mat_glu(const struct ggml_compute_params * params, struct ggml_tensor * a, struct ggml_tensor * b,
                             struct ggml_tensor * glu) {
    const void * xq = oato_quantize_activation(params, a->src[0], a->src[1]);
    int64_t chunk = -1, r0, r1;
    while (oato_next_chunk(params, a->ne[0], &chunk, &r0, &r1)) {
        oato_matvec_rows(a->src[0], xq, (float *) a->data, r0, r1);
        oato_matvec_rows(b->src[0], xq, (float *) b->data, r0, r1);
        // unfused: y = f(src0) * src1 over the row, here over this chunk of it
        const float * x = (const float *) glu->src[0]->data + r0;
        const float * g = (const float *) glu->src[1]->data + r0;
        float * y = (float *) glu->data + r0;
        if (ggml_get_glu_op(glu) == GGML_GLU_OP_SWIGLU) {
            ggml_vec_swiglu_f32((int) (r1 - r0), y, x, g);
        } else {
            ggml_vec_geglu_f32((int) (r1 - r0), y, x, g);
        }
    }
}

// nodes[i]: a plain mat-vec used only by nodes[i+1], an ADD of it and a same-shaped f32 tensor (residual or bias).
static bool oato_match_mul_mat_add(const struct ggml_cgraph * cgraph, int i) {
    const enum ggml_op ops[] = { GGML_OP_MUL_MAT, GGML_OP_ADD };
    if (!ggml_can_fuse(cgraph, i, ops, 2) || !oato_is_plain_matvec(cgraph->nodes[i])) {
        return false;
    }
    const struct ggml_tensor * mm    = cgraph->nodes[i];
    const struct ggml_tensor * add   = cgraph->nodes[i + 1];
    const struct ggml_tensor * other = add->src[0] == mm ? add->src[1] : add->src[0];
    return other != mm && other->type == GGML_TYPE_F32 && add->type == GGML_TYPE_F32 &&
        ggml_are_same_shape(other, mm) && ggml_is_contiguous(other) && ggml_is_contiguous(add);
}

static void oato_mul_mat_add(const struct ggml_compute_params * params, struct ggml_tensor * mm, struct ggml_tensor * add) {
    const void * xq = oato_quantize_activation(params, mm->src[0], mm->src[1]);
    int64_t chunk = -1, r0, r1;
    while (oato_next_chunk(params, mm->ne[0], &chunk, &r0, &r1)) {
        oato_matvec_rows(mm->src[0], xq, (float *) mm->data, r0, r1);
        const struct ggml_tensor * other = add->src[0] == mm ? add->src[1] : add->src[0];
        ggml_vec_add_f32((int) (r1 - r0), (float *) add->data + r0, (const float *) mm->data + r0,
                         (const float *) other->data + r0);
    }
}

// nodes[i..i+2]: RMS_NORM(x) of one token's row (decode; the allocator may place later outputs over x, which is
// harmless only while one thread owns the row), MUL(., w) with w one f32 row, ADD(., r) with r shaped like x.
static bool oato_match_rms_norm_mul_add(const struct ggml_cgraph * cgraph, int i) {
    const enum ggml_op ops[] = { GGML_OP_RMS_NORM, GGML_OP_MUL, GGML_OP_ADD };
    if (!ggml_can_fuse(cgraph, i, ops, 3)) {
        return false;
    }
    const struct ggml_tensor * norm = cgraph->nodes[i];
    const struct ggml_tensor * mul  = cgraph->nodes[i + 1];
    const struct ggml_tensor * add  = cgraph->nodes[i + 2];
    const struct ggml_tensor * w    = mul->src[0] == norm ? mul->src[1] : mul->src[0];
    const struct ggml_tensor * r    = add->src[0] == mul ? add->src[1] : add->src[0];
    return ggml_nrows(norm->src[0]) == 1 && norm->src[0]->type == GGML_TYPE_F32 && norm->src[0]->nb[0] == sizeof(float) &&
        w->type == GGML_TYPE_F32 && w->ne[0] == norm->ne[0] && w->nb[0] == sizeof(float) &&
        mul->type == GGML_TYPE_F32 && add->type == GGML_TYPE_F32 && ggml_is_contiguous_rows(add) &&
        r != mul && r->type == GGML_TYPE_F32 && ggml_are_same_shape(r, add) && r->nb[0] == sizeof(float);
}

static void oato_rms_norm_mul_add(const struct ggml_compute_params * params, struct ggml_tensor * norm,
                                  struct ggml_tensor * mul, struct ggml_tensor * add) {
    const struct ggml_tensor * x = norm->src[0];
    const struct ggml_tensor * w = mul->src[0] == norm ? mul->src[1] : mul->src[0];
    const struct ggml_tensor * r = add->src[0] == mul ? add->src[1] : add->src[0];
    float eps;
    memcpy(&eps, norm->op_params, sizeof(float));
    const int64_t n = x->ne[0];
    for (int64_t i3 = 0; i3 < x->ne[3]; i3++) {
        for (int64_t i2 = 0; i2 < x->ne[2]; i2++) {
            for (int64_t i1 = params->ith; i1 < x->ne[1]; i1 += params->nth) {
                // the arithmetic of ggml_compute_forward_rms_norm_f32<GGML_RMS_NORM_FUSE_OP_MUL>, then the ADD node's
                const float * xr = (const float *) ((const char *) x->data + i1 * x->nb[1] + i2 * x->nb[2] + i3 * x->nb[3]);
                ggml_float sum = 0.0;
                for (int64_t k = 0; k < n; k++) {
                    sum += (ggml_float) (xr[k] * xr[k]);
                }
                const float mean  = sum / n;
                const float scale = 1.0f / sqrtf(mean + eps);
                const float * wr = (const float *) ((const char *) w->data + (i1 % w->ne[1]) * w->nb[1] +
                                                    (i2 % w->ne[2]) * w->nb[2] + (i3 % w->ne[3]) * w->nb[3]);
                const float * rr = (const float *) ((const char *) r->data + i1 * r->nb[1] + i2 * r->nb[2] + i3 * r->nb[3]);
                float * y = (float *) ((char *) add->data + i1 * add->nb[1] + i2 * add->nb[2] + i3 * add->nb[3]);
                // one pass, element by element: y may be the memory of x or r (in-place nodes); this file is
                // compiled with -ffp-contract=off, so the product is rounded before the add, as unfused
                for (int64_t k = 0; k < n; k++) {
                    y[k] = xr[k] * scale * wr[k] + rr[k];
                }
            }
        }
    }
}

int oato_cpu_try_fuse(const struct ggml_cgraph * cgraph, int node_n, const struct ggml_compute_params * params) {
    if (!oato_cpu_fusion_enabled() || params->use_ref) {
        return 0;
    }
    struct ggml_tensor * node = cgraph->nodes[node_n];
    int fused = -1;
    int n_more = 0;
    if (node->op == GGML_OP_MUL_MAT && oato_match_mul_mat_glu(cgraph, node_n)) {
        oato_mul_mat_glu(params, node, cgraph->nodes[node_n + 1], cgraph->nodes[node_n + 2]);
        fused = OATO_FUSED_MUL_MAT_GLU;
        n_more = 2;
    } else if (node->op == GGML_OP_MUL_MAT && oato_match_mul_mat_add(cgraph, node_n)) {
        oato_mul_mat_add(params, node, cgraph->nodes[node_n + 1]);
        fused = OATO_FUSED_MUL_MAT_ADD;
        n_more = 1;
    } else if (node->op == GGML_OP_RMS_NORM && oato_match_rms_norm_mul_add(cgraph, node_n)) {
        oato_rms_norm_mul_add(params, node, cgraph->nodes[node_n + 1], cgraph->nodes[node_n + 2]);
        fused = OATO_FUSED_RMS_NORM_MUL_ADD;
        n_more = 2;
    }
    if (fused >= 0 && params->ith == 0) {
        oato_fusion_counts[fused]++;
    }
    return n_more;
}
