// oatoplan: AVX-512 VNNI dot products, bit-identical to ggml's AVX2 ones; see oato-matvec.h for what and why.
//
// ggml's AVX2 Q4_K/Q6_K dot products (arch/x86/quants.c) keep one block's integer sum in 8 int32 lanes: lane k adds,
// for every 32-weight chunk, scale * (the products of bytes 4k..4k+3 of that chunk), then the block adds
// d * float(lane) to a float accumulator per lane with one FMA. Here one 512-bit step holds two chunks (lanes 0-7 the
// first, 8-15 the second), vpdpwssd multiplies by the scales and accumulates, and the two halves are added before
// the float step: the same int32 per lane, the same floats, in the same order.
//
// Compiled for the portable (AVX2) build too: the functions carry their own target attribute and are chosen at run
// time only on a CPU that has AVX-512 F/BW/VL/VNNI.
#include "oato-matvec.h"

#define GGML_COMMON_DECL_C
#include "ggml-common.h"

#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>

#include <stdlib.h>

// Weights are prefetched this far ahead of the block in use. The hardware prefetchers alone leave a core's dot
// products waiting on memory: measured on the H100 machine's Xeon, 16 threads, ggml's Q4_K kernel 71 GB/s, the
// same with a 2 KiB software prefetch ... (benchmarks/matvec_kernel.sh)
#ifndef OATO_PREFETCH_BYTES
#define OATO_PREFETCH_BYTES 2048
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

#define OATO_AVX2   __attribute__((target("avx2,fma,f16c")))
#define OATO_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))

// ggml's hsum_float_8: the same additions in the same order
OATO_AVX2 static inline float oato_hsum_float_8(const __m256 x) {
    __m128 res = _mm256_extractf128_ps(x, 1);
    res = _mm_add_ps(res, _mm256_castps256_ps128(x));
    res = _mm_add_ps(res, _mm_movehl_ps(res, res));
    res = _mm_add_ss(res, _mm_movehdup_ps(res));
    return _mm_cvtss_f32(res);
}

// vpermw indices: int16 lane l (0..31) takes lane first + l / span (one scale for `span` lanes)
OATO_AVX512 static inline __m512i oato_scale_index(int first, int span) {
    int16_t idx[32];
    for (int l = 0; l < 32; l++) {
        idx[l] = (int16_t) (first + l / span);
    }
    return _mm512_loadu_si512(idx);
}

// Q4_K (256 weights: 8 chunks of 32 with a 6-bit scale and min each; 4-bit quants, chunk 2j in the low and 2j+1 in
// the high nibbles of bytes 32j..32j+31) times Q8_K. As ggml_vec_dot_q4_K_q8_K's AVX2 branch.
OATO_AVX512 static void oato_vec_dot_q4_K_q8_K_avx512(int n, float * GGML_RESTRICT s, size_t bs,
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

    const __m512i m4 = _mm512_set1_epi8(0xF);
    // the 32 quant bytes of step j in both halves; shifted by 0 (low nibbles, chunk 2j) and 4 (chunk 2j+1)
    const __m512i nibble_shift = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(4), 1);
    __m512i scale_idx[QK_K/64];
    for (int j = 0; j < QK_K/64; ++j) {
        // int16 lanes 0-15 take scale 2j, lanes 16-31 scale 2j+1 (lanes 0-7 of the widened scales)
        scale_idx[j] = oato_scale_index(2*j, 16);
    }

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

        // int16 lanes 0-7: the chunk scales, 8-15: the chunk mins
        const __m256i mins_and_scales = _mm256_cvtepu8_epi16(_mm_set_epi32(utmp[3], utmp[2], utmp[1], utmp[0]));

        // the mins times the activation's 16-element sums, exactly as ggml (4 lanes)
        const __m256i q8sums = _mm256_loadu_si256((const __m256i *) y[i].bsums);
        const __m128i q8s = _mm_hadd_epi16(_mm256_extracti128_si256(q8sums, 0), _mm256_extracti128_si256(q8sums, 1));
        const __m128i prod = _mm_madd_epi16(_mm256_extracti128_si256(mins_and_scales, 1), q8s);
        acc_m = _mm_fmadd_ps(_mm_set1_ps(dmin), _mm_cvtepi32_ps(prod), acc_m);

        const __m512i scales = _mm512_castsi256_si512(mins_and_scales);
        const uint8_t * GGML_RESTRICT q4 = x[i].qs;
        const int8_t  * GGML_RESTRICT q8 = y[i].qs;

        __m512i sumi = _mm512_setzero_si512();
        for (int j = 0; j < QK_K/64; ++j) {
            const __m512i q4bits = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (q4 + 32*j)));
            const __m512i q4lh = _mm512_and_si512(_mm512_srlv_epi16(q4bits, nibble_shift), m4);
            const __m512i q8lh = _mm512_loadu_si512((const void *) (q8 + 64*j));
            const __m512i p16 = _mm512_maddubs_epi16(q4lh, q8lh);   // ggml: p16l | p16h
            const __m512i sc = _mm512_permutexvar_epi16(scale_idx[j], scales);
            sumi = _mm512_dpwssd_epi32(sumi, p16, sc);            // ggml: madd_epi16(scale, p16) + add
        }
        const __m256i sumi8 = _mm256_add_epi32(_mm512_castsi512_si256(sumi), _mm512_extracti64x4_epi64(sumi, 1));
        acc = _mm256_fmadd_ps(_mm256_set1_ps(d), _mm256_cvtepi32_ps(sumi8), acc);
    }

    acc_m = _mm_add_ps(acc_m, _mm_movehl_ps(acc_m, acc_m));
    acc_m = _mm_add_ss(acc_m, _mm_movehdup_ps(acc_m));

    *s = oato_hsum_float_8(acc) + _mm_cvtss_f32(acc_m);
}

// Q6_K (256 weights: 16 chunks of 16 with an 8-bit scale each; 6-bit quants as 4 low bits in ql, 2 high in qh,
// stored +32) times Q8_K. As ggml_vec_dot_q6_K_q8_K's AVX2 branch: per half block j, ggml's q4_0|q4_1 (ql bytes
// 64j..64j+63) and q4_2|q4_3 are one 512-bit value each.
OATO_AVX512 static void oato_vec_dot_q6_K_q8_K_avx512(int n, float * GGML_RESTRICT s, size_t bs,
                                                      const void * GGML_RESTRICT vx, size_t bx,
                                                      const void * GGML_RESTRICT vy, size_t by, int nrc) {
    (void) bs; (void) bx; (void) by; (void) nrc;
    const block_q6_K * GGML_RESTRICT x = vx;
    const block_q8_K * GGML_RESTRICT y = vy;
    const int nb = n / QK_K;

    const __m512i m15 = _mm512_set1_epi8(15);
    // high bits for q4_0 | q4_1: (qh & 3) << 4 | (qh & 12) << 2; for q4_2 | q4_3: (qh & 48) | (qh & 192) >> 2
    const __m512i mask_01  = _mm512_inserti64x4(_mm512_set1_epi8(3), _mm256_set1_epi8(12), 1);
    const __m512i shift_01 = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i mask_23  = _mm512_inserti64x4(_mm512_set1_epi8(48), _mm256_set1_epi8((char) 192), 1);
    const __m512i shift_23 = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
    __m512i scale_idx[QK_K/64];   // j = 0, 1 for q4_0|q4_1 and q4_2|q4_3: int16 lane l takes scale 8j (+4) + l/8
    for (int j = 0; j < QK_K/128; ++j) {
        scale_idx[2*j + 0] = oato_scale_index(8*j + 0, 8);
        scale_idx[2*j + 1] = oato_scale_index(8*j + 4, 8);
    }

    __m256 acc = _mm256_setzero_ps();

    for (int i = 0; i < nb; ++i) {
        OATO_PREFETCH_BLOCK(x + i, sizeof(block_q6_K));
        const float d = y[i].d * _cvtsh_ss(x[i].d);

        const uint8_t * GGML_RESTRICT ql = x[i].ql;
        const uint8_t * GGML_RESTRICT qh = x[i].qh;
        const int8_t  * GGML_RESTRICT q8 = y[i].qs;

        // the +32 offset, through the activation's 16-element sums, exactly as ggml
        const __m256i q8sums = _mm256_loadu_si256((const __m256i *) y[i].bsums);
        const __m128i scales = _mm_loadu_si128((const __m128i *) x[i].scales);
        const __m256i scales_16 = _mm256_cvtepi8_epi16(scales);
        const __m256i q8sclsub = _mm256_slli_epi32(_mm256_madd_epi16(q8sums, scales_16), 5);
        const __m512i scales_512 = _mm512_castsi256_si512(scales_16);

        __m512i sumi = _mm512_setzero_si512();
        for (int j = 0; j < QK_K/128; ++j) {
            const __m512i q4bits = _mm512_loadu_si512((const void *) (ql + 64*j));   // ggml: q4bits1 | q4bits2
            const __m512i hbits = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *) (qh + 32*j)));

            const __m512i q4h_01 = _mm512_sllv_epi16(_mm512_and_si512(hbits, mask_01), shift_01);
            const __m512i q4h_23 = _mm512_srlv_epi16(_mm512_and_si512(hbits, mask_23), shift_23);
            const __m512i q4_01 = _mm512_or_si512(_mm512_and_si512(q4bits, m15), q4h_01);
            const __m512i q4_23 = _mm512_or_si512(_mm512_and_si512(_mm512_srli_epi16(q4bits, 4), m15), q4h_23);

            const __m512i q8_01 = _mm512_loadu_si512((const void *) (q8 + 128*j));
            const __m512i q8_23 = _mm512_loadu_si512((const void *) (q8 + 128*j + 64));

            const __m512i p16_01 = _mm512_maddubs_epi16(q4_01, q8_01);
            const __m512i p16_23 = _mm512_maddubs_epi16(q4_23, q8_23);

            sumi = _mm512_dpwssd_epi32(sumi, p16_01, _mm512_permutexvar_epi16(scale_idx[2*j + 0], scales_512));
            sumi = _mm512_dpwssd_epi32(sumi, p16_23, _mm512_permutexvar_epi16(scale_idx[2*j + 1], scales_512));
        }
        __m256i sumi8 = _mm256_add_epi32(_mm512_castsi512_si256(sumi), _mm512_extracti64x4_epi64(sumi, 1));
        sumi8 = _mm256_sub_epi32(sumi8, q8sclsub);
        acc = _mm256_fmadd_ps(_mm256_broadcast_ss(&d), _mm256_cvtepi32_ps(sumi8), acc);
    }

    *s = oato_hsum_float_8(acc);
}

// ggml_vec_dot_q4_K_q8_K's AVX2 branch as it is, plus the prefetch (for CPUs without AVX-512 VNNI)
OATO_AVX2 static void oato_vec_dot_q4_K_q8_K_avx2(int n, float * GGML_RESTRICT s, size_t bs,
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
            // ggml's get_scale_shuffle_k4(2j), (2j+1): int16 lanes all scale 2j, 2j+1
            const __m256i scale_l = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short) (0x0100 * (4*j + 1) + 4*j)));
            const __m256i scale_h = _mm256_shuffle_epi8(scales, _mm256_set1_epi16((short) (0x0100 * (4*j + 3) + 4*j + 2)));

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

// ggml_vec_dot_q6_K_q8_K's AVX2 branch as it is, plus the prefetch
OATO_AVX2 static void oato_vec_dot_q6_K_q8_K_avx2(int n, float * GGML_RESTRICT s, size_t bs,
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

            // ggml's get_scale_shuffle(is + m): bytes 0-7 scale 2(is+m), bytes 8-15 scale 2(is+m)+1
            const __m128i scale_0 = _mm_shuffle_epi8(scales, _mm_set_epi64x(0x0101010101010101ll * (2*is + 1), 0x0101010101010101ll * (2*is + 0)));
            const __m128i scale_1 = _mm_shuffle_epi8(scales, _mm_set_epi64x(0x0101010101010101ll * (2*is + 3), 0x0101010101010101ll * (2*is + 2)));
            const __m128i scale_2 = _mm_shuffle_epi8(scales, _mm_set_epi64x(0x0101010101010101ll * (2*is + 5), 0x0101010101010101ll * (2*is + 4)));
            const __m128i scale_3 = _mm_shuffle_epi8(scales, _mm_set_epi64x(0x0101010101010101ll * (2*is + 7), 0x0101010101010101ll * (2*is + 6)));
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

// Which kernels this CPU runs: 2 AVX-512 VNNI, 1 AVX2, 0 ggml's own. OATO_CPU_MATVEC=avx2 or =ggml picks a lower
// one (to compare kernels on one machine). Read once; every thread computes the same value, no ordering needed.
static int oato_matvec_level(void) {
    static int level = -1;
    if (level < 0) {
        __builtin_cpu_init();
        const int has_avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
                             __builtin_cpu_supports("f16c");
        const int has_vnni = has_avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
        const char * env = getenv("OATO_CPU_MATVEC");
        int cap = 2;
        if (env != NULL && strcmp(env, "avx2") == 0) {
            cap = 1;
        } else if (env != NULL && strcmp(env, "ggml") == 0) {
            cap = 0;
        }
        level = has_vnni ? 2 : has_avx2 ? 1 : 0;
        level = level < cap ? level : cap;
    }
    return level;
}

ggml_vec_dot_t oato_cpu_fast_vec_dot(enum ggml_type type) {
    const int level = oato_matvec_level();
    switch (type) {
        case GGML_TYPE_Q4_K: return level == 2 ? oato_vec_dot_q4_K_q8_K_avx512 :
                                    level == 1 ? oato_vec_dot_q4_K_q8_K_avx2 : NULL;
        case GGML_TYPE_Q6_K: return level == 2 ? oato_vec_dot_q6_K_q8_K_avx512 :
                                    level == 1 ? oato_vec_dot_q6_K_q8_K_avx2 : NULL;
        default:             return NULL;
    }
}

#else

ggml_vec_dot_t oato_cpu_fast_vec_dot(enum ggml_type type) {
    (void) type;
    return NULL;
}

#endif
