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

/* Rows [begin, end) of the band, t_i = x_i - b: every field above, summed over the row's `cols` elements.
 * The trim keeps |t_i| > thr[i], and |t_i| == thr[i] for flat indices in the band below tie_end[i].
 * Sums run over blocks of BLOCK elements in float32 (vectorized: `omp simd` reductions, so their order is the
 * compiler's, fixed for a given build) and over blocks and rows in float64. */
void ms_row_sums(const ms_row_sums_args *a, int64_t begin, int64_t end) {
    const void *base = a->base, *const *x = a->x, *merged = a->merged, *uni = a->uni;
    const int32_t *dt = a->dt;
    const float *thr = a->thr;
    const int64_t *tie_end = a->tie_end, cols = a->cols;
    double *out = a->out;
    const int m = a->m, base_dt = a->base_dt, emr = a->emr, merged_dt = a->merged_dt, uni_dt = a->uni_dt;
    float b[BLOCK], v[BLOCK], t[MAX_INPUTS][BLOCK], kept[MAX_INPUTS][BLOCK], s1[BLOCK], s2[BLOCK], s3[BLOCK],
          u[BLOCK];
    int32_t pos[BLOCK], neg[BLOCK];
    int64_t at[RS_FIELDS + 1];
    if (m > MAX_INPUTS) return;
    const int64_t k_out = ms_row_sums_layout(m, at);
    for (int64_t r = begin; r < end; r++) {
        double *row = out + r * k_out;
        for (int64_t j = 0; j < k_out; j++) row[j] = 0.0;
        for (int64_t c0 = 0; c0 < cols; c0 += BLOCK) {
            int len = cols - c0 < BLOCK ? (int)(cols - c0) : BLOCK;
            int64_t i0 = r * cols + c0;
            float bsq = 0.0f;
            to_f32(base, base_dt, i0, len, b);
#pragma omp simd reduction(+ : bsq)
            for (int k = 0; k < len; k++) bsq += b[k] * b[k];
            row[at[RS_base_sq]] += bsq;
            for (int k = 0; k < len; k++) {
                pos[k] = neg[k] = 0;
                s1[k] = s3[k] = 0.0f;
            }
            for (int i = 0; i < m; i++) {  /* norms, |t|, and the sign-conflict flags (some +, some -, # non-zero) */
                float wsq = 0.0f, ab = 0.0f, *restrict ti = t[i];
                to_f32(x[i], dt[i], i0, len, v);
#pragma omp simd reduction(+ : wsq, ab)
                for (int k = 0; k < len; k++) {
                    float d = v[k] - b[k];
                    wsq += v[k] * v[k];
                    ti[k] = d;
                    ab += d < 0 ? -d : d;
                    pos[k] += d > 0.0f;  /* int counts: as float flags the compiler made them masked stores */
                    neg[k] += d < 0.0f;
                    s3[k] += d != 0.0f;
                }
                row[at[RS_weight_sq] + i] += wsq;
                row[at[RS_abs] + i] += ab;
            }
            for (int i = 0; i < m; i++)
                for (int j = i; j < m; j++) {
                    float g = 0.0f;
                    const float *restrict ti = t[i], *restrict tj = t[j];
#pragma omp simd reduction(+ : g)
                    for (int k = 0; k < len; k++) g += ti[k] * tj[k];
                    row[at[RS_gram] + i * m + j] += g;
                    if (j != i) row[at[RS_gram] + j * m + i] += g;
                }
            {
                float both = 0.0f, eligible = 0.0f;
#pragma omp simd reduction(+ : both, eligible)
                for (int k = 0; k < len; k++) {
                    both += (float)((pos[k] > 0) & (neg[k] > 0));
                    eligible += s3[k] >= 2.0f ? 1.0f : 0.0f;
                    s1[k] = 0.0f;
                }
                row[at[RS_both]] += both;
                row[at[RS_eligible]] += eligible;
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
                row[at[RS_mass]] += mass;
                row[at[RS_against]] += against;
            }
            if (emr) {  /* EMR's election: sign of the sum (0 counts as -), the largest agreeing |t| */
                float usq = 0.0f;
                elect_unified(len, m, t, s1, s2, u);
#pragma omp simd reduction(+ : usq)
                for (int k = 0; k < len; k++) usq += u[k] * u[k];
                row[at[RS_uni_sq]] += usq;
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
                    row[at[RS_count] + i] += count;
                    row[at[RS_abs_masked] + i] += absm;
                    row[at[RS_masked_sq] + i] += msq;
                    row[at[RS_dot] + i] += dot;
                    row[at[RS_masked_dot] + i] += mdot;
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
                    row[at[RS_dist] + i] += dist;
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
                    row[at[RS_own_abs_masked] + i] += absm;
                    row[at[RS_own_masked_sq] + i] += msq;
                    row[at[RS_own_masked_dot] + i] += mdot;
                }
            }
        }
    }
}
