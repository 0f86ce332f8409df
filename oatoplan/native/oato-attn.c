// oatoplan: exact attention over a KV cache held in two segments (the segment KV cache, issue #21).
//
// A layer's K/V lives in two segments with their own buffers (and, later, devices): a = the prompt segment, b = the
// response segment. The result equals attention over the concatenation [k_a | k_b], [v_a | v_b] with one softmax
// over both; only q, small scores or partials and the output cross between the segments' devices, never K/V.
//
// flash attention off: KQ per segment (next to its K), the two score blocks concatenated (n_kv x n_q x n_head
//   floats, a few % of the K/V they came from), one soft_max_ext over both with the concatenated mask, then
//   KQV per segment over its slice of the probabilities, and the two partial outputs added.
// flash attention on: one FLASH_ATTN_EXT per segment that also writes its rows' log-sum-exp L (oato_flash_attn_ext_
//   lse: dst is [DV + 1, n_head, n_q, ne3], column DV holds L = M + log S), merged exactly with plain ops:
//   O = O_b + sigmoid(L_a - L_b) * (O_a - O_b), since softmax weights the two segments by e^L_a : e^L_b.
//
// An empty segment (NULL or n_kv 0) leaves the stock single-segment formula, node for node as llama.cpp builds it.

#include "ggml.h"
#include "ggml-impl.h"
#include "oato-attn.h"

#include <math.h>
#include <string.h>

static bool oato_seg_empty(const struct ggml_tensor * k) {
    return k == NULL || k->ne[1] == 0;
}

struct ggml_tensor * oato_flash_attn_ext_lse(
        struct ggml_context * ctx,
        struct ggml_tensor  * q,
        struct ggml_tensor  * k,
        struct ggml_tensor  * v,
        struct ggml_tensor  * mask,
        float                 scale,
        float                 max_bias,
        float                 logit_softcap) {
    // the stock node, then the same node with one more output column: ggml_flash_attn_ext's checks stay the checks
    struct ggml_tensor * fa = ggml_flash_attn_ext(ctx, q, k, v, mask, scale, max_bias, logit_softcap);
    struct ggml_tensor * result = ggml_new_tensor_4d(ctx, GGML_TYPE_F32, fa->ne[0] + 1, fa->ne[1], fa->ne[2], fa->ne[3]);
    memcpy(result->op_params, fa->op_params, sizeof(result->op_params));
    ggml_set_op_params_i32(result, OATO_FA_LSE_PARAM, 1);
    result->op = GGML_OP_FLASH_ATTN_EXT;
    for (int i = 0; i < GGML_MAX_SRC; ++i) {
        result->src[i] = fa->src[i];
    }
    return result;
}

// One segment, as llama.cpp's build_attn_mha writes it (flash attention off): [DV, n_head, n_q, ne3], permuted.
static struct ggml_tensor * oato_scores(struct ggml_context * ctx, struct ggml_tensor * k, struct ggml_tensor * q,
                                        float logit_softcap) {
    struct ggml_tensor * kq = ggml_mul_mat(ctx, k, q);     // [n_kv, n_q, n_head, ne3]
    ggml_prec_set_acc(kq, GGML_PREC_F32);   // as llama.cpp: scores need f32 range
    if (logit_softcap != 0.0f) {
        kq = ggml_scale(ctx, kq, 1.0f / logit_softcap);
        kq = ggml_tanh(ctx, kq);
        kq = ggml_scale(ctx, kq, logit_softcap);
    }
    return kq;
}

struct ggml_tensor * oato_attn_segmented(
        struct ggml_context * ctx,
        struct ggml_tensor  * q,
        struct ggml_tensor  * k_a,
        struct ggml_tensor  * v_a,
        struct ggml_tensor  * mask_a,
        struct ggml_tensor  * k_b,
        struct ggml_tensor  * v_b,
        struct ggml_tensor  * mask_b,
        struct ggml_tensor  * mask_ab,
        struct ggml_tensor  * sinks,
        float                 scale,
        float                 max_bias,
        float                 logit_softcap,
        bool                  flash_attn) {
    GGML_ASSERT(!(oato_seg_empty(k_a) && oato_seg_empty(k_b)) && "oato_attn_segmented: both segments empty");

    if (flash_attn) {
        if (oato_seg_empty(k_a) || oato_seg_empty(k_b)) {
            const bool a = !oato_seg_empty(k_a);
            struct ggml_tensor * cur = ggml_flash_attn_ext(ctx, q, a ? k_a : k_b, a ? v_a : v_b, a ? mask_a : mask_b,
                                                           scale, max_bias, logit_softcap);
            ggml_flash_attn_ext_add_sinks(cur, sinks);
            ggml_prec_set_acc(cur, GGML_PREC_F32);
            return cur;
        }
        // sinks join the softmax once: with segment a
        struct ggml_tensor * pa = oato_flash_attn_ext_lse(ctx, q, k_a, v_a, mask_a, scale, max_bias, logit_softcap);
        ggml_flash_attn_ext_add_sinks(pa, sinks);
        ggml_prec_set_acc(pa, GGML_PREC_F32);
        struct ggml_tensor * pb = oato_flash_attn_ext_lse(ctx, q, k_b, v_b, mask_b, scale, max_bias, logit_softcap);
        ggml_prec_set_acc(pb, GGML_PREC_F32);

        const int64_t dv = pa->ne[0] - 1;
        struct ggml_tensor * o_a = ggml_view_4d(ctx, pa, dv, pa->ne[1], pa->ne[2], pa->ne[3], pa->nb[1], pa->nb[2], pa->nb[3], 0);
        struct ggml_tensor * o_b = ggml_view_4d(ctx, pb, dv, pb->ne[1], pb->ne[2], pb->ne[3], pb->nb[1], pb->nb[2], pb->nb[3], 0);
        struct ggml_tensor * l_a = ggml_view_4d(ctx, pa, 1, pa->ne[1], pa->ne[2], pa->ne[3], pa->nb[1], pa->nb[2], pa->nb[3], dv*sizeof(float));
        struct ggml_tensor * l_b = ggml_view_4d(ctx, pb, 1, pb->ne[1], pb->ne[2], pb->ne[3], pb->nb[1], pb->nb[2], pb->nb[3], dv*sizeof(float));

        // w_a = e^L_a / (e^L_a + e^L_b): [1, n_head, n_q, ne3], broadcast over DV
        struct ggml_tensor * w_a = ggml_sigmoid(ctx, ggml_sub(ctx, l_a, l_b));
        return ggml_add(ctx, ggml_mul(ctx, ggml_sub(ctx, o_a, o_b), w_a), o_b);
    }

    // flash attention off: v_a, v_b are transposed views [n_kv, DV, n_head_kv, ne3], as llama.cpp's V cache gives
    struct ggml_tensor * kq;
    if (oato_seg_empty(k_a) || oato_seg_empty(k_b)) {
        const bool a = !oato_seg_empty(k_a);
        kq = oato_scores(ctx, a ? k_a : k_b, q, logit_softcap);
        kq = ggml_soft_max_ext(ctx, kq, a ? mask_a : mask_b, scale, max_bias);
        ggml_soft_max_add_sinks(kq, sinks);
        return ggml_permute(ctx, ggml_mul_mat(ctx, a ? v_a : v_b, kq), 0, 2, 1, 3);
    }
    struct ggml_tensor * kq_a = oato_scores(ctx, k_a, q, logit_softcap);
    struct ggml_tensor * kq_b = oato_scores(ctx, k_b, q, logit_softcap);
    if (mask_ab == NULL && mask_a != NULL) {
        mask_ab = ggml_concat(ctx, mask_a, mask_b, 0);
    }
    kq = ggml_soft_max_ext(ctx, ggml_concat(ctx, kq_a, kq_b, 0), mask_ab, scale, max_bias);
    ggml_soft_max_add_sinks(kq, sinks);

    const int64_t n_a = k_a->ne[1];
    const int64_t n_b = k_b->ne[1];
    struct ggml_tensor * p_a = ggml_view_4d(ctx, kq, n_a, kq->ne[1], kq->ne[2], kq->ne[3], kq->nb[1], kq->nb[2], kq->nb[3], 0);
    struct ggml_tensor * p_b = ggml_view_4d(ctx, kq, n_b, kq->ne[1], kq->ne[2], kq->ne[3], kq->nb[1], kq->nb[2], kq->nb[3], n_a*ggml_element_size(kq));
    if ((n_a + n_b) % 2 != 0 || n_a % 2 != 0) {
        // CUDA's mat-vec kernels read the probabilities two at a time and assert an even row stride; llama.cpp's
        // n_kv and our segments are multiples of 256, so a cache never comes here
        p_a = ggml_cont(ctx, p_a);
        p_b = ggml_cont(ctx, p_b);
    }
    struct ggml_tensor * kqv = ggml_add(ctx, ggml_mul_mat(ctx, v_a, p_a), ggml_mul_mat(ctx, v_b, p_b));
    return ggml_permute(ctx, kqv, 0, 2, 1, 3);
}
