/* Fused CPU kernels for the merge methods that dominate a merge's time.
 *
 * Each kernel reads its inputs once, in their stored dtype (bfloat16, float16 or float32), converts them to float32
 * a block at a time so that every working array stays in the L1 cache, and writes its result in the output dtype.
 * The torch code in merging/methods computes the same formulas in separate passes over whole float32 copies; these
 * kernels exist only because that costs several times the memory traffic. Every kernel takes its family's struct
 * (kernels.h), which describes a band, and a contiguous range of that band's elements; the Python side
 * (merging/native/ops.py) splits a band into ranges for the threads. The analysis' kernel is in row_sums.c.
 *
 * Random draws (DARE) come from a counter-based hash of (key, flat element index), not from a sequential
 * generator, so a range can be computed by any thread in any order and give the same bytes. merging/native/rng.py
 * computes the same numbers with torch integer ops.
 */
#include "kernels.h"

/* How many of the stored values x[begin, end) of dtype dt are NaN or infinite: all exponent bits set. */
static int64_t count_nonfinite_stored(const void *x, int dt, int64_t begin, int64_t end) {
    int64_t bad = 0;
    if (dt == DT_F32) {
        const uint32_t *u = (const uint32_t *)x;
        for (int64_t k = begin; k < end; k++) bad += (u[k] & 0x7f800000u) == 0x7f800000u;
    } else {
        const uint16_t *h = (const uint16_t *)x, exponent = dt == DT_BF16 ? 0x7f80u : 0x7c00u;
        for (int64_t k = begin; k < end; k++) bad += (h[k] & exponent) == exponent;
    }
    return bad;
}

/* Store float32 values as dt (round to nearest even, NaN as torch writes it); returns how many stored values are
 * NaN or infinite, so that the caller need not scan the output again. */
static int64_t from_f32(const float *restrict src, int n, void *dst, int dt, int64_t i0) {
    int64_t bad = 0;
    if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)dst + i0;
        for (int k = 0; k < n; k++) {
            uint32_t u;
            memcpy(&u, src + k, 4);
            uint16_t h = (u & 0x7fffffffu) > 0x7f800000u ? (uint16_t)0x7fc0u
                                                         : (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
            d[k] = h;
            bad += (h & 0x7f80u) == 0x7f80u;
        }
    } else if (dt == DT_F16) {
        _Float16 *d = (_Float16 *)dst + i0;
        int k = 0;
#ifdef __F16C__ /* 8 at a time, rounding to nearest even as the scalar conversion (the same instruction) does */
        for (; k + 8 <= n; k += 8)
            _mm_storeu_si128((__m128i *)(d + k), _mm256_cvtps_ph(_mm256_loadu_ps(src + k), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; k < n; k++) d[k] = (_Float16)src[k];
        bad = count_nonfinite_stored(dst, DT_F16, i0, i0 + n);
    } else {
        float *d = (float *)dst + i0;
        for (int k = 0; k < n; k++) {
            uint32_t u;
            memcpy(&u, src + k, 4);
            d[k] = src[k];
            bad += (u & 0x7f800000u) == 0x7f800000u;
        }
    }
    return bad;
}

static inline uint32_t mix32(uint32_t x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}

/* 24 random bits for each element index first, first + 1, ... under `key` (merging/native/rng.py is the torch
 * twin): h = mix32(mix32(lo32(index) * golden + lo32(key)) ^ hi32(index) ^ hi32(key)) >> 8. */
static void draw24(uint64_t key, uint64_t first, int n, uint32_t *restrict out) {
    const uint32_t lo0 = (uint32_t)first, hi0 = (uint32_t)(first >> 32), klo = (uint32_t)key, khi = (uint32_t)(key >> 32);
    for (int k = 0; k < n; k++) {
        uint32_t lo = lo0 + (uint32_t)k, hi = hi0 + (lo < lo0);
        out[k] = mix32(mix32(lo * 0x9e3779b9u + klo) ^ hi ^ khi) >> 8;
    }
}

/* Sums of n values in 8 interleaved lanes, so the compiler can vectorize them in a fixed order (the same bytes on
 * any number of threads); the lanes are added last. */
#define LANES 8
static double lane_sum(const float *restrict v, int n) {
    double lane[LANES] = {0};
    int k = 0;
    for (; k + LANES <= n; k += LANES)
        for (int j = 0; j < LANES; j++) lane[j] += (double)v[k + j];
    double total = 0.0;
    for (; k < n; k++) total += v[k];
    for (int j = 0; j < LANES; j++) total += lane[j];
    return total;
}

/* out = sum_j c[j] * x[j], then divided by `divide` (1: no division); returns how many stored values are not
 * finite. */
int64_t ms_weighted_sum(const ms_weighted_sum_args *a, int64_t begin, int64_t end) {
    const void *const *x = a->x;
    const int32_t *dt = a->dt;
    const float *c = a->c, divide = a->divide;
    void *out = a->out;
    const int m = a->m, out_dt = a->out_dt;
    float acc[BLOCK], v[BLOCK];
    int64_t bad = 0;
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
        int len = end - i0 < BLOCK ? (int)(end - i0) : BLOCK;
        to_f32(x[0], dt[0], i0, len, v);
        for (int k = 0; k < len; k++) acc[k] = c[0] * v[k];
        for (int j = 1; j < m; j++) {
            to_f32(x[j], dt[j], i0, len, v);
            const float cj = c[j];
            for (int k = 0; k < len; k++) acc[k] += cj * v[k];
        }
        if (divide != 1.0f)
            for (int k = 0; k < len; k++) acc[k] /= divide;
        bad += from_f32(acc, len, out, out_dt, i0);
    }
    return bad;
}

/* The small loops below each take restrict pointers, so that the compiler vectorizes every one of them. */

static void difference(int len, const float *restrict x, const float *restrict b, float *restrict t) {
    for (int k = 0; k < len; k++) t[k] = x[k] - b[k];
}

static void weigh_all(int len, const float *restrict t, float s, float w, float *restrict d) {
    for (int k = 0; k < len; k++) d[k] = (t[k] * s) * w;
}

/* d = t * s * w where |t| is above cut A and not above cut B (when has_drop); else 0. An element equal to a cut's
 * threshold counts as above it when its index in the block is below that cut's `ties` (0: none, len: all). */
static void weigh_cut(int len, const float *restrict t, float ta, int ties_a, float tb, int ties_b, int has_drop,
                      float s, float w, float *restrict d) {
    if (has_drop) {
        for (int k = 0; k < len; k++) {
            float a = t[k] < 0 ? -t[k] : t[k];
            int keep = (a > ta || (a == ta && k < ties_a)) && !(a > tb || (a == tb && k < ties_b));
            d[k] = keep ? (t[k] * s) * w : 0.0f;
        }
    } else {
        for (int k = 0; k < len; k++) {
            float a = t[k] < 0 ? -t[k] : t[k];
            d[k] = a > ta || (a == ta && k < ties_a) ? (t[k] * s) * w : 0.0f;
        }
    }
}

static void weigh_drawn(int len, const float *restrict t, const uint32_t *restrict r, uint32_t limit, float s,
                        float w, float *restrict d) {
    for (int k = 0; k < len; k++) {
        float kept = (t[k] * s) * w;  /* read unconditionally: a conditional read vectorizes as a slow masked load */
        d[k] = r[k] < limit ? kept : 0.0f;
    }
}

static void accumulate(int len, const float *restrict x, float *restrict acc) {
    for (int k = 0; k < len; k++) acc[k] += x[k];
}

/* sign = the sign of acc (0 counts as +); acc and div cleared for the agreeing sums */
static void elect_sign(int len, float *restrict acc, float *restrict sign, float *restrict div) {
    for (int k = 0; k < len; k++) {
        sign[k] = acc[k] >= 0.0f ? 1.0f : -1.0f;
        acc[k] = 0.0f;
        div[k] = 0.0f;
    }
}

static void add_agreeing(int len, const float *restrict d, const float *restrict sign, float w, float *restrict acc,
                         float *restrict div) {
    for (int k = 0; k < len; k++) {
        int agree = d[k] * sign[k] > 0.0f;
        acc[k] += agree ? d[k] : 0.0f;
        div[k] += agree ? w : 0.0f;
    }
}

static void finish_merge(int len, const float *restrict b, float *restrict acc, const float *restrict div,
                         int normalize, float lambda) {
    if (normalize)
        for (int k = 0; k < len; k++) acc[k] /= div[k];
    if (lambda != 1.0f)
        for (int k = 0; k < len; k++) acc[k] *= lambda;
    for (int k = 0; k < len; k++) acc[k] = b[k] + acc[k];
}

/* The task-vector family (see merging/methods/task_vectors.py): per element, with t_i = x_i - b,
 *   kept_i = t_i where the sparsification keeps it, else 0
 *     mode 0: every entry; mode 1: above cut A and not above cut B (when has_drop), thresholds on |t_i|, where
 *             an element equal to a threshold counts as above it when its index is below that cut's tie end;
 *     mode 2: draw24(key_i, start + element) < keep24_i (DARE)
 *   d_i = (kept_i * scale_i) * w_i
 *   consensus: s = sign(sum d_i) (0 counts as +), merged = sum of the d_i whose sign is s, divisor = sum of their w_i
 *   else:      merged = sum d_i, divisor = `divisor`
 *   out = b + lambda * merged / divisor (the division only when `normalize`; a zero divisor counts as 1).
 * Returns how many stored values are not finite (-1: more than MAX_INPUTS models). */
int64_t ms_task_vectors(const ms_task_vectors_args *a, int64_t begin, int64_t end) {
    const void *base = a->base, *const *x = a->x;
    const int32_t *dt = a->dt;
    const float *w = a->w, *scale = a->scale, *thr = a->thr;
    const int64_t *tie_end = a->tie_end, start = a->start;
    const uint64_t *keys = a->keys;
    const uint32_t *keep24 = a->keep24;
    void *out = a->out;
    const int m = a->m, base_dt = a->base_dt, out_dt = a->out_dt, mode = a->mode, has_drop = a->has_drop,
              consensus = a->consensus, normalize = a->normalize;
    const float divisor = a->divisor, lambda = a->lam;
    float b[BLOCK], v[BLOCK], t[BLOCK], d[MAX_INPUTS][BLOCK], acc[BLOCK], div[BLOCK];
    uint32_t r[BLOCK];
    int64_t bad = 0;
    if (m > MAX_INPUTS) return -1;
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
        int len = end - i0 < BLOCK ? (int)(end - i0) : BLOCK;
        to_f32(base, base_dt, i0, len, b);
        for (int i = 0; i < m; i++) {
            to_f32(x[i], dt[i], i0, len, v);
            difference(len, v, b, t);
            if (mode == 1) {
                weigh_cut(len, t, thr[2 * i], ties_in_block(tie_end[2 * i], i0, len), thr[2 * i + 1],
                          ties_in_block(tie_end[2 * i + 1], i0, len), has_drop, scale[i], w[i], d[i]);
            } else if (mode == 2) {
                draw24(keys[i], (uint64_t)(start + i0), len, r);
                weigh_drawn(len, t, r, keep24[i], scale[i], w[i], d[i]);
            } else {
                weigh_all(len, t, scale[i], w[i], d[i]);
            }
        }
        for (int k = 0; k < len; k++) acc[k] = 0.0f;
        for (int i = 0; i < m; i++) accumulate(len, d[i], acc);
        if (consensus) {
            elect_sign(len, acc, v, div);
            for (int i = 0; i < m; i++) add_agreeing(len, d[i], v, w[i], acc, div);
            for (int k = 0; k < len; k++) div[k] = div[k] == 0.0f ? 1.0f : div[k];
        } else {
            for (int k = 0; k < len; k++) div[k] = divisor;
        }
        finish_merge(len, b, acc, div, normalize, lambda);
        bad += from_f32(acc, len, out, out_dt, i0);
    }
    return bad;
}

/* |t| into a, and 1 in flag where it lies in [lo, hi]; returns how many exceed hi */
static int magnitudes_in(int len, const float *restrict t, float lo, float hi, float *restrict a,
                         int *restrict flag) {
    int count = 0;
    for (int k = 0; k < len; k++) {
        float m = t[k] < 0 ? -t[k] : t[k];
        a[k] = m;
        count += m > hi;
        flag[k] = (m >= lo) & (m <= hi);
    }
    return count;
}

/* x - b into t, or x itself without a base (t may then alias x) */
static const float *task_vector(const void *base, int base_dt, const void *x, int dt, int64_t i0, int len,
                                float *restrict v, float *restrict b, float *restrict t) {
    to_f32(x, dt, i0, len, v);
    if (!base) return v;
    to_f32(base, base_dt, i0, len, b);
    difference(len, v, b, t);
    return t;
}

/* One pass of exact top-k selection over [begin, end): how many |x - b| (|x| without a base) exceed `hi`, and the
 * values in [lo, hi], copied to found->values in flat order (up to found->cap, with room for cap + 1 values;
 * found->inside says how many there were, so that the caller can retry with more room). */
void ms_bracket(const ms_magnitude_args *args, int64_t begin, int64_t end, ms_bracket_found *found) {
    const void *base = args->base, *x = args->x;
    const int base_dt = args->base_dt, dt = args->dt;
    const float lo = args->lo, hi = args->hi;
    float *values = found->values;
    const int64_t cap = found->cap;
    float b[BLOCK], v[BLOCK], t[BLOCK], a[BLOCK + 16];  /* 16 past the block: read by the last group of 16 */
    int flag[BLOCK + 16];
    int64_t count = 0, kept = 0;
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
        int len = end - i0 < BLOCK ? (int)(end - i0) : BLOCK;
        count += magnitudes_in(len, task_vector(base, base_dt, x, dt, i0, len, v, b, t), lo, hi, a, flag);
        for (int k = len; k < BLOCK + 16; k++) {
            flag[k] = 0;
            a[k] = 0.0f;
        }
        for (int k = 0; k < len; k += 16) {  /* candidates are rare: skip 16 flags at a time */
            int any = 0;
            for (int j = 0; j < 16; j++) any |= flag[k + j];
            if (!any) continue;
            for (int j = k; j < k + 16; j++) {  /* branch-free: a flag is as likely set as not */
                values[kept < cap ? kept : cap] = a[j];  /* values has one spare slot, at cap */
                kept += flag[j];
            }
        }
    }
    found->above = count;
    found->inside = kept;
}

static int count_equal(int len, const float *restrict t, float thr) {
    int count = 0;
    for (int k = 0; k < len; k++) count += (t[k] < 0 ? -t[k] : t[k]) == thr;
    return count;
}

static inline float load_f32(const void *src, int dt, int64_t i) {
    float f;
    to_f32(src, dt, i, 1, &f);
    return f;
}

/* out[j] = |x_i - b_i| (|x_i| without a base) for i = j * stride, j in [begin, end): the strided sample of a top-k
 * selection, from the inputs as stored (the same values as torch's float32 subtraction and abs). */
void ms_strided_magnitudes(const ms_magnitude_args *args, int64_t begin, int64_t end) {
    const void *base = args->base, *x = args->x;
    const int base_dt = args->base_dt, dt = args->dt;
    const int64_t stride = args->stride;
    float *out = args->out;
    for (int64_t j = begin; j < end; j++) {
        float t = base ? load_f32(x, dt, j * stride) - load_f32(base, base_dt, j * stride) : load_f32(x, dt, j * stride);
        uint32_t u;
        memcpy(&u, &t, 4);
        u &= 0x7fffffffu;  /* the sign bit cleared, as torch's abs does (NaN and -0 included) */
        memcpy(out + j, &u, 4);
    }
}

/* How many of x's values in [begin, end) are NaN or infinite (all exponent bits set), read as stored: the
 * inputs' check of merging/nonfinite.py, which torch's float32-accumulated sum made a tenth of a TIES merge. */
int64_t ms_count_nonfinite(const ms_magnitude_args *args, int64_t begin, int64_t end) {
    return count_nonfinite_stored(args->x, args->dt, begin, end);
}

/* The index just after the `ties`-th element (ties >= 1) from `begin` whose |x - b| (|x| without a base) equals
 * hi: where a cut that keeps only the first `ties` of its ties stops keeping them; `end` when there are fewer. */
int64_t ms_tie_end(const ms_magnitude_args *args, int64_t begin, int64_t end) {
    const void *base = args->base, *x = args->x;
    const int base_dt = args->base_dt, dt = args->dt;
    const float thr = args->hi;
    const int64_t ties = args->ties;
    float b[BLOCK], v[BLOCK], t[BLOCK];
    int64_t seen = 0;
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
        int len = end - i0 < BLOCK ? (int)(end - i0) : BLOCK;
        const float *tv = task_vector(base, base_dt, x, dt, i0, len, v, b, t);
        int here = count_equal(len, tv, thr);
        if (seen + here < ties) {
            seen += here;
            continue;
        }
        for (int k = 0; k < len; k++)
            if ((tv[k] < 0 ? -tv[k] : tv[k]) == thr && ++seen == ties) return i0 + k + 1;
    }
    return end;
}

/* DARE's L1 norms for its rescale: per SUM_BLOCK elements, sum |t| and sum |t kept by the draw|, t = x - b
 * (begin is a multiple of SUM_BLOCK, so that the sums do not depend on the thread split). */
void ms_random_l1(const ms_random_l1_args *a, int64_t begin, int64_t end) {
    const void *base = a->base, *x = a->x;
    const int base_dt = a->base_dt, dt = a->dt;
    const uint64_t key = a->key;
    const uint32_t keep24 = a->keep24;
    const int64_t start = a->start;
    double *before = a->before, *after = a->after;
    float b[BLOCK], v[BLOCK], kept_v[BLOCK];
    uint32_t r[BLOCK];
    for (int64_t s0 = begin; s0 < end; s0 += SUM_BLOCK) {
        int64_t s1 = end - s0 < SUM_BLOCK ? end : s0 + SUM_BLOCK;
        double all = 0.0, kept = 0.0;
        for (int64_t i0 = s0; i0 < s1; i0 += BLOCK) {
            int len = s1 - i0 < BLOCK ? (int)(s1 - i0) : BLOCK;
            to_f32(x, dt, i0, len, v);
            to_f32(base, base_dt, i0, len, b);
            draw24(key, (uint64_t)(start + i0), len, r);
            for (int k = 0; k < len; k++) {
                float t = v[k] - b[k];
                v[k] = t < 0 ? -t : t;
                kept_v[k] = r[k] < keep24 ? v[k] : 0.0f;
            }
            all += lane_sum(v, len);
            kept += lane_sum(kept_v, len);
        }
        before[s0 / SUM_BLOCK] = all;
        after[s0 / SUM_BLOCK] = kept;
    }
}

/* EMR (see merging/methods/emr.py): per element, with t_i = x_i - b,
 *   s = +1 if sum t_i > 0 else -1;  tau = s * max{|t_i| : t_i s > 0} (0 if none);  M_i = t_i tau > 0
 * writes tau (when tau_out is set) and the packed masks (when masks is set; begin is a multiple of SUM_BLOCK, so a
 * range starts on a whole byte; the first element goes to the most significant bit), and per SUM_BLOCK elements
 * the sums sum|t_i|, sum M_i |tau| and sum M_i into sums[(block * 3 + {0,1,2}) * m + i]. */
void ms_emr(const ms_emr_args *args, int64_t begin, int64_t end) {
    const void *base = args->base, *const *x = args->x;
    const int32_t *dt = args->dt;
    void *tau_out = args->tau_out;
    uint8_t *const *masks = args->masks;
    double *sums = args->sums;
    const int m = args->m, base_dt = args->base_dt, tau_dt = args->tau_dt;
    float b[BLOCK], t[MAX_INPUTS][BLOCK], tau[BLOCK], sign[BLOCK], mag[BLOCK], a[BLOCK], u[BLOCK];
    uint8_t bit[BLOCK];
    if (m > MAX_INPUTS) return;
    for (int64_t s0 = begin; s0 < end; s0 += SUM_BLOCK) {
        int64_t s1 = end - s0 < SUM_BLOCK ? end : s0 + SUM_BLOCK;
        double *out = sums + (s0 / SUM_BLOCK) * 3 * m;
        for (int i = 0; i < 3 * m; i++) out[i] = 0.0;
        for (int64_t i0 = s0; i0 < s1; i0 += BLOCK) {
            int len = s1 - i0 < BLOCK ? (int)(s1 - i0) : BLOCK;
            to_f32(base, base_dt, i0, len, b);
            for (int i = 0; i < m; i++) {
                to_f32(x[i], dt[i], i0, len, t[i]);
                for (int k = 0; k < len; k++) t[i][k] -= b[k];
            }
            elect_unified(len, m, t, sign, mag, tau);
            for (int i = 0; i < m; i++) {
                int64_t count = 0;
                for (int k = 0; k < len; k++) {
                    uint8_t on = t[i][k] * tau[k] > 0.0f;
                    bit[k] = on;
                    a[k] = t[i][k] < 0 ? -t[i][k] : t[i][k];
                    u[k] = on ? mag[k] : 0.0f;
                    count += on;
                }
                out[i] += lane_sum(a, len);
                out[m + i] += lane_sum(u, len);
                out[2 * m + i] += (double)count;
                if (masks) {
                    uint8_t *packed = masks[i] + i0 / 8;
                    for (int k = 0; k < len; k += 8) {
                        uint8_t byte = 0;
                        for (int j = 0; j < 8; j++) byte |= (uint8_t)((k + j < len ? bit[k + j] : 0) << (7 - j));
                        packed[k / 8] = byte;
                    }
                }
            }
            if (tau_out) from_f32(tau, len, tau_out, tau_dt, i0);
        }
    }
}
