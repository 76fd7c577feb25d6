/* Fused CPU kernels for the merge methods that dominate a merge's time.
 *
 * Each kernel reads its inputs once, in their stored dtype (bfloat16, float16 or float32), converts them to float32
 * a block at a time so that every working array stays in the L1 cache, and writes its result in the output dtype.
 * The torch code in merging/methods computes the same formulas in separate passes over whole float32 copies; these
 * kernels exist only because that costs several times the memory traffic. Every kernel works on a contiguous range
 * of elements; the Python side (merging/native/__init__.py) splits a band into ranges for the threads.
 *
 * Random draws (DARE) come from a counter-based hash of (key, flat element index), not from a sequential
 * generator, so a range can be computed by any thread in any order and give the same bytes. merging/native/rng.py
 * computes the same numbers with torch integer ops.
 */
#include <stdint.h>
#include <string.h>

#define BLOCK 1024          /* elements converted at a time: a float32 block is 4 KB */
#define MAX_INPUTS 32
#define SUM_BLOCK 65536     /* partial sums are returned per this many elements, whatever the thread split */

enum { DT_F32 = 0, DT_BF16 = 1, DT_F16 = 2 };

static void to_f32(const void *src, int dt, int64_t i0, int n, float *restrict dst) {
    if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)src + i0;
        for (int k = 0; k < n; k++) {
            uint32_t u = (uint32_t)s[k] << 16;
            memcpy(dst + k, &u, 4);
        }
    } else if (dt == DT_F16) {
        const _Float16 *s = (const _Float16 *)src + i0;
        for (int k = 0; k < n; k++) dst[k] = (float)s[k];
    } else {
        memcpy(dst, (const float *)src + i0, (size_t)n * 4);
    }
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
        for (int k = 0; k < n; k++) {
            _Float16 h = (_Float16)src[k];
            uint16_t bits;
            memcpy(&bits, &h, 2);
            d[k] = h;
            bad += (bits & 0x7c00u) == 0x7c00u;
        }
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

/* out = sum_j c[j] * x[j], then divided by `divide` (1: no division). */
int64_t ms_weighted_sum(int64_t n, int m, const void *const *x, const int *dt, const float *c, float divide,
                        void *out, int out_dt) {
    float acc[BLOCK], v[BLOCK];
    int64_t bad = 0;
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        int len = n - i0 < BLOCK ? (int)(n - i0) : BLOCK;
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

/* How many of a cut's ties fall in the block starting at element i0: those before the cut's tie end. */
static int ties_in_block(int64_t tie_end, int64_t i0, int len) {
    int64_t left = tie_end - i0;
    return left <= 0 ? 0 : (left >= len ? len : (int)left);
}

static void weigh_drawn(int len, const float *restrict t, const uint32_t *restrict r, uint32_t limit, float s,
                        float w, float *restrict d) {
    for (int k = 0; k < len; k++) d[k] = r[k] < limit ? (t[k] * s) * w : 0.0f;
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
 *   out = b + lambda * merged / divisor (the division only when `normalize`; a zero divisor counts as 1). */
int64_t ms_task_vectors(int64_t n, int m, const void *base, int base_dt, const void *const *x, const int *dt,
                        const float *w, const float *scale, int mode,
                        const float *thr, const int64_t *tie_end, int has_drop,
                        const uint64_t *keys, const uint32_t *keep24, int64_t start,
                        int consensus, int normalize, float divisor, float lambda, void *out, int out_dt) {
    float b[BLOCK], v[BLOCK], t[BLOCK], d[MAX_INPUTS][BLOCK], acc[BLOCK], div[BLOCK];
    uint32_t r[BLOCK];
    int64_t bad = 0;
    if (m > MAX_INPUTS) return -1;
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        int len = n - i0 < BLOCK ? (int)(n - i0) : BLOCK;
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

/* One pass of exact top-k selection: how many |x - b| (|x| without a base) exceed `hi`, and the values in
 * [lo, hi], copied to `found` in flat order (up to `cap`; *inside says how many there were). */
void ms_bracket(int64_t n, const void *base, int base_dt, const void *x, int dt, float lo, float hi,
                float *found, int64_t cap, int64_t *above, int64_t *inside) {
    float b[BLOCK], v[BLOCK], t[BLOCK], a[BLOCK];
    int flag[BLOCK + 16];
    int64_t count = 0, kept = 0;
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        int len = n - i0 < BLOCK ? (int)(n - i0) : BLOCK;
        count += magnitudes_in(len, task_vector(base, base_dt, x, dt, i0, len, v, b, t), lo, hi, a, flag);
        for (int k = len; k < BLOCK + 16; k++) flag[k] = 0;
        for (int k = 0; k < len; k += 16) {  /* candidates are rare: skip 16 flags at a time */
            int any = 0;
            for (int j = 0; j < 16; j++) any |= flag[k + j];
            if (!any) continue;
            for (int j = k; j < k + 16 && j < len; j++) {
                if (flag[j]) {
                    if (kept < cap) found[kept] = a[j];
                    kept++;
                }
            }
        }
    }
    *above = count;
    *inside = kept;
}

static int count_equal(int len, const float *restrict t, float thr) {
    int count = 0;
    for (int k = 0; k < len; k++) count += (t[k] < 0 ? -t[k] : t[k]) == thr;
    return count;
}

/* The index just after the `ties`-th element (ties >= 1) whose |x - b| (|x| without a base) equals thr: where a
 * cut that keeps only the first `ties` of its ties stops keeping them; n when there are fewer. */
int64_t ms_tie_end(int64_t n, const void *base, int base_dt, const void *x, int dt, float thr, int64_t ties) {
    float b[BLOCK], v[BLOCK], t[BLOCK];
    int64_t seen = 0;
    for (int64_t i0 = 0; i0 < n; i0 += BLOCK) {
        int len = n - i0 < BLOCK ? (int)(n - i0) : BLOCK;
        const float *tv = task_vector(base, base_dt, x, dt, i0, len, v, b, t);
        int here = count_equal(len, tv, thr);
        if (seen + here < ties) {
            seen += here;
            continue;
        }
        for (int k = 0; k < len; k++)
            if ((tv[k] < 0 ? -tv[k] : tv[k]) == thr && ++seen == ties) return i0 + k + 1;
    }
    return n;
}

/* DARE's L1 norms for its rescale: per SUM_BLOCK elements, sum |t| and sum |t kept by the draw|, t = x - b. */
void ms_random_l1(int64_t n, const void *base, int base_dt, const void *x, int dt, uint64_t key, uint32_t keep24,
                  int64_t start, double *before, double *after) {
    float b[BLOCK], v[BLOCK], kept_v[BLOCK];
    uint32_t r[BLOCK];
    for (int64_t s0 = 0; s0 < n; s0 += SUM_BLOCK) {
        int64_t s1 = n - s0 < SUM_BLOCK ? n : s0 + SUM_BLOCK;
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

/* EMR's election over a block of task vectors t[0..m): sign = +1 where sum_i t_i > 0 else -1, mag = the largest
 * |t_i| among those agreeing with it (0 if none), tau = sign * mag. */
static void elect_unified(int len, int m, float (*t)[BLOCK], float *restrict sign, float *restrict mag,
                          float *restrict tau) {
    for (int k = 0; k < len; k++) sign[k] = 0.0f;
    for (int i = 0; i < m; i++)
        for (int k = 0; k < len; k++) sign[k] += t[i][k];
    for (int k = 0; k < len; k++) {
        sign[k] = sign[k] > 0.0f ? 1.0f : -1.0f;
        mag[k] = 0.0f;
    }
    for (int i = 0; i < m; i++)
        for (int k = 0; k < len; k++) {
            float a = t[i][k] < 0 ? -t[i][k] : t[i][k];
            mag[k] = t[i][k] * sign[k] > 0.0f && a > mag[k] ? a : mag[k];
        }
    for (int k = 0; k < len; k++) tau[k] = sign[k] * mag[k];
}

/* EMR (see merging/methods/emr.py): per element, with t_i = x_i - b,
 *   s = +1 if sum t_i > 0 else -1;  tau = s * max{|t_i| : t_i s > 0} (0 if none);  M_i = t_i tau > 0
 * writes tau (when tau_out is set) and the packed masks (when masks is set; n is a multiple of 8 unless the range
 * ends the tensor; the first element goes to the most significant bit), and per SUM_BLOCK elements the sums
 * sum|t_i|, sum M_i |tau| and sum M_i into sums[(block * 3 + {0,1,2}) * m + i]. */
void ms_emr(int64_t n, int m, const void *base, int base_dt, const void *const *x, const int *dt,
            void *tau_out, int tau_dt, uint8_t *const *masks, double *sums) {
    float b[BLOCK], t[MAX_INPUTS][BLOCK], tau[BLOCK], sign[BLOCK], mag[BLOCK], a[BLOCK], u[BLOCK];
    uint8_t bit[BLOCK];
    if (m > MAX_INPUTS) return;
    for (int64_t s0 = 0; s0 < n; s0 += SUM_BLOCK) {
        int64_t s1 = n - s0 < SUM_BLOCK ? n : s0 + SUM_BLOCK;
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

/* The analysis' per-row sums of one band (merging/analysis.py, ``tensor_sums``), for rows of `cols` elements,
 * t_i = x_i - b. Row r of `out` (k_out doubles) receives, at the offsets computed below:
 *   base_sq; weight_sq[m]; gram[m*m]; abs[m]; both; eligible; against; mass;
 *   count[m]; abs_masked[m]; masked_sq[m]; dot[m]; masked_dot[m]; uni_sq;       (EMR's election, when `emr`)
 *   dist[m];                                                                      (when `merged` is given)
 *   own_abs_masked[m]; own_masked_sq[m]; own_masked_dot[m]                        (when `uni` is given)
 * The trim keeps |t_i| > thr[i], and |t_i| == thr[i] for flat indices (from this range's start) below tie_end[i].
 * Sums run over blocks of BLOCK elements in float32 (vectorized: `omp simd` reductions, so their order is the
 * compiler's, fixed for a given build) and over blocks and rows in float64. */
void ms_row_sums(int64_t rows, int64_t cols, int m, const void *base, int base_dt, const void *const *x,
                 const int *dt, const float *thr, const int64_t *tie_end, int emr, const void *merged,
                 int merged_dt, const void *uni, int uni_dt, double *out, int64_t k_out) {
    float b[BLOCK], v[BLOCK], t[MAX_INPUTS][BLOCK], kept[MAX_INPUTS][BLOCK], s1[BLOCK], s2[BLOCK], s3[BLOCK],
          u[BLOCK];
    if (m > MAX_INPUTS) return;
    const int o_wsq = 1, o_gram = o_wsq + m, o_abs = o_gram + m * m, o_both = o_abs + m, o_elig = o_both + 1,
              o_against = o_elig + 1, o_mass = o_against + 1, o_count = o_mass + 1, o_absm = o_count + m,
              o_msq = o_absm + m, o_dot = o_msq + m, o_mdot = o_dot + m, o_unisq = o_mdot + m,
              o_dist = o_unisq + 1, o_own = o_dist + m;
    for (int64_t r = 0; r < rows; r++) {
        double *row = out + r * k_out;
        for (int64_t j = 0; j < k_out; j++) row[j] = 0.0;
        for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
            int len = cols - c0 < BLOCK ? (int)(cols - c0) : BLOCK;
            int64_t i0 = r * cols + c0;
            float bsq = 0.0f;
            to_f32(base, base_dt, i0, len, b);
#pragma omp simd reduction(+ : bsq)
            for (int k = 0; k < len; k++) bsq += b[k] * b[k];
            row[0] += bsq;
            for (int k = 0; k < len; k++) s1[k] = s2[k] = s3[k] = 0.0f;
            for (int i = 0; i < m; i++) {  /* norms, |t|, and the sign-conflict flags (some +, some -, # non-zero) */
                float wsq = 0.0f, ab = 0.0f, *restrict ti = t[i];
                to_f32(x[i], dt[i], i0, len, v);
#pragma omp simd reduction(+ : wsq, ab)
                for (int k = 0; k < len; k++) {
                    float d = v[k] - b[k];
                    wsq += v[k] * v[k];
                    ti[k] = d;
                    ab += d < 0 ? -d : d;
                    s1[k] = d > 0.0f ? 1.0f : s1[k];
                    s2[k] = d < 0.0f ? 1.0f : s2[k];
                    s3[k] += d != 0.0f;
                }
                row[o_wsq + i] += wsq;
                row[o_abs + i] += ab;
            }
            for (int i = 0; i < m; i++)
                for (int j = i; j < m; j++) {
                    float g = 0.0f;
                    const float *restrict ti = t[i], *restrict tj = t[j];
#pragma omp simd reduction(+ : g)
                    for (int k = 0; k < len; k++) g += ti[k] * tj[k];
                    row[o_gram + i * m + j] += g;
                    if (j != i) row[o_gram + j * m + i] += g;
                }
            {
                float both = 0.0f, eligible = 0.0f;
#pragma omp simd reduction(+ : both, eligible)
                for (int k = 0; k < len; k++) {
                    both += s1[k] * s2[k];
                    eligible += s3[k] >= 2.0f ? 1.0f : 0.0f;
                    s1[k] = 0.0f;
                }
                row[o_both] += both;
                row[o_elig] += eligible;
            }
            /* the trim, its elected sign (0 counts as +) and the |kept| mass against it */
            for (int i = 0; i < m; i++) {
                int ties = ties_in_block(tie_end[i], i0, len);
                const float ta = thr[i], *restrict ti = t[i];
                float *restrict ki = kept[i];
                for (int k = 0; k < len; k++) {
                    float a = ti[k] < 0 ? -ti[k] : ti[k];
                    ki[k] = a > ta || (a == ta && k < ties) ? ti[k] : 0.0f;
                    s1[k] += ki[k];
                }
            }
            for (int k = 0; k < len; k++) s1[k] = s1[k] >= 0.0f ? 1.0f : -1.0f;
            {
                float mass = 0.0f, against = 0.0f;
                for (int i = 0; i < m; i++) {
                    const float *restrict ki = kept[i];
#pragma omp simd reduction(+ : mass, against)
                    for (int k = 0; k < len; k++) {
                        float opposed = -ki[k] * s1[k];
                        mass += ki[k] < 0 ? -ki[k] : ki[k];
                        against += opposed > 0.0f ? opposed : 0.0f;
                    }
                }
                row[o_mass] += mass;
                row[o_against] += against;
            }
            if (emr) {  /* EMR's election: sign of the sum (0 counts as -), the largest agreeing |t| */
                float usq = 0.0f;
                elect_unified(len, m, t, s1, s2, u);
#pragma omp simd reduction(+ : usq)
                for (int k = 0; k < len; k++) usq += u[k] * u[k];
                row[o_unisq] += usq;
                for (int i = 0; i < m; i++) {
                    float count = 0.0f, absm = 0.0f, msq = 0.0f, dot = 0.0f, mdot = 0.0f;
                    const float *restrict ti = t[i];
#pragma omp simd reduction(+ : count, absm, msq, dot, mdot)
                    for (int k = 0; k < len; k++) {
                        float p = ti[k] * u[k];
                        int on = p > 0.0f;
                        count += on ? 1.0f : 0.0f;
                        absm += on ? (u[k] < 0 ? -u[k] : u[k]) : 0.0f;
                        msq += on ? u[k] * u[k] : 0.0f;
                        dot += p;
                        mdot += on ? p : 0.0f;
                    }
                    row[o_count + i] += count;
                    row[o_absm + i] += absm;
                    row[o_msq + i] += msq;
                    row[o_dot + i] += dot;
                    row[o_mdot + i] += mdot;
                }
            }
            if (merged) {
                to_f32(merged, merged_dt, i0, len, v);
                for (int i = 0; i < m; i++) {
                    float dist = 0.0f;
                    const float *restrict ti = t[i];
#pragma omp simd reduction(+ : dist)
                    for (int k = 0; k < len; k++) {
                        float d = (v[k] - b[k]) - ti[k];
                        dist += d * d;
                    }
                    row[o_dist + i] += dist;
                }
            }
            if (uni) {
                to_f32(uni, uni_dt, i0, len, v);
                for (int i = 0; i < m; i++) {
                    float absm = 0.0f, msq = 0.0f, mdot = 0.0f;
                    const float *restrict ti = t[i];
#pragma omp simd reduction(+ : absm, msq, mdot)
                    for (int k = 0; k < len; k++) {
                        float p = ti[k] * v[k];
                        int on = p > 0.0f;
                        absm += on ? (v[k] < 0 ? -v[k] : v[k]) : 0.0f;
                        msq += on ? v[k] * v[k] : 0.0f;
                        mdot += on ? p : 0.0f;
                    }
                    row[o_own + i] += absm;
                    row[o_own + m + i] += msq;
                    row[o_own + 2 * m + i] += mdot;
                }
            }
        }
    }
}
