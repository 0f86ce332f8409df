// oatoplan: ggml's Q4_K/Q6_K dot products with software prefetch; see oato-matvec.h for what and why.
//
// The two kernels below are the AVX2 branches of ggml_vec_dot_q4_K_q8_K and ggml_vec_dot_q6_K_q8_K
// (ggml-cpu/arch/x86/quants.c, llama.cpp as vendored in llama-cpp-python 0.3.36) with one change: each block first
// prefetches the weights OATO_PREFETCH_BYTES ahead. The arithmetic is ggml's, instruction for instruction (the scale
// shuffles are written as constants instead of table loads), so the results are bit-identical
// (tests/test_matvec.py and benchmarks/matvec_kernel.sh compare them bit for bit).
#include "oato-matvec.h"

#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include <stdlib.h>
#include <string.h>

static int oato_matvec_state = -1; // -1: environment not read yet; all threads read the same value

int oato_cpu_matvec_enabled(void) {
    if (oato_matvec_state < 0) {
        const char * env = getenv("OATO_CPU_MATVEC");
        oato_matvec_state = (env != NULL && strcmp(env, "ggml") == 0) ? 0 : 1;
    }
    return oato_matvec_state;
}

void oato_cpu_matvec_set_enabled(int enabled) {
    oato_matvec_state = enabled ? 1 : 0;
}

// ggml's own kernel is its AVX2 branch exactly when this file (built with ggml-cpu's flags) sees AVX2, FMA and F16C
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>

// How far ahead of the block in use the weights are prefetched, and into which cache. Measured on the H100
// machine's Xeon (16 threads, benchmarks/results/2026-11-23-h100-matvec-kernel-prefetch-sweep.txt): Q4_K 71 GB/s
// without, 88-102 with 1-6 KiB; on the 2-core EPYC developer machine 4 KiB into L1 was best.
#ifndef OATO_PREFETCH_BYTES
#define OATO_PREFETCH_BYTES 4096
#endif
#ifndef OATO_PREFETCH_HINT
#define OATO_PREFETCH_HINT _MM_HINT_T0
#endif

// every 64-byte line of [p + OATO_PREFETCH_BYTES, + block_bytes): consecutive blocks leave no line out
#define OATO_PREFETCH_BLOCK(p, block_bytes)                                                       \
    do {                                                                                          \
        for (int oato_l = 0; oato_l < (int) (block_bytes); oato_l += 64) {                        \
            _mm_prefetch((const char *) (p) + OATO_PREFETCH_BYTES + oato_l, OATO_PREFETCH_HINT);  \
        }                                                                                         \
    } while (0)

// ggml's hsum_float_8: the same additions in the same order
static inline float oato_hsum_float_8(const __m256 x) {
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

// ggml_vec_dot_q4_K_q8_K's AVX2 branch, plus the prefetch
static void oato_vec_dot_q4_K_q8_K(int n, float * GGML_RESTRICT s, size_t bs,
                                                  const void * GGML_RESTRICT vx, size_t bx,
                                                  const void * GGML_RESTRICT vy, size_t by, int nrc) {
    (void) bs; (void) bx; (void) by; (void) nrc;
    const block_q4_K * GGML_RESTRICT x = vx;
    const block_q8_K * GGML_RESTRICT y = vy;
    const int nb = n / QK_K;

    const uint32_t kmask1 = 0x3f3f3f3f;
    const uint32_t kmask2 = 0x0f0f0f0f;
    const uint32_t kmask3 = 0x03030303;
    uint32_t utmp[4];

    const __m256i m4 = _mm256_set1_epi8(0xF);
    __m256 acc = _mm256_setzero_ps();
    __m128 acc_m = _mm_setzero_ps();

    for (int i = 0; i < nb; ++i) {
        OATO_PREFETCH_BLOCK(x + i, sizeof(block_q4_K));
        const float d = y[i].d * _cvtsh_ss(x[i].d);
        const float dmin = -y[i].d * _cvtsh_ss(x[i].dmin);

        memcpy(utmp, x[i].scales, 12);
        utmp[3] = ((utmp[2] >> 4) & kmask2) | (((utmp[1] >> 6) & kmask3) << 4);
        const uint32_t uaux = utmp[1] & kmask1;
        utmp[1] = (utmp[2] & kmask2) | (((utmp[0] >> 6) & kmask3) << 4);
        utmp[2] = uaux;
        utmp[0] &= kmask1;

        const uint8_t * GGML_RESTRICT q4 = x[i].qs;
        const int8_t  * GGML_RESTRICT q8 = y[i].qs;

        const __m256i mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(utmp[3], utmp[2], utmp[1], utmp[0]));

        const __m256i q8sums = _mm256_loadu_si256((const __m256i *) y[i].bsums);
        const __m128i q8s = _mm_hadd_epi16(_mm256_extracti128_si256(q8sums, 0), _mm256_extracti128_si256(q8sums, 1));
        const __m128i prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

        const __m128i sc128  = _mm256_extracti128_si256(mins_and_scales, 0);
        const __m256i scales = _mm256_set_m128i(sc128, sc128);

        __m256i sumi = _mm256_setzero_si256();
        for (int j = 0; j < QK_K/64; ++j) {
            // ggml's get_scale_shuffle_k4(2j) and (2j+1): every int16 lane takes scale 2j, resp. 2j+1
            const __m256i scale_l = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short) (0x0100 * (4*j + 1) + 4*j)));
            const __m256i scale_h = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short) (0x0101 * (4*j + 2) + 0x0100)));

            const __m256i q4bits = _mm256_loadu_si256((const __m256i *) q4); q4 += 32;
            const __m256i q4l = _mm256_and_si256(q4bits, m4);
            const __m256i q4h = _mm256_and_si256(_mm256_srli_epi16(q4bits, 4), m4);

            const __m256i q8l = _mm256_loadu_si256((const __m256i *) q8); q8 += 32;
            __m256i p16l = _mm256_maddubs_epi16(q4l, q8l);
            p16l = _mm256_madd_epi16(scale_l, p16l);

            const __m256i q8h = _mm256_loadu_si256((const __m256i *) q8); q8 += 32;
            __m256i p16h = _mm256_maddubs_epi16(q4h, q8h);
            p16h = _mm256_madd_epi16(scale_h, p16h);
            const __m256i sumj = _mm256_add_epi32(p16l, p16h);

            sumi = _mm256_add_epi32(sumi, sumj);
        }

        __m256 vd = _mm256_set1_ps(d);
        acc = _mm256_fmadd_ps(vd, _mm256_cvtepi32_ps(sumi), acc);
    }

    acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));

    *s = oato_hsum_float_8(acc) + _mm_cvtss_f32(acc_m);
}

#define OATO_Q6_K_SCALE_SHUFFLE(i) \
    _mm_set_epi64x(0x0101010101010101ll * (2*(i) + 1), 0x0101010101010101ll * (2*(i)))

// ggml_vec_dot_q6_K_q8_K's AVX2 branch, plus the prefetch
static void oato_vec_dot_q6_K_q8_K(int n, float * GGML_RESTRICT s, size_t bs,
                                                  const void * GGML_RESTRICT vx, size_t bx,
                                                  const void * GGML_RESTRICT vy, size_t by, int nrc) {
    (void) bs; (void) bx; (void) by; (void) nrc;
    const block_q6_K * GGML_RESTRICT x = vx;
    const block_q8_K * GGML_RESTRICT y = vy;
    const int nb = n / QK_K;

    const __m256i m3 = _mm256_set1_epi8(3);
    const __m256i m15 = _mm256_set1_epi8(15);

    __m256 acc = _mm256_setzero_ps();

    for (int i = 0; i < nb; ++i) {
        OATO_PREFETCH_BLOCK(x + i, sizeof(block_q6_K));
        const float d = y[i].d * _cvtsh_ss(x[i].d);

        const uint8_t * GGML_RESTRICT q4 = x[i].ql;
        const uint8_t * GGML_RESTRICT qh = x[i].qh;
        const int8_t  * GGML_RESTRICT q8 = y[i].qs;

        const __m256i q8sums = _mm256_loadu_si256((const __m256i *) y[i].bsums);
        const __m128i scales = _mm_loadu_si128((const __m128i *) x[i].scales);
        const __m256i scales_16 = _mm256_cvtepi8_epi16(scales);
        const __m256i q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales_16), 5);

        __m256i sumi = _mm256_setzero_si256();

        int is = 0;
        for (int j = 0; j < QK_K/128; ++j) {
            const __m256i q4bits1 = _mm256_loadu_si256((const __m256i *) q4); q4 += 32;
            const __m256i q4bits2 = _mm256_loadu_si256((const __m256i *) q4); q4 += 32;
            const __m256i q4bitsH = _mm256_loadu_si256((const __m256i *) qh); qh += 32;

            const __m256i q4h_0 = _mm256_slli_epi16(_mm256_and_si256(q4bitsH, m3), 4);
            const __m256i q4h_1 = _mm256_slli_epi16(_mm256_and_si256(q4bitsH, _mm256_set1_epi8(12)), 2);
            const __m256i q4h_2 = _mm256_and_si256(q4bitsH, _mm256_set1_epi8(48));
            const __m256i q4h_3 = _mm256_srli_epi16(_mm256_and_si256(q4bitsH, _mm256_set1_epi8(-64)), 2);

            const __m256i q4_0 = _mm256_or_si256(_mm256_and_si256(q4bits1, m15), q4h_0);
            const __m256i q4_1 = _mm256_or_si256(_mm256_and_si256(q4bits2, m15), q4h_1);
            const __m256i q4_2 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits1, 4), m15), q4h_2);
            const __m256i q4_3 = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(q4bits2, 4), m15), q4h_3);

            const __m256i q8_0 = _mm256_loadu_si256((const __m256i *) q8); q8 += 32;
            const __m256i q8_1 = _mm256_loadu_si256((const __m256i *) q8); q8 += 32;
            const __m256i q8_2 = _mm256_loadu_si256((const __m256i *) q8); q8 += 32;
            const __m256i q8_3 = _mm256_loadu_si256((const __m256i *) q8); q8 += 32;

            __m256i p16_0 = _mm256_maddubs_epi16(q4_0, q8_0);
            __m256i p16_1 = _mm256_maddubs_epi16(q4_1, q8_1);
            __m256i p16_2 = _mm256_maddubs_epi16(q4_2, q8_2);
            __m256i p16_3 = _mm256_maddubs_epi16(q4_3, q8_3);

            // ggml's get_scale_shuffle(is + m): bytes 0-7 take scale 2(is+m), bytes 8-15 scale 2(is+m)+1
            const __m128i scale_0 = _mm_shuffle_epi8(scales, OATO_Q6_K_SCALE_SHUFFLE(is + 0));
            const __m128i scale_1 = _mm_shuffle_epi8(scales, OATO_Q6_K_SCALE_SHUFFLE(is + 1));
            const __m128i scale_2 = _mm_shuffle_epi8(scales, OATO_Q6_K_SCALE_SHUFFLE(is + 2));
            const __m128i scale_3 = _mm_shuffle_epi8(scales, OATO_Q6_K_SCALE_SHUFFLE(is + 3));
            is += 4;

            p16_0 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale_0), p16_0);
            p16_1 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale_1), p16_1);
            p16_2 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale_2), p16_2);
            p16_3 = _mm256_madd_epi16(_mm256_cvtepi8_epi16(scale_3), p16_3);

            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16_0, p16_1));
            sumi = _mm256_add_epi32(sumi, _mm256_add_epi32(p16_2, p16_3));
        }

        sumi = _mm256_sub_epi32(sumi, q8sclsub);
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi), acc);
    }

    *s = oato_hsum_float_8(acc);
}

ggml_vec_dot_t oato_cpu_vec_dot(enum ggml_type type) {
    if (oato_cpu_matvec_enabled()) {
        if (type == GGML_TYPE_Q4_K) {
            return oato_vec_dot_q4_K_q8_K;
        }
        if (type == GGML_TYPE_Q6_K) {
            return oato_vec_dot_q6_K_q8_K;
        }
    }
    return ggml_get_type_traits_cpu(type)->vec_dot;
}

#else

ggml_vec_dot_t oato_cpu_vec_dot(enum ggml_type type) {
    return ggml_get_type_traits_cpu(type)->vec_dot;
}

#endif
