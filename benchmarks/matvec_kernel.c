// Batch-1 mat-vec kernels on this CPU: ggml's vec_dot (from a libggml-cpu) against oatoplan's
// (native/ggml-cpu/oato-matvec.c), and a plain read of the same bytes (what the memory gives), at several thread
// counts. Run by benchmarks/matvec_kernel.sh, which compiles this file against the vendored ggml and writes JSON lines:
//   {"check": type, "rows": n, "mismatches": m}   bitwise comparison of both kernels on random rows
//   {"kernel": k, "type": t, "threads": n, "gbps": [...], "bytes": b}   weight GB/s per repetition
// The weights mimic a decode's CPU half: matrices of 18944 x 3584 (ffn_gate/up shape), random but valid blocks, each
// matrix a parallel loop with a barrier at its end, as ggml runs one MUL_MAT node; rows in chunks of 32 per thread.
#include "ggml.h"
#include "ggml-cpu.h"
#include "oato-matvec.h"

#include <omp.h>
#include <immintrin.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;
static uint64_t rng(void) {   // xorshift64*
    rng_state ^= rng_state >> 12; rng_state ^= rng_state << 25; rng_state ^= rng_state >> 27;
    return rng_state * 0x2545F4914F6CDD1Dull;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

// random bytes, then a valid fp16 scale (and min) in every block: 0.0005..0.02, as quantized weights have
static void fill_weights(enum ggml_type type, uint8_t * w, size_t bytes) {
    #pragma omp parallel
    {
        uint64_t st = 0x1234567ull + 7919ull * (uint64_t) omp_get_thread_num();
        #pragma omp for schedule(static)
        for (size_t i = 0; i < bytes / 8; i++) {
            st ^= st >> 12; st ^= st << 25; st ^= st >> 27;
            ((uint64_t *) w)[i] = st * 0x2545F4914F6CDD1Dull;
        }
    }
    const size_t block = ggml_type_size(type);
    for (size_t off = 0; off + block <= bytes; off += block) {
        const float scale = 0.0005f + (float) (rng() % 1000) * 0.00002f;
        const uint16_t h = _cvtss_sh(scale, 0);
        if (type == GGML_TYPE_Q4_K) {         // d, dmin first
            memcpy(w + off, &h, 2);
            const uint16_t hm = _cvtss_sh(scale * 0.5f, 0);
            memcpy(w + off + 2, &hm, 2);
        } else {                              // Q6_K: d last
            memcpy(w + off + block - 2, &h, 2);
        }
    }
}

typedef void (*row_kernel)(int n, float * s, const void * w, const void * xq, ggml_vec_dot_t dot);

static void run_dot(int n, float * s, const void * w, const void * xq, ggml_vec_dot_t dot) {
    dot(n, s, 0, w, 0, xq, 0, 1);
}

// a plain AVX2 read of the row's bytes, summed so that the compiler keeps the loads
static void run_read(int n, float * s, const void * w, const void * xq, ggml_vec_dot_t dot) {
    (void) xq;
    const size_t bytes = (size_t) n;   // n is the row's byte count here
    const __m256i * p = (const __m256i *) w;
    __m256i a0 = _mm256_setzero_si256(), a1 = a0, a2 = a0, a3 = a0;
    size_t i = 0;
    for (; (i + 4) * 32 <= bytes; i += 4) {
        a0 = _mm256_add_epi32(a0, _mm256_loadu_si256(p + i + 0));
        a1 = _mm256_add_epi32(a1, _mm256_loadu_si256(p + i + 1));
        a2 = _mm256_add_epi32(a2, _mm256_loadu_si256(p + i + 2));
        a3 = _mm256_add_epi32(a3, _mm256_loadu_si256(p + i + 3));
    }
    a0 = _mm256_add_epi32(_mm256_add_epi32(a0, a1), _mm256_add_epi32(a2, a3));
    *s = (float) _mm256_extract_epi32(a0, 0);
    (void) dot;
}

// one pass over all matrices with nthreads; returns seconds
static double pass(const uint8_t * w, size_t n_mats, int64_t rows, int n, size_t row_bytes, const void * xq,
                   float * y, int nthreads, row_kernel kernel, ggml_vec_dot_t dot) {
    const int len = kernel == run_read ? (int) row_bytes : n;
    const double t0 = now_s();
    #pragma omp parallel num_threads(nthreads)
    for (size_t m = 0; m < n_mats; m++) {
        const uint8_t * mat = w + m * rows * row_bytes;
        #pragma omp for schedule(dynamic, 32)
        for (int64_t r = 0; r < rows; r++) {
            kernel(len, &y[r], mat + r * row_bytes, xq, dot);
        }
    }
    return now_s() - t0;
}

int main(int argc, char ** argv) {
    const double gib = argc > 1 ? atof(argv[1]) : 1.5;          // weight bytes per type
    const char * threads_arg = argc > 2 ? argv[2] : "1,8,16";
    const int reps = argc > 3 ? atoi(argv[3]) : 5;
    ggml_cpu_init();

    const enum ggml_type types[2] = { GGML_TYPE_Q4_K, GGML_TYPE_Q6_K };
    const int64_t rows = 18944;
    const int n = 3584;

    // activation: random floats quantized by ggml to Q8_K
    float * x = malloc(sizeof(float) * 18944);
    for (int i = 0; i < 18944; i++) {
        x[i] = (float) ((double) (rng() % 2000001) / 1000000.0 - 1.0);
    }
    const struct ggml_type_traits_cpu * q8 = ggml_get_type_traits_cpu(GGML_TYPE_Q8_K);
    void * xq = malloc(ggml_row_size(GGML_TYPE_Q8_K, 18944));
    q8->from_float(x, xq, 18944);
    float * y = malloc(sizeof(float) * rows);

    for (int t = 0; t < 2; t++) {
        const enum ggml_type type = types[t];
        const ggml_vec_dot_t ggml_dot = ggml_get_type_traits_cpu(type)->vec_dot;
        const ggml_vec_dot_t oato_dot = oato_cpu_vec_dot(type) != ggml_dot ? oato_cpu_vec_dot(type) : NULL;
        const size_t row_bytes = ggml_row_size(type, n);
        size_t n_mats = (size_t) (gib * (1u << 30) / (rows * row_bytes));
        n_mats = n_mats > 0 ? n_mats : 1;
        const size_t bytes = n_mats * rows * row_bytes;
        uint8_t * w = aligned_alloc(64, bytes + 4096);
        fill_weights(type, w, bytes);

        // bitwise check on 20000 rows of n = 3584 and 2000 rows read as n = 18944 (ffn_down's width)
        if (oato_dot != NULL) {
            const int widths[2] = { n, 18944 };
            for (int k = 0; k < 2; k++) {
                const size_t rb = ggml_row_size(type, widths[k]);
                const int n_rows = k == 0 ? 20000 : 2000;
                long mismatches = 0;
                for (int r = 0; r < n_rows; r++) {
                    const uint8_t * row = w + (size_t) (rng() % (bytes / rb - 1)) * rb;
                    float a, b;
                    ggml_dot(widths[k], &a, 0, row, 0, xq, 0, 1);
                    oato_dot(widths[k], &b, 0, row, 0, xq, 0, 1);
                    mismatches += memcmp(&a, &b, sizeof(float)) != 0;
                }
                printf("{\"check\": \"%s\", \"n\": %d, \"rows\": %d, \"mismatches\": %ld}\n", ggml_type_name(type),
                       widths[k], n_rows, mismatches);
            }
        } else {
            printf("{\"check\": \"%s\", \"skipped\": \"no oatoplan kernel for this type and build\"}\n",
                   ggml_type_name(type));
        }
        fflush(stdout);

        const char * names[3] = { "read", "ggml", "oato" };
        const row_kernel kernels[3] = { run_read, run_dot, run_dot };
        const ggml_vec_dot_t dots[3] = { NULL, ggml_dot, oato_dot };
        char list[256];
        snprintf(list, sizeof(list), "%s", threads_arg);
        for (char * tok = strtok(list, ","); tok != NULL; tok = strtok(NULL, ",")) {
            const int nthreads = atoi(tok);
            double gbps[3][64];
            for (int rep = 0; rep < reps && rep < 64; rep++) {   // kernels interleaved within each repetition
                for (int k = 0; k < 3; k++) {
                    if (k > 0 && dots[k] == NULL) {
                        continue;
                    }
                    const double sec = pass(w, n_mats, rows, n, row_bytes, xq, y, nthreads, kernels[k], dots[k]);
                    gbps[k][rep] = bytes / sec / 1e9;
                }
            }
            for (int k = 0; k < 3; k++) {
                if (k > 0 && dots[k] == NULL) {
                    continue;
                }
                printf("{\"kernel\": \"%s\", \"type\": \"%s\", \"threads\": %d, \"bytes\": %zu, \"gbps\": [", names[k],
                       ggml_type_name(type), nthreads, bytes);
                for (int rep = 0; rep < reps; rep++) {
                    printf("%s%.2f", rep ? ", " : "", gbps[k][rep]);
                }
                printf("]}\n");
            }
            fflush(stdout);
        }
        free(w);
    }
    free(x); free(xq); free(y);
    return 0;
}
