/* The analysis' per-row sums of a band of (rows, cols) tensors (merging/analysis.py, ``tensor_sums``), in one pass
 * over the stored inputs. It has its own file because it serves the analysis, not a merge; it shares kernels.h.
 */
#include "kernels.h"

/* The fields of one row of ms_row_sums' output, in order, with their rank: 0 one value, 1 one per model, 2 one per
 * pair of models (the Gram matrix, row-major). The kernel writes at the offsets ms_row_sums_layout computes from
 * this list, and ops.row_sums reads them back by the same call, so neither side spells out the other's layout. */
#define ROW_SUMS_FIELDS(F)                                                                                       \
    F(base_sq, 0)                                                                                                \
    F(weight_sq, 1)                                                                                              \
    F(gram, 2)                                                                                                   \
    F(abs, 1)                                                                                                    \
    F(both, 0)                  /* sign conflicts: elements with both signs among the t_i */                      \
    F(eligible, 0)              /* elements with at least two non-zero t_i */                                    \
    F(against, 0)               /* the trimmed |t_i| mass against the elected sign */                            \
    F(mass, 0)                                                                                                   \
    F(count, 1)                 /* count .. uni_sq: EMR's election, when `emr` */                                \
    F(abs_masked, 1)                                                                                             \
    F(masked_sq, 1)                                                                                              \
    F(dot, 1)                                                                                                    \
    F(masked_dot, 1)                                                                                             \
    F(uni_sq, 0)                                                                                                 \
    F(dist, 1)                  /* when `merged` is given */                                                     \
    F(own_abs_masked, 1)        /* own_*: masked by the method's own tau_uni, when `uni` is given */             \
    F(own_masked_sq, 1)                                                                                          \
    F(own_masked_dot, 1)

#define RS_INDEX(name, rank) RS_##name,
enum { ROW_SUMS_FIELDS(RS_INDEX) RS_FIELDS };

#define RS_NAME(name, rank) #name,
#define RS_RANK(name, rank) rank,
static const char *const row_sums_names[] = {ROW_SUMS_FIELDS(RS_NAME)};
static const int row_sums_ranks[] = {ROW_SUMS_FIELDS(RS_RANK)};

int ms_row_sums_fields(void) { return RS_FIELDS; }

/* The name of field i (NULL past the last) and its rank. */
const char *ms_row_sums_field(int i, int *rank) {
    if (i < 0 || i >= RS_FIELDS) return NULL;
    *rank = row_sums_ranks[i];
    return row_sums_names[i];
}

/* Where each field starts in a row for m models, offsets[0 .. RS_FIELDS] (the last: the row's width, which is also
 * returned; offsets may be NULL to ask for the width alone). */
int64_t ms_row_sums_layout(int m, int64_t *offsets) {
    int64_t at = 0;
    for (int i = 0; i < RS_FIELDS; i++) {
        if (offsets) offsets[i] = at;
        at += row_sums_ranks[i] == 0 ? 1 : (row_sums_ranks[i] == 1 ? m : (int64_t)m * m);
    }
    if (offsets) offsets[RS_FIELDS] = at;
    return at;
}

/* LANES float32 partial sums per reduction, kept in four AVX registers: with one accumulator (what `omp simd`
 * reductions compiled to) every add waited on the one before, and the row sums ran latency-bound, 2x slower. */
#define LANES 32

static float lanes_total(const float *acc) {
    float s = 0.0f;
    for (int l = 0; l < LANES; l++) s += acc[l];
    return s;
}

/* sum_k a[k] b[k] over n (a multiple of LANES) elements, LANES at a time */
static float dot_lanes(const float *restrict a, const float *restrict b, int n) {
    float acc[LANES] = {0};
    for (int k0 = 0; k0 < n; k0 += LANES)
        for (int l = 0; l < LANES; l++) acc[l] += a[k0 + l] * b[k0 + l];
    return lanes_total(acc);
}

_Static_assert(BLOCK % LANES == 0, "the loops run to len rounded up to LANES, which must stay within BLOCK");

/* x where mask is all ones, +0 where it is 0: a select GCC vectorizes in a loop that has others (a float
 * `c ? x : 0` beside another on the same condition left the loop scalar). */
static inline float kept_where(float x, int32_t mask) {
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    bits &= (uint32_t)mask;
    memcpy(&x, &bits, sizeof bits);
    return x;
}

/* Zeros after a block's `len` converted values, up to the LANES multiple the loops run to: every field's
 * contribution from a zero t_i, b and merged value is zero, so the padding changes no sum. */
static void pad(float *buf, int len, int padded) {
    for (int k = len; k < padded; k++) buf[k] = 0.0f;
}

/* Where t_i and a unified vector u agree in sign (t_i u > 0): the sums of |u|, u^2 and t_i u there, added to
 * abs_masked, masked_sq and masked_dot; and, when count is given, how many agree and the plain sum of t_i u. */
static void masked_sums(const float *restrict ti, const float *restrict u, int n, double *abs_masked,
                        double *masked_sq, double *masked_dot, double *count, double *dot) {
    float absm[LANES] = {0}, msq[LANES] = {0}, mdot[LANES] = {0}, all_dot[LANES] = {0};
    int32_t agree[LANES] = {0};
    for (int k0 = 0; k0 < n; k0 += LANES)
        for (int l = 0; l < LANES; l++) {
            const int k = k0 + l;
            const float p = ti[k] * u[k];
            const int32_t on = -(int32_t)(p > 0.0f);  /* all ones where they agree (never for a NaN) */
            const float um = kept_where(u[k], on);
            absm[l] += __builtin_fabsf(um);
            msq[l] += um * um;
            mdot[l] += kept_where(p, on);  /* not t_i * um: a non-finite t_i times 0 is NaN */
            agree[l] -= on;
            all_dot[l] += p;
        }
    *abs_masked += lanes_total(absm);
    *masked_sq += lanes_total(msq);
    *masked_dot += lanes_total(mdot);
    if (count) {
        int64_t agreeing = 0;
        for (int l = 0; l < LANES; l++) agreeing += agree[l];
        *count += (double)agreeing;
        *dot += lanes_total(all_dot);
    }
}

/* Rows [begin, end) of the band, t_i = x_i - b: every field above, summed over the row's `cols` elements.
 * The trim keeps |t_i| > thr[i], and |t_i| == thr[i] for flat indices in the band below tie_end[i].
 * Sums run over blocks of BLOCK elements in float32, LANES at a time (so their order is fixed by the code, not
 * the compiler), and over blocks and rows in float64. */
void ms_row_sums(const ms_row_sums_args *a, int64_t begin, int64_t end) {
    const void *base = a->base, *const *x = a->x, *merged = a->merged, *uni = a->uni;
    const int32_t *dt = a->dt;
    const float *thr = a->thr;
    const int64_t *tie_end = a->tie_end, cols = a->cols;
    double *out = a->out;
    const int m = a->m, base_dt = a->base_dt, emr = a->emr, merged_dt = a->merged_dt, uni_dt = a->uni_dt;
    float b[BLOCK], v[BLOCK], t[MAX_INPUTS][BLOCK], kept[MAX_INPUTS][BLOCK], s1[BLOCK], s2[BLOCK], s3[BLOCK],
          u[BLOCK], hi[BLOCK], lo[BLOCK];
    int64_t at[RS_FIELDS + 1];
    if (m > MAX_INPUTS) return;
    const int64_t k_out = ms_row_sums_layout(m, at);
    for (int64_t r = begin; r < end; r++) {
        double *row = out + r * k_out;
        for (int64_t j = 0; j < k_out; j++) row[j] = 0.0;
        for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
            const int len = cols - c0 < BLOCK ? (int)(cols - c0) : BLOCK, n = (len + LANES - 1) / LANES * LANES;
            const int64_t i0 = r * cols + c0;
            float acc[LANES], acc2[LANES];  /* each loop below zeroes what it uses */
            to_f32(base, base_dt, i0, len, b);
            pad(b, len, n);
            row[at[RS_base_sq]] += dot_lanes(b, b, n);
            for (int k = 0; k < n; k++) hi[k] = lo[k] = s1[k] = s3[k] = 0.0f;
            /* norms, |t|, and what the sign conflicts need: the largest and smallest t_i, how many are non-zero
             * (max/min rather than counts of each sign: counts compiled to masked stores, slow on AMD) */
            for (int i = 0; i < m; i++) {
                float *restrict ti = t[i];
                to_f32(x[i], dt[i], i0, len, v);
                pad(v, len, n);
                for (int l = 0; l < LANES; l++) acc[l] = acc2[l] = 0.0f;
                for (int k0 = 0; k0 < n; k0 += LANES)
                    for (int l = 0; l < LANES; l++) {
                        const int k = k0 + l;
                        float d = v[k] - b[k];
                        acc[l] += v[k] * v[k];
                        ti[k] = d;
                        acc2[l] += __builtin_fabsf(d);
                        hi[k] = d > hi[k] ? d : hi[k];
                        lo[k] = d < lo[k] ? d : lo[k];
                        s3[k] += d != 0.0f ? 1.0f : 0.0f;
                    }
                row[at[RS_weight_sq] + i] += lanes_total(acc);
                row[at[RS_abs] + i] += lanes_total(acc2);
            }
            for (int i = 0; i < m; i++)
                for (int j = i; j < m; j++) {
                    const float g = dot_lanes(t[i], t[j], n);
                    row[at[RS_gram] + i * m + j] += g;
                    if (j != i) row[at[RS_gram] + j * m + i] += g;
                }
            for (int l = 0; l < LANES; l++) acc[l] = acc2[l] = 0.0f;
            for (int k0 = 0; k0 < n; k0 += LANES)
                for (int l = 0; l < LANES; l++) {
                    const int k = k0 + l;
                    acc[l] += hi[k] > 0.0f && lo[k] < 0.0f ? 1.0f : 0.0f;  /* both signs among the t_i */
                    acc2[l] += s3[k] >= 2.0f ? 1.0f : 0.0f;
                }
            row[at[RS_both]] += lanes_total(acc);
            row[at[RS_eligible]] += lanes_total(acc2);
            /* the trim, its elected sign (0 counts as +) and the |kept| mass against it */
            for (int i = 0; i < m; i++) {
                int ties = ties_in_block(tie_end[i], i0, len);
                const float ta = thr[i], *restrict ti = t[i];
                float *restrict ki = kept[i];
                for (int k = 0; k < n; k++) {
                    float mag = ti[k] < 0 ? -ti[k] : ti[k];
                    ki[k] = mag > ta || (mag == ta && k < ties) ? ti[k] : 0.0f;
                    s1[k] += ki[k];
                }
            }
            for (int k = 0; k < n; k++) s1[k] = s1[k] >= 0.0f ? 1.0f : -1.0f;
            for (int l = 0; l < LANES; l++) acc[l] = acc2[l] = 0.0f;
            for (int i = 0; i < m; i++) {
                const float *restrict ki = kept[i];
                for (int k0 = 0; k0 < n; k0 += LANES)
                    for (int l = 0; l < LANES; l++) {
                        const int k = k0 + l;
                        float opposed = -ki[k] * s1[k];
                        acc[l] += __builtin_fabsf(ki[k]);
                        acc2[l] += opposed > 0.0f ? opposed : 0.0f;
                    }
            }
            row[at[RS_mass]] += lanes_total(acc);
            row[at[RS_against]] += lanes_total(acc2);
            if (emr) {  /* EMR's election: sign of the sum (0 counts as -), the largest agreeing |t| */
                elect_unified(n, m, t, s1, s2, u);
                row[at[RS_uni_sq]] += dot_lanes(u, u, n);
                for (int i = 0; i < m; i++)
                    masked_sums(t[i], u, n, row + at[RS_abs_masked] + i, row + at[RS_masked_sq] + i,
                                row + at[RS_masked_dot] + i, row + at[RS_count] + i, row + at[RS_dot] + i);
            }
            if (merged) {
                to_f32(merged, merged_dt, i0, len, v);
                pad(v, len, n);
                for (int i = 0; i < m; i++) {
                    const float *restrict ti = t[i];
                    for (int l = 0; l < LANES; l++) acc[l] = 0.0f;
                    for (int k0 = 0; k0 < n; k0 += LANES)
                        for (int l = 0; l < LANES; l++) {
                            const int k = k0 + l;
                            float d = (v[k] - b[k]) - ti[k];
                            acc[l] += d * d;
                        }
                    row[at[RS_dist] + i] += lanes_total(acc);
                }
            }
            if (uni) {
                to_f32(uni, uni_dt, i0, len, v);
                pad(v, len, n);
                for (int i = 0; i < m; i++)
                    masked_sums(t[i], v, n, row + at[RS_own_abs_masked] + i, row + at[RS_own_masked_sq] + i,
                                row + at[RS_own_masked_dot] + i, NULL, NULL);
            }
        }
    }
}
