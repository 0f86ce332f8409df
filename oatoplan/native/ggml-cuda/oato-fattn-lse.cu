// oatoplan: flash attention that also writes each row's log-sum-exp, for the segment KV cache (issue #21).
//
// oato_attn_segmented() merges two segments' attention as O_b + sigmoid(L_a - L_b) * (O_a - O_b), so each
// segment's FLASH_ATTN_EXT must also give L = M + log S of its rows. Without it on CUDA, the scheduler ran the
// device segment's attention on the CPU. Here the node runs in two passes on its own stream:
//   1. the stock kernel (whichever ggml_cuda_flash_attn_ext picks) on a view of dst without the extra column,
//      written contiguously to dst->data as [DV, n_head, n_q, ne3];
//   2. a log-sum-exp pass over K (F16 or Q8_0): one block per row, NW warps over the KV cells, one warp per
//      cell's dot product, online max/sum per warp, merged across warps;
// then the [DV] rows are spread to dst's [DV + 1] rows with the log-sum-exp in column DV.
// Pass 2 reads K once more per row: for decode that is the segment's K (P cells x DK x 2 bytes per KV head),
// small next to the weights; the scores are computed in f32 from K's values, the stock kernels' own rounding of the
// scores differs by ~1e-3 relative, within flash attention's tolerance.

#include "oato-fattn-lse.cuh"
#include "fattn.cuh"
#include "oato-attn.h"

static constexpr int OATO_LSE_WARPS = 4;

// a copy of dst without the log-sum-exp column: ne0 = DV, contiguous, data at dst->data, op_params[5] = 0
static ggml_tensor oato_stock_node(const ggml_tensor * dst) {
    ggml_tensor t = *dst;
    t.ne[0] = dst->src[2]->ne[0];
    t.nb[0] = sizeof(float);
    t.nb[1] = t.nb[0]*t.ne[0];
    t.nb[2] = t.nb[1]*t.ne[1];
    t.nb[3] = t.nb[2]*t.ne[2];
    t.op_params[OATO_FA_LSE_PARAM] = 0;
    return t;
}

// element d of a K row
template <ggml_type type_K>
static __device__ __forceinline__ float oato_k_value(const char * row, const int d) {
    if constexpr (type_K == GGML_TYPE_F16) {
        return __half2float(((const half *) row)[d]);
    } else {
        static_assert(type_K == GGML_TYPE_Q8_0, "K: F16 or Q8_0");
        const block_q8_0 * b = (const block_q8_0 *) row + d/QK8_0;
        return __half2float(b->d)*b->qs[d % QK8_0];
    }
}

// row r = h + n_head*(iq + n_q*i3), as dst's rows
template <int NW, ggml_type type_K>
static __global__ void oato_fattn_lse_kernel(
        const char * __restrict__ Q, const char * __restrict__ K, const char * __restrict__ mask,
        const float * __restrict__ sinks, float * __restrict__ L,
        const int DK, const int n_kv, const int n_head, const int n_q, const int gqa_ratio, const int ne3_ratio,
        const int64_t nbq1, const int64_t nbq2, const int64_t nbq3,
        const int64_t nbk1, const int64_t nbk2, const int64_t nbk3,
        const int64_t nbm1, const int64_t nbm2, const int64_t nbm3, const int nem2, const int nem3,
        const float scale, const float logit_softcap, const float max_bias,
        const float m0, const float m1, const uint32_t n_head_log2) {
    extern __shared__ float q_s[]; // [DK]
    __shared__ float warp_M[NW];
    __shared__ float warp_S[NW];

    const int r  = blockIdx.x;
    const int h  = r % n_head;
    const int iq = (r / n_head) % n_q;
    const int i3 = r / (n_head*n_q);

    const float * q = (const float *) (Q + iq*nbq1 + h*nbq2 + i3*nbq3);
    for (int d = threadIdx.x; d < DK; d += blockDim.x) {
        q_s[d] = q[d];
    }
    __syncthreads();

    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;

    const char * k_head = K + (h/gqa_ratio)*nbk2 + (i3/ne3_ratio)*nbk3;
    const half * m_row  = mask ? (const half *) (mask + iq*nbm1 + (h % nem2)*nbm2 + (i3 % nem3)*nbm3) : nullptr;
    const float slope   = get_alibi_slope(max_bias, h, n_head_log2, m0, m1);

    float M = -INFINITY;
    float S = 0.0f;
    for (int j = warp; j < n_kv; j += NW) {
        const float mv = m_row ? slope*__half2float(m_row[j]) : 0.0f;
        if (mv == -INFINITY) {
            continue;
        }
        const char * k_row = k_head + j*nbk1;
        float s = 0.0f;
        for (int d = lane; d < DK; d += WARP_SIZE) {
            s += q_s[d]*oato_k_value<type_K>(k_row, d);
        }
        s = warp_reduce_sum(s);
        s *= scale;
        if (logit_softcap != 0.0f) {
            s = logit_softcap*tanhf(s);
        }
        s += mv;
        if (s > M) {
            S = S*expf(M - s) + 1.0f;
            M = s;
        } else {
            S += expf(s - M);
        }
    }
    if (lane == 0) {
        warp_M[warp] = M;
        warp_S[warp] = S;
    }
    __syncthreads();

    if (threadIdx.x == 0) {
        const float sink = sinks ? sinks[h] : -INFINITY;
        float M_all = sink;
        for (int w = 0; w < NW; ++w) {
            M_all = fmaxf(M_all, warp_M[w]);
        }
        float S_all = sinks ? expf(sink - M_all) : 0.0f;
        for (int w = 0; w < NW; ++w) {
            if (warp_S[w] > 0.0f) {
                S_all += warp_S[w]*expf(warp_M[w] - M_all);
            }
        }
        L[r] = S_all == 0.0f ? -INFINITY : M_all + logf(S_all);
    }
}

// dst row r: [O[r, 0..DV-1], L[r]]; a row that sees no key (L = -inf) gets O = 0, as the CPU's, not the stock
// kernels' 0/0, so that the merge's sigmoid(L_a - L_b) = 0 or 1 weighs it out exactly
static __global__ void oato_fattn_lse_spread(const float * __restrict__ O, const float * __restrict__ L,
        float * __restrict__ dst, const int DV, const int64_t n_rows) {
    const int64_t i = int64_t(blockIdx.x)*blockDim.x + threadIdx.x;
    const int64_t row_len = DV + 1;
    if (i >= n_rows*row_len) {
        return;
    }
    const int64_t r = i / row_len;
    const int64_t c = i % row_len;
    const float   l = L[r];
    dst[i] = c == DV ? l : (l == -INFINITY ? 0.0f : O[r*DV + c]);
}

bool oato_cuda_flash_attn_ext_lse_supported(int device, const ggml_tensor * dst) {
    const ggml_tensor * Q    = dst->src[0];
    const ggml_tensor * K    = dst->src[1];
    const ggml_tensor * V    = dst->src[2];
    const ggml_tensor * mask = dst->src[3];
    if (Q->type != GGML_TYPE_F32 || (K->type != GGML_TYPE_F16 && K->type != GGML_TYPE_Q8_0) ||
            dst->type != GGML_TYPE_F32) {
        return false; // the log-sum-exp pass reads f32 Q and F16 or Q8_0 K; other K types stay with the CPU
    }
    if (mask && mask->type != GGML_TYPE_F16) {
        return false;
    }
    if (dst->ne[0] != V->ne[0] + 1 || !ggml_is_contiguous(dst)) {
        return false;
    }
    const ggml_tensor stock = oato_stock_node(dst);
    return ggml_cuda_flash_attn_ext_supported(device, &stock);
}

void oato_cuda_flash_attn_ext_lse(ggml_backend_cuda_context & ctx, ggml_tensor * dst) {
    const ggml_tensor * Q     = dst->src[0];
    const ggml_tensor * K     = dst->src[1];
    const ggml_tensor * V     = dst->src[2];
    const ggml_tensor * mask  = dst->src[3];
    const ggml_tensor * sinks = dst->src[4];

    GGML_ASSERT(Q->type == GGML_TYPE_F32 && dst->type == GGML_TYPE_F32);
    GGML_ASSERT(K->type == GGML_TYPE_F16 || K->type == GGML_TYPE_Q8_0);
    GGML_ASSERT(dst->ne[0] == V->ne[0] + 1 && ggml_is_contiguous(dst));
    GGML_ASSERT(!mask || mask->type == GGML_TYPE_F16);
    GGML_ASSERT(!sinks || sinks->type == GGML_TYPE_F32);

    const int     DV     = V->ne[0];
    const int64_t n_rows = ggml_nrows(dst); // n_head * n_q * ne3
    cudaStream_t  stream = ctx.stream();

    // pass 1: the stock kernel, writing [DV] rows contiguously at dst->data (its f16 K/V copies, if any, lie
    // after those rows, inside dst's allocation, which was sized for the larger [DV + 1] rows)
    ggml_tensor stock = oato_stock_node(dst);
    ggml_cuda_flash_attn_ext(ctx, &stock);

    // pass 2: the rows' log-sum-exp
    ggml_cuda_pool_alloc<float> L(ctx.pool(), n_rows);
    float scale         = 1.0f;
    float max_bias      = 0.0f;
    float logit_softcap = 0.0f;
    memcpy(&scale,         (const float *) dst->op_params + 0, sizeof(float));
    memcpy(&max_bias,      (const float *) dst->op_params + 1, sizeof(float));
    memcpy(&logit_softcap, (const float *) dst->op_params + 2, sizeof(float));
    if (logit_softcap != 0.0f) {
        scale /= logit_softcap;
    }
    const int      n_head      = Q->ne[2];
    const uint32_t n_head_log2 = 1u << uint32_t(floorf(log2f(float(n_head))));
    const float    m0          = powf(2.0f, -(max_bias       )/n_head_log2);
    const float    m1          = powf(2.0f, -(max_bias / 2.0f)/n_head_log2);

    const int    DK     = Q->ne[0];
    const dim3   block(OATO_LSE_WARPS*WARP_SIZE, 1, 1);
    const size_t shared = DK*sizeof(float);
    const auto kernel = K->type == GGML_TYPE_F16 ? oato_fattn_lse_kernel<OATO_LSE_WARPS, GGML_TYPE_F16>
                                                 : oato_fattn_lse_kernel<OATO_LSE_WARPS, GGML_TYPE_Q8_0>;
    kernel<<<n_rows, block, shared, stream>>>(
        (const char *) Q->data, (const char *) K->data, mask ? (const char *) mask->data : nullptr,
        sinks ? (const float *) sinks->data : nullptr, L.ptr,
        DK, K->ne[1], n_head, Q->ne[1], Q->ne[2]/K->ne[2], Q->ne[3]/K->ne[3],
        Q->nb[1], Q->nb[2], Q->nb[3], K->nb[1], K->nb[2], K->nb[3],
        mask ? mask->nb[1] : 0, mask ? mask->nb[2] : 0, mask ? mask->nb[3] : 0,
        mask ? mask->ne[2] : 1, mask ? mask->ne[3] : 1,
        scale, logit_softcap, max_bias, m0, m1, n_head_log2);
    CUDA_CHECK(cudaGetLastError());

    // spread: [DV] rows -> [DV + 1] rows in place needs a copy of the first n_rows*DV floats
    ggml_cuda_pool_alloc<float> O(ctx.pool(), n_rows*DV);
    CUDA_CHECK(cudaMemcpyAsync(O.ptr, dst->data, n_rows*DV*sizeof(float), cudaMemcpyDeviceToDevice, stream));
    const int64_t n     = n_rows*(DV + 1);
    const int     bsize = 256;
    oato_fattn_lse_spread<<<(n + bsize - 1)/bsize, bsize, 0, stream>>>(O.ptr, L.ptr, (float *) dst->data, DV, n_rows);
    CUDA_CHECK(cudaGetLastError());
}
