// oatoplan: flash attention that also writes each row's log-sum-exp, for the segment KV cache (issue #21).
//
// oato_attn_segmented() merges two segments' attention as O_b + sigmoid(L_a - L_b) * (O_a - O_b), so each
// segment's FLASH_ATTN_EXT must also give L = M + log S of its rows. Without it on CUDA, the scheduler ran the
// device segment's attention on the CPU. Here the node runs in two passes on its own stream:
//   1. the stock kernel (whichever ggml_cuda_flash_attn_ext picks) on a view of dst without the extra column,
//      written contiguously to dst->data as [DV, n_head, n_q, ne3];
//   2. a log-sum-exp pass over K (F16 or Q8_0): for a few queries (decode), one block per row, NW warps over the
//      KV cells, one warp per cell's dot product, online max/sum per warp, merged across warps; for a batch, blocks
//      of rows that share a KV head, K read in tiles through shared memory (oato_fattn_lse_tiled_kernel);
// then the [DV] rows are spread to dst's [DV + 1] rows with the log-sum-exp in column DV.
// Pass 2 reads K once more per row: for decode that is the segment's K (P cells x DK x 2 bytes per KV head),
// small next to the weights; the scores are computed in f32 from K's values, the stock kernels' own rounding of the
// scores differs by ~1e-3 relative, within flash attention's tolerance.

#include "oato-fattn-lse.cuh"
#include "fattn.cuh"
#include "oato-attn.h"

static constexpr int OATO_LSE_WARPS = 4;
// a node with at least this many queries takes the tiled log-sum-exp kernel (K read once per tile of rows)
static constexpr int OATO_LSE_TILED_MIN_QUERIES = 8;
static constexpr int OATO_LSE_TILED_WARPS       = 8;

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

// The same for a batch of queries, tiled: a block takes RT = NW*RPW rows that read one KV head (queries x the heads
// of its GQA group) and walks K in tiles of WARP_SIZE cells, each tile read once from global memory into shared
// memory for all RT rows (the one-block-per-row kernel reads K once per row); lane j of a warp scores cell j of the
// tile for each of the warp's RPW rows, keeping its own online max/sum, merged across lanes at the end.
// Shared memory: RT*DK floats of q, WARP_SIZE*(DK + 1) floats of K (padded: lanes read rows DK + 1 apart).
template <int NW, int RPW, ggml_type type_K>
static __global__ void oato_fattn_lse_tiled_kernel(
        const char * __restrict__ Q, const char * __restrict__ K, const char * __restrict__ mask,
        const float * __restrict__ sinks, float * __restrict__ L,
        const int DK, const int n_kv, const int n_head, const int n_q, const int gqa_ratio, const int ne3_ratio,
        const int64_t nbq1, const int64_t nbq2, const int64_t nbq3,
        const int64_t nbk1, const int64_t nbk2, const int64_t nbk3,
        const int64_t nbm1, const int64_t nbm2, const int64_t nbm3, const int nem2, const int nem3,
        const float scale, const float logit_softcap, const float max_bias,
        const float m0, const float m1, const uint32_t n_head_log2) {
    constexpr int RT = NW*RPW;
    extern __shared__ float smem[];
    float * q_s = smem;              // [RT][DK]
    float * k_s = smem + RT*DK;      // [WARP_SIZE][DK + 1]

    const int n_head_kv = n_head/gqa_ratio;
    const int g         = blockIdx.y % n_head_kv;
    const int i3        = blockIdx.y / n_head_kv;
    const int n_rows_g  = n_q*gqa_ratio;   // the rows that read KV head g: t = iq*gqa_ratio + (h - g*gqa_ratio)
    const int t0        = blockIdx.x*RT;

    for (int i = threadIdx.x; i < RT*DK; i += blockDim.x) {
        const int t = t0 + i/DK;
        const int d = i % DK;
        float v = 0.0f;
        if (t < n_rows_g) {
            const int iq = t/gqa_ratio;
            const int h  = g*gqa_ratio + t % gqa_ratio;
            v = ((const float *) (Q + iq*nbq1 + h*nbq2 + i3*nbq3))[d];
        }
        q_s[i] = v;
    }

    const int warp = threadIdx.x / WARP_SIZE;
    const int lane = threadIdx.x % WARP_SIZE;

    float        M[RPW];
    float        S[RPW];
    float        slope[RPW];
    const half * m_row[RPW];
    bool         valid[RPW];
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        const int t  = t0 + warp*RPW + rr;
        const int iq = t/gqa_ratio;
        const int h  = g*gqa_ratio + t % gqa_ratio;
        valid[rr] = t < n_rows_g;
        M[rr]     = -INFINITY;
        S[rr]     = 0.0f;
        slope[rr] = get_alibi_slope(max_bias, h, n_head_log2, m0, m1);
        m_row[rr] = mask && valid[rr] ? (const half *) (mask + iq*nbm1 + (h % nem2)*nbm2 + (i3 % nem3)*nbm3) : nullptr;
    }

    const char * k_head = K + g*nbk2 + (i3/ne3_ratio)*nbk3;
    for (int j0 = 0; j0 < n_kv; j0 += WARP_SIZE) {
        __syncthreads();   // (the first time: q_s is written; later: every warp is done with the last tile)
        for (int jj = warp; jj < WARP_SIZE; jj += NW) {
            const int j = j0 + jj;
            for (int d = lane; d < DK; d += WARP_SIZE) {
                k_s[jj*(DK + 1) + d] = j < n_kv ? oato_k_value<type_K>(k_head + j*nbk1, d) : 0.0f;
            }
        }
        __syncthreads();
        const int j = j0 + lane;
        if (j >= n_kv) {
            continue;
        }
        const float * k_row = k_s + lane*(DK + 1);
#pragma unroll
        for (int rr = 0; rr < RPW; ++rr) {
            if (!valid[rr]) {
                continue;
            }
            const float mv = m_row[rr] ? slope[rr]*__half2float(m_row[rr][j]) : 0.0f;
            if (mv == -INFINITY) {
                continue;
            }
            const float * q_row = q_s + (warp*RPW + rr)*DK;
            float s = 0.0f;
            for (int d = 0; d < DK; ++d) {
                s += q_row[d]*k_row[d];
            }
            s *= scale;
            if (logit_softcap != 0.0f) {
                s = logit_softcap*tanhf(s);
            }
            s += mv;
            if (s > M[rr]) {
                S[rr] = S[rr]*expf(M[rr] - s) + 1.0f;
                M[rr] = s;
            } else {
                S[rr] += expf(s - M[rr]);
            }
        }
    }

#pragma unroll
    for (int rr = 0; rr < RPW; ++rr) {
        const float M_w  = warp_reduce_max(M[rr]);
        const float S_w  = warp_reduce_sum(S[rr] > 0.0f ? S[rr]*expf(M[rr] - M_w) : 0.0f);
        const int   t    = t0 + warp*RPW + rr;
        if (lane != 0 || !valid[rr]) {
            continue;
        }
        const int   iq   = t/gqa_ratio;
        const int   h    = g*gqa_ratio + t % gqa_ratio;
        const float sink = sinks ? sinks[h] : -INFINITY;
        const float M_all = fmaxf(sink, M_w);
        float S_all = sinks ? expf(sink - M_all) : 0.0f;
        if (S_w > 0.0f) {
            S_all += S_w*expf(M_w - M_all);
        }
        L[h + n_head*(iq + n_q*i3)] = S_all == 0.0f ? -INFINITY : M_all + logf(S_all);
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

    const int DK        = Q->ne[0];
    const int gqa_ratio = Q->ne[2]/K->ne[2];
    const bool f16_K    = K->type == GGML_TYPE_F16;
#define OATO_LSE_ARGS \
        (const char *) Q->data, (const char *) K->data, mask ? (const char *) mask->data : nullptr, \
        sinks ? (const float *) sinks->data : nullptr, L.ptr, \
        DK, K->ne[1], n_head, Q->ne[1], gqa_ratio, Q->ne[3]/K->ne[3], \
        Q->nb[1], Q->nb[2], Q->nb[3], K->nb[1], K->nb[2], K->nb[3], \
        mask ? mask->nb[1] : 0, mask ? mask->nb[2] : 0, mask ? mask->nb[3] : 0, \
        mask ? mask->ne[2] : 1, mask ? mask->ne[3] : 1, \
        scale, logit_softcap, max_bias, m0, m1, n_head_log2
    if (Q->ne[1] >= OATO_LSE_TILED_MIN_QUERIES && DK <= 256) {
        // a batch of queries: the tiled kernel, 4 rows a warp up to DK 128 (16 KiB of q, 16.1 KiB of K), 1 above
        const int    n_rows_g = Q->ne[1]*gqa_ratio;
        const int    rpw      = DK <= 128 ? 4 : 1;
        const int    rt       = OATO_LSE_TILED_WARPS*rpw;
        const dim3   grid((n_rows_g + rt - 1)/rt, K->ne[2]*Q->ne[3], 1);
        const dim3   block(OATO_LSE_TILED_WARPS*WARP_SIZE, 1, 1);
        const size_t shared = (rt*DK + WARP_SIZE*(DK + 1))*sizeof(float);
        if (rpw == 4) {
            (f16_K ? oato_fattn_lse_tiled_kernel<OATO_LSE_TILED_WARPS, 4, GGML_TYPE_F16>
                   : oato_fattn_lse_tiled_kernel<OATO_LSE_TILED_WARPS, 4, GGML_TYPE_Q8_0>)
                <<<grid, block, shared, stream>>>(OATO_LSE_ARGS);
        } else {
            (f16_K ? oato_fattn_lse_tiled_kernel<OATO_LSE_TILED_WARPS, 1, GGML_TYPE_F16>
                   : oato_fattn_lse_tiled_kernel<OATO_LSE_TILED_WARPS, 1, GGML_TYPE_Q8_0>)
                <<<grid, block, shared, stream>>>(OATO_LSE_ARGS);
        }
    } else {
        const dim3   block(OATO_LSE_WARPS*WARP_SIZE, 1, 1);
        const size_t shared = DK*sizeof(float);
        (f16_K ? oato_fattn_lse_kernel<OATO_LSE_WARPS, GGML_TYPE_F16>
               : oato_fattn_lse_kernel<OATO_LSE_WARPS, GGML_TYPE_Q8_0>)<<<n_rows, block, shared, stream>>>(OATO_LSE_ARGS);
    }
#undef OATO_LSE_ARGS
    CUDA_CHECK(cudaGetLastError());

    // spread: [DV] rows -> [DV + 1] rows in place needs a copy of the first n_rows*DV floats
    ggml_cuda_pool_alloc<float> O(ctx.pool(), n_rows*DV);
    CUDA_CHECK(cudaMemcpyAsync(O.ptr, dst->data, n_rows*DV*sizeof(float), cudaMemcpyDeviceToDevice, stream));
    const int64_t n     = n_rows*(DV + 1);
    const int     bsize = 256;
    oato_fattn_lse_spread<<<(n + bsize - 1)/bsize, bsize, 0, stream>>>(O.ptr, L.ptr, (float *) dst->data, DV, n_rows);
    CUDA_CHECK(cudaGetLastError());
}
