/* What kernels.c (the merges) and row_sums.c (the analysis) share: the block size, the dtype conversion, and the
 * one parameter struct of each kernel family, the boundary with merging/native/abi.py.
 *
 * Every kernel takes a pointer to its family's struct, which describes a whole band (each pointer is to the band's
 * element 0), and the range [begin, end) of that band one thread computes (elements; rows for ms_row_sums). The
 * Python side fills one struct per band and hands the same one to every thread, so that a range costs a call and
 * nothing more; the kernels only read it.
 *
 * Each struct's fields are listed once, as F(type, name) in an X-macro, and expanded twice: into the typedef
 * below, and into the layout table that kernels.c exports (ms_sizeof, ms_field). abi.py declares the same fields
 * in the same order as ctypes.Structures and refuses a library whose sizes, names or offsets differ, since a
 * field that is out of step there would otherwise be read as garbage without any error.
 */
#ifndef MS_KERNELS_H
#define MS_KERNELS_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef __F16C__
#include <immintrin.h>
#endif

#define BLOCK 1024          /* elements converted at a time: a float32 block is 4 KB */
#define MAX_INPUTS 32
#define SUM_BLOCK 65536     /* partial sums are returned per this many elements, whatever the thread split */

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

#define MS_DECLARE(type, name) type name;

/* ms_weighted_sum: out = sum_j c[j] * x[j], then divided by `divide` (1: no division) */
#define MS_WEIGHTED_SUM_ARGS(F)                                                                                  \
    F(const void *const *, x)   /* the m inputs */                                                               \
    F(const int32_t *, dt)      /* their dtype codes */                                                          \
    F(const float *, c)                                                                                          \
    F(void *, out)                                                                                               \
    F(int32_t, m)                                                                                                \
    F(int32_t, out_dt)                                                                                           \
    F(float, divide)
typedef struct { MS_WEIGHTED_SUM_ARGS(MS_DECLARE) } ms_weighted_sum_args;

/* ms_task_vectors: the task-vector family's merge (see the kernel for the formulas). Per model i: thr[2i], thr[2i+1]
 * and tie_end[2i], tie_end[2i+1] are cuts A and B (mode 1), with tie ends as flat indices in the band; keys[i] and
 * keep24[i] its draws (mode 2), made at flat index start + element. */
#define MS_TASK_VECTORS_ARGS(F)                                                                                  \
    F(const void *, base)                                                                                        \
    F(const void *const *, x)                                                                                    \
    F(const int32_t *, dt)                                                                                       \
    F(const float *, w)                                                                                          \
    F(const float *, scale)                                                                                      \
    F(const float *, thr)                                                                                        \
    F(const int64_t *, tie_end)                                                                                  \
    F(const uint64_t *, keys)                                                                                    \
    F(const uint32_t *, keep24)                                                                                  \
    F(void *, out)                                                                                               \
    F(int64_t, start)           /* the tensor's flat index of the band's element 0 */                            \
    F(int32_t, m)                                                                                                \
    F(int32_t, base_dt)                                                                                          \
    F(int32_t, out_dt)                                                                                           \
    F(int32_t, mode)            /* 0: keep all; 1: magnitude cuts; 2: random draws */                            \
    F(int32_t, has_drop)        /* mode 1: cut B is used */                                                      \
    F(int32_t, consensus)                                                                                        \
    F(int32_t, normalize)                                                                                        \
    F(float, divisor)                                                                                            \
    F(float, lam)
typedef struct { MS_TASK_VECTORS_ARGS(MS_DECLARE) } ms_task_vectors_args;

/* ms_bracket, ms_tie_end and ms_strided_magnitudes, top-k selection's passes over |t|, t = x - b (x itself when
 * base is NULL): ms_bracket counts |t| > hi and collects |t| in [lo, hi]; ms_tie_end finds the `ties`-th |t| equal
 * to hi; ms_strided_magnitudes writes |t| of every `stride`-th element to out (the sample that brackets a cut);
 * ms_count_nonfinite counts x's NaN/Inf. */
#define MS_MAGNITUDE_ARGS(F)                                                                                     \
    F(const void *, base)                                                                                        \
    F(const void *, x)                                                                                           \
    F(int64_t, ties)                                                                                             \
    F(int32_t, base_dt)                                                                                          \
    F(int32_t, dt)                                                                                               \
    F(float, lo)                                                                                                 \
    F(float, hi)                                                                                                 \
    F(float *, out)                                                                                              \
    F(int64_t, stride)
typedef struct { MS_MAGNITUDE_ARGS(MS_DECLARE) } ms_magnitude_args;

/* What ms_bracket finds in one range: the only per-range output that is not a slice of a band-wide tensor. */
#define MS_BRACKET_FOUND(F)                                                                                      \
    F(float *, values)          /* room for `cap` + 1 values: the last is scratch */                             \
    F(int64_t, cap)                                                                                              \
    F(int64_t, above)                                                                                            \
    F(int64_t, inside)          /* may exceed cap: then only cap were stored */
typedef struct { MS_BRACKET_FOUND(MS_DECLARE) } ms_bracket_found;

/* ms_random_l1: DARE's L1 norms, before[block] and after[block] per SUM_BLOCK elements of the band */
#define MS_RANDOM_L1_ARGS(F)                                                                                     \
    F(const void *, base)                                                                                        \
    F(const void *, x)                                                                                           \
    F(double *, before)                                                                                          \
    F(double *, after)                                                                                           \
    F(uint64_t, key)                                                                                             \
    F(int64_t, start)                                                                                            \
    F(uint32_t, keep24)                                                                                          \
    F(int32_t, base_dt)                                                                                          \
    F(int32_t, dt)
typedef struct { MS_RANDOM_L1_ARGS(MS_DECLARE) } ms_random_l1_args;

/* ms_emr: tau_out and masks may be NULL; sums has 3 * m doubles per SUM_BLOCK elements of the band */
#define MS_EMR_ARGS(F)                                                                                           \
    F(const void *, base)                                                                                        \
    F(const void *const *, x)                                                                                    \
    F(const int32_t *, dt)                                                                                       \
    F(void *, tau_out)                                                                                           \
    F(uint8_t *const *, masks)  /* one bit per element, m of them */                                             \
    F(double *, sums)                                                                                            \
    F(int32_t, m)                                                                                                \
    F(int32_t, base_dt)                                                                                          \
    F(int32_t, tau_dt)
typedef struct { MS_EMR_ARGS(MS_DECLARE) } ms_emr_args;

/* ms_row_sums: (rows, cols) tensors; tie_end[i] is a flat index in the band; merged and uni may be NULL; out has
 * ms_row_sums_layout(m) doubles per row. */
#define MS_ROW_SUMS_ARGS(F)                                                                                      \
    F(const void *, base)                                                                                        \
    F(const void *const *, x)                                                                                    \
    F(const int32_t *, dt)                                                                                       \
    F(const float *, thr)                                                                                        \
    F(const int64_t *, tie_end)                                                                                  \
    F(const void *, merged)                                                                                      \
    F(const void *, uni)                                                                                         \
    F(double *, out)                                                                                             \
    F(int64_t, cols)                                                                                             \
    F(int32_t, m)                                                                                                \
    F(int32_t, base_dt)                                                                                          \
    F(int32_t, emr)                                                                                              \
    F(int32_t, merged_dt)                                                                                        \
    F(int32_t, uni_dt)
typedef struct { MS_ROW_SUMS_ARGS(MS_DECLARE) } ms_row_sums_args;

static void to_f32(const void *src, int dt, int64_t i0, int n, float *restrict dst) {
    if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + i0;
        for (int k = 0; k < n; k++) {
            uint32_t u = (uint32_t)s[k] << 16;
            memcpy(dst + k, &u, 4);
        }
    } else if (dt == DT_F16) {
        const _Float16 *s = (const _Float16 *)src + i0;
        int k = 0;
#ifdef __F16C__ /* GCC does not vectorize _Float16 conversions: 8 at a time, the instruction its scalar code uses */
        for (; k + 8 <= n; k += 8)
            _mm256_storeu_ps(dst + k, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(s + k))));
#endif
        for (; k < n; k++) dst[k] = (float)s[k];
    } else {
        memcpy(dst, (const float *)src + i0, (size_t)n * 4);
    }
}

/* How many of a cut's ties fall in the block starting at element i0: those before the cut's tie end. */
static int ties_in_block(int64_t tie_end, int64_t i0, int len) {
    int64_t left = tie_end - i0;
    return left <= 0 ? 0 : (left >= len ? len : (int)left);
}

/* EMR's election over a block of task vectors t[0..m): sign = +1 where sum_i t_i > 0 else -1, mag = the largest
 * |t_i| among those agreeing with it (0 if none), tau = sign * mag. */
static void elect_unified(int len, int m, float (*t)[BLOCK], float *restrict sign, float *restrict mag,
                          float *restrict tau) {
    for (int k = 0; k < len; k++) sign[k] = 0.0f;
    for (int i = 0; i < m; i++) {
        const float *restrict ti = t[i];  /* a plain pointer: GCC does not vectorize t[i][k] */
        for (int k = 0; k < len; k++) sign[k] += ti[k];
    }
    for (int k = 0; k < len; k++) {
        sign[k] = sign[k] > 0.0f ? 1.0f : -1.0f;
        mag[k] = 0.0f;
    }
    for (int i = 0; i < m; i++) {
        const float *restrict ti = t[i];
        for (int k = 0; k < len; k++) {
            float a = ti[k] < 0 ? -ti[k] : ti[k];
            mag[k] = ti[k] * sign[k] > 0.0f && a > mag[k] ? a : mag[k];
        }
    }
    for (int k = 0; k < len; k++) tau[k] = sign[k] * mag[k];
}

#endif
