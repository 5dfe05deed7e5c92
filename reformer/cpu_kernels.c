/* Fused CPU row kernels of the LSH attention path (reformer/cpu_kernels.py).
 *
 * Each replaces several full passes of torch ops over a block of rows with one: the masks,
 * softmax and log-sum-exp of the window attention and its backward, the gathers and
 * scatter-adds of its rows, the combination of rounds, and the hash's argmax. For strict
 * causal windows, reformer_strict_window_forward and _backward also do the window matmuls
 * (register tiles), so a worker's share of the windows is one call; elsewhere the matmuls stay
 * with torch.
 * A call handles a block of contiguous fp32 rows and holds no state, so calls on different
 * blocks may run at once.
 *
 * exp is a polynomial (Cephes' expf: Cody-Waite reduction, degree-6 minimax, about 1 ulp)
 * written so that the compiler vectorises it; arguments under -87.3 (where fp32 exp
 * becomes subnormal) give exactly 0, as a hidden key must.
 */
#include <math.h>
#include <stdint.h>

/* Widest window row (c + s) the kernels take; wider ones use the torch ops. */
#define MAX_WIDTH 4096
/* Most features of a key and value together (d + dv) reformer_window_grads_to_rows takes. */
#define MAX_FEATURES 4096

/* Eight lanes in GCC/Clang vector extensions: the code is vectorised by construction (AVX
 * here; two halves on 128-bit machines), not left to the auto-vectoriser. */
typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));
#define LANES 8

static inline f8 splat(float x) { return (f8){x, x, x, x, x, x, x, x}; }
static inline f8 select8(i8 mask, f8 yes, f8 no) { return (f8)(((i8)yes & mask) | ((i8)no & ~mask)); }
static inline f8 max8(f8 a, f8 b) { return select8(a > b, a, b); }

/* Lanes [0, count) of x (count <= LANES; the rest 0) and their store: whole vectors move in one
 * unaligned load or store, a row's last, partial one lane by lane. */
static inline f8 load8(const float *x, int64_t count) {
    f8 v = splat(0.0f);
    if (count == LANES) {
        __builtin_memcpy(&v, x, sizeof v);
    } else {
        for (int64_t l = 0; l < count; l++) v[l] = x[l];
    }
    return v;
}

static inline void store8(float *x, f8 v, int64_t count) {
    if (count == LANES) {
        __builtin_memcpy(x, &v, sizeof v);
    } else {
        for (int64_t l = 0; l < count; l++) x[l] = v[l];
    }
}

/* exp(x) for x <= 0, exactly 0 below -87.3 (and for -inf) */
static inline f8 exp8(f8 x) {
    const f8 lowest = splat(-87.33654f), magic = splat(12582912.0f); /* 1.5 * 2^23: rounds to integers */
    const i8 under = x < lowest;
    const f8 clamped = select8(under, lowest, x);
    const f8 n = (clamped * 1.44269504088896341f + magic) - magic;
    f8 r = n * -0.693359375f + clamped;
    r = n * 2.12194440e-4f + r;
    f8 p = splat(1.9875691500e-4f);
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    const f8 y = (p * r) * r + r + 1.0f;
    const f8 scale = (f8)((__builtin_convertvector(n, i8) + 127) << 23);
    return select8(under, splat(0.0f), y * scale);
}

/* Weights of one row of logits x[0:w]: keys outside [first, last] are hidden (p = 0), and the
 * key own (if any) has the logit self_value. p = softmax, or exp(x - lse) with exp_lse.
 * Returns the row's log-sum-exp. Only the vectors that hold visible keys are computed. x and
 * p may be the same memory. */
static float softmax_row(const float *x, float *p, int64_t w, int64_t first, int64_t last, int64_t own,
                         float self_value, int exp_lse) {
    f8 v[MAX_WIDTH / LANES], e[MAX_WIDTH / LANES];
    const int64_t n = (w + LANES - 1) / LANES, k0 = first / LANES, k1 = last / LANES + 1;
    const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    f8 top8 = splat(-INFINITY);
    for (int64_t k = k0; k < k1; k++) {
        f8 xk = load8(x + k * LANES, k + 1 < n ? LANES : w - k * LANES);
        const i8 j = lane + (int32_t)(k * LANES);
        xk = select8(j == (int32_t)own, splat(self_value), xk);
        v[k] = select8((j < (int32_t)first) | (j > (int32_t)last), splat(-INFINITY), xk);
        top8 = max8(top8, v[k]);
    }
    float top = top8[0];
    for (int l = 1; l < LANES; l++) top = top8[l] > top ? top8[l] : top;
    f8 sum8 = splat(0.0f);
    for (int64_t k = k0; k < k1; k++) {
        e[k] = exp8(v[k] - top);
        sum8 += e[k];
    }
    float sum = 0.0f;
    for (int l = 0; l < LANES; l++) sum += sum8[l];
    const float lse = top + logf(sum);
    if (exp_lse) {
        for (int64_t k = k0; k < k1; k++) e[k] = exp8(v[k] - lse);
    } else {
        const float inv = 1.0f / sum;
        for (int64_t k = k0; k < k1; k++) e[k] *= inv;
    }
    for (int64_t k = 0; k < n; k++)
        store8(p + k * LANES, k < k0 || k >= k1 ? splat(0.0f) : e[k], k + 1 < n ? LANES : w - k * LANES);
    return lse;
}

/* Strict causal windows of s queries over w = c + s keys: query i of a window (row r,
 * i = r % s) with span_row[r] = span * s + i sees keys [c + i - span, c + i) and its own
 * key c + i, whose logit is self_value. x and probs may be the same memory. */
void reformer_strict_softmax(const float *x_all, float *probs, float *lse, const int64_t *span_row, int64_t rows,
                             int64_t s, int64_t c, float self_value, int exp_lse) {
    const int64_t w = c + s;
    for (int64_t r = 0; r < rows; r++) {
        const int64_t own = c + r % s, first = own - span_row[r] / s;
        lse[r] = softmax_row(x_all + r * w, probs + r * w, w, first, own, own, self_value, exp_lse);
    }
}

/* Rows already masked (hidden logits are the most negative finite float): softmax and lse. */
void reformer_softmax(const float *x_all, float *probs, float *lse, int64_t rows, int64_t w, int exp_lse) {
    for (int64_t r = 0; r < rows; r++)
        lse[r] = softmax_row(x_all + r * w, probs + r * w, w, 0, w - 1, -1, 0.0f, exp_lse);
}

/* Softmax backward in place: g = (g - shift[r]) * p, and 0 at each query's own key when
 * strict (row r's own key is c + r % s; its logit is a constant). */
void reformer_softmax_backward(float *g_all, const float *probs, const float *shift, int64_t rows, int64_t s,
                               int64_t c, int strict) {
    const int64_t w = c + s;
    for (int64_t r = 0; r < rows; r++) {
        float *g = g_all + r * w;
        const float *p = probs + r * w;
        const float sh = shift[r];
#pragma omp simd
        for (int64_t j = 0; j < w; j++) g[j] = (g[j] - sh) * p[j];
        if (strict) g[c + r % s] = 0.0f;
    }
}

/* Rows that are many cache lines wide, at scattered places in a table much larger than the
 * cache: a plain copy per row waits on memory for each. Prefetching the rows a few places
 * ahead overlaps those waits. */
#define ROWS_AHEAD 8

static inline void prefetch_row(const float *row, int64_t width, int for_write) {
    const char *bytes = (const char *)row;
    for (int64_t off = 0; off < width * (int64_t)sizeof(float); off += 64) {
        if (for_write)
            __builtin_prefetch(bytes + off, 1, 3);
        else
            __builtin_prefetch(bytes + off, 0, 3);
    }
}

/* dst[i] = src[index[i]] for n rows of width floats. */
void reformer_gather_rows(const float *src, const int64_t *index, float *dst, int64_t n, int64_t width) {
    for (int64_t i = 0; i < n; i++) {
        if (i + ROWS_AHEAD < n) prefetch_row(src + index[i + ROWS_AHEAD] * width, width, 0);
        __builtin_memcpy(dst + i * width, src + index[i] * width, width * sizeof(float));
    }
}

/* The backward's per-window gradients of a block, summed into the rows of the block's key
 * runs and added to grad (r, 2d + dv) at their rows: one pass instead of zeroing a run
 * buffer, a strided add per group of s keys and an index_add_. The block holds nb batch rows
 * of m windows; run row i of batch row b (rows[b * (m * s + c) + i]) is query (i - c) of the
 * block when i >= c, and key g * s + i % s of window i / s - g for every group g of the
 * (c + s) / s groups where that window exists. gq (nb * m, s, d), gk (nb * m, c + s, d),
 * gv (nb * m, c + s, dv). Sums run in the order of the torch path (groups ascending, then
 * added to grad), so the results have the same bits. Repeated rows add up. */
void reformer_window_grads_to_rows(float *grad, const int64_t *rows, const float *gq, const float *gk,
                                   const float *gv, int64_t nb, int64_t m, int64_t s, int64_t c, int64_t d,
                                   int64_t dv) {
    const int64_t e = 2 * d + dv, w = c + s, groups = w / s, run = m * s + c;
    float kv[MAX_FEATURES];
    for (int64_t b = 0; b < nb; b++) {
        const int64_t *run_rows = rows + b * run;
        for (int64_t i = 0; i < run; i++) {
            if (i + ROWS_AHEAD < run) prefetch_row(grad + run_rows[i + ROWS_AHEAD] * e, e, 1);
            float *target = grad + run_rows[i] * e;
            const int64_t group = i / s, place = i % s;
            for (int64_t j = 0; j < d + dv; j++) kv[j] = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                const int64_t window = group - g;
                if (window < 0 || window >= m) continue;
                const float *k = gk + ((b * m + window) * w + g * s + place) * d;
                const float *v = gv + ((b * m + window) * w + g * s + place) * dv;
#pragma omp simd
                for (int64_t j = 0; j < d; j++) kv[j] += k[j];
#pragma omp simd
                for (int64_t j = 0; j < dv; j++) kv[d + j] += v[j];
            }
            if (i >= c) {
                const float *q = gq + (b * m * s + i - c) * d;
#pragma omp simd
                for (int64_t j = 0; j < d; j++) target[j] += q[j];
            }
#pragma omp simd
            for (int64_t j = 0; j < d + dv; j++) target[d + j] += kv[j];
        }
    }
}

/* The packed [q | k | v] rows of the forward from the shared query/keys qk (n, d) and the
 * values v (n, dv), both rows of contiguous features: q = qk * scale, k = qk / max(|qk|, floor)
 * and norm[i] = |qk_i| (its gradient needs it). */
void reformer_pack_qkv(const float *qk, const float *v, float *qkv, float *norm, int64_t n, int64_t d, int64_t dv,
                       float scale, float floor_) {
    for (int64_t i = 0; i < n; i++) {
        const float *x = qk + i * d;
        float *row = qkv + i * (2 * d + dv);
        float sumsq = 0.0f;
#pragma omp simd reduction(+ : sumsq)
        for (int64_t j = 0; j < d; j++) sumsq += x[j] * x[j];
        const float nrm = sqrtf(sumsq), denom = nrm > floor_ ? nrm : floor_;
        norm[i] = nrm;
#pragma omp simd
        for (int64_t j = 0; j < d; j++) {
            row[j] = x[j] * scale;
            row[d + j] = x[j] / denom;
        }
        __builtin_memcpy(row + 2 * d, v + i * dv, dv * sizeof(float));
    }
}

/* The gradient of qk from those of q and k, in place in the q columns of grad (n, 2d + dv):
 * g_q * scale + (g_k - k (k . g_k)) / max(|qk|, floor), where a norm under the floor passes
 * g_k / floor (the clamp is flat there). k are the packed unit keys of qkv. */
void reformer_fold_qk_grad(float *grad, const float *qkv, const float *norm, int64_t n, int64_t d, int64_t dv,
                           float scale, float floor_) {
    const int64_t e = 2 * d + dv;
    for (int64_t i = 0; i < n; i++) {
        float *g = grad + i * e;
        const float *k = qkv + i * e + d;
        float along = 0.0f;
        if (norm[i] > floor_) {
#pragma omp simd reduction(+ : along)
            for (int64_t j = 0; j < d; j++) along += k[j] * g[d + j];
        }
        const float inv = 1.0f / (norm[i] > floor_ ? norm[i] : floor_);
#pragma omp simd
        for (int64_t j = 0; j < d; j++) g[j] = g[j] * scale + (g[d + j] - k[j] * along) * inv;
    }
}

/* Bucket ids argmax([x, -x]) of rows of r projections (row i at x + i * stride), the first
 * index on ties: the larger of the top value and the negated bottom one, the top's on a tie.
 * Eight lanes keep their own top and bottom (the first of equals); the lanes are merged
 * preferring the lower index among equals. NaN entries are never chosen. */
void reformer_argmax_both_signs(const float *x, int64_t *ids, int64_t rows, int64_t r, int64_t stride) {
    const i8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    const int64_t n = (r + LANES - 1) / LANES;
    for (int64_t i = 0; i < rows; i++) {
        const float *row = x + i * stride;
        f8 top = splat(-INFINITY), bottom = splat(INFINITY);
        i8 top_at = lane, bottom_at = lane;
        for (int64_t k = 0; k < n; k++) {
            const int64_t count = k + 1 < n ? LANES : r - k * LANES;
            const i8 at = lane + (int32_t)(k * LANES), inside = at < (int32_t)r;
            const f8 v = load8(row + k * LANES, count);
            const i8 higher = (v > top) & inside, lower = (v < bottom) & inside;
            top = select8(higher, v, top);
            top_at = (at & higher) | (top_at & ~higher);
            bottom = select8(lower, v, bottom);
            bottom_at = (at & lower) | (bottom_at & ~lower);
        }
        float best_top = top[0], best_bottom = bottom[0];
        int32_t best_top_at = top_at[0], best_bottom_at = bottom_at[0];
        for (int l = 1; l < LANES; l++) {
            if (top[l] > best_top || (top[l] == best_top && top_at[l] < best_top_at)) {
                best_top = top[l];
                best_top_at = top_at[l];
            }
            if (bottom[l] < best_bottom || (bottom[l] == best_bottom && bottom_at[l] < best_bottom_at)) {
                best_bottom = bottom[l];
                best_bottom_at = bottom_at[l];
            }
        }
        ids[i] = best_top >= -best_bottom ? best_top_at : best_bottom_at + r;
    }
}

/* Rows of n bucket ids (in [0, n_ids)) sorted by (id, position): a counting sort, stable, so
 * equal ids keep their positions' order. perm[k]: the position at slot k; inv[p]: the slot of
 * position p; sorted[k]: the id at slot k. counts: n_ids of scratch. Returns -1 (and stops)
 * at an id outside [0, n_ids), else 0. */
int reformer_bucket_sort(const int64_t *ids, int64_t rows, int64_t n, int64_t n_ids, int64_t *perm, int64_t *inv,
                         int64_t *sorted, int64_t *counts) {
    for (int64_t r = 0; r < rows; r++) {
        const int64_t *row = ids + r * n;
        int64_t *rp = perm + r * n, *ri = inv + r * n, *rs = sorted + r * n;
        for (int64_t b = 0; b < n_ids; b++) counts[b] = 0;
        for (int64_t p = 0; p < n; p++) {
            if (row[p] < 0 || row[p] >= n_ids) return -1;
            counts[row[p]]++;
        }
        for (int64_t b = 0, start = 0; b < n_ids; b++) { /* counts become each id's first slot */
            const int64_t count = counts[b];
            counts[b] = start;
            start += count;
        }
        for (int64_t p = 0; p < n; p++) {
            const int64_t slot = counts[row[p]]++;
            rp[slot] = p;
            ri[p] = slot;
            rs[slot] = row[p];
        }
    }
    return 0;
}

/* Rounds combined as they are computed (no per-slot outputs kept): a block's query slots, with
 * outputs o (n, dv) and log-sum-exps lse (n,), are added to their positions' rows out[rows[i]]
 * with weight exp(lse - top), top being the largest lse seen so far for that position (earlier
 * sums rescaled when it grows) and total the sum of the weights. finish_rounds then divides
 * each row by its total: the softmax of the rounds' lse (slots.round_weights). */
void reformer_accumulate_rounds(float *out, float *top, float *total, const float *o, const float *lse,
                                const int64_t *rows, int64_t n, int64_t dv) {
    for (int64_t i = 0; i < n; i++) {
        if (i + ROWS_AHEAD < n) prefetch_row(out + rows[i + ROWS_AHEAD] * dv, dv, 1);
        const int64_t p = rows[i];
        float *acc = out + p * dv;
        const float *x = o + i * dv;
        if (lse[i] > top[p]) { /* a new largest: earlier sums shrink by exp(top - lse) (0 at first) */
            const float scale = expf(top[p] - lse[i]);
#pragma omp simd
            for (int64_t j = 0; j < dv; j++) acc[j] = acc[j] * scale + x[j];
            total[p] = total[p] * scale + 1.0f;
            top[p] = lse[i];
        } else {
            const float weight = expf(lse[i] - top[p]);
#pragma omp simd
            for (int64_t j = 0; j < dv; j++) acc[j] += x[j] * weight;
            total[p] += weight;
        }
    }
}

/* After every round: out rows (positions, dv) divided by their totals, and every slot's round
 * weight exp(slot_lse - top) / total of its position (slot k is at position slot_rows[k]): a
 * softmax, not exp(lse - (top + log total)), which near the own-key logit -5e4 would round
 * top + log total to fp32's 0.004 there. */
void reformer_finish_rounds(float *out, const float *top, const float *total, const float *slot_lse,
                            const int64_t *slot_rows, float *weight, int64_t positions, int64_t slots, int64_t dv) {
    for (int64_t p = 0; p < positions; p++) {
        const float inv = 1.0f / total[p];
        float *acc = out + p * dv;
#pragma omp simd
        for (int64_t j = 0; j < dv; j++) acc[j] *= inv;
    }
    for (int64_t k = 0; k < slots; k++) {
        const int64_t p = slot_rows[k];
        weight[k] = expf(slot_lse[k] - top[p]) / total[p];
    }
}

/* ---- Window matmuls: the forward of a block of strict causal windows in one pass ---------- */

/* Register tiles of ROWS x VECS vectors of the widest vectors the machine has: the product of
 * a window's small matrices is computed in registers, with no packing and no call per matrix
 * (the batched matmul spent more on those than on arithmetic at these sizes). */
#ifdef __AVX512F__
#define VL 16
#define TILE_ROWS 8
#else
#define VL 8
#define TILE_ROWS 4
#endif
typedef float vf __attribute__((vector_size(VL * 4), aligned(4)));
#define LOADV(p) (*(const vf *)(p))
#define STOREV(p, x) (*(vf *)(p) = (x))

/* out[r][0 : VL * V] (row stride ldo) = sum_i a[r * ar + i * ai] b[i][0 : VL * V] over i < n,
 * r < R; with add, added to out instead. a's strides let it be a transposed matrix. */
#define PRODUCT_TILE(name, R, V)                                                                      \
    static inline void name(const float *a, int64_t ar, int64_t ai, const float *b, int64_t ldb,     \
                            float *out, int64_t ldo, int64_t n, int add) {                            \
        vf acc[R][V];                                                                                 \
        for (int r = 0; r < R; r++)                                                                   \
            for (int v = 0; v < V; v++) acc[r][v] = (vf){0};                                          \
        for (int64_t i = 0; i < n; i++) {                                                             \
            vf bv[V];                                                                                 \
            for (int v = 0; v < V; v++) bv[v] = LOADV(b + i * ldb + VL * v);                          \
            for (int r = 0; r < R; r++) {                                                             \
                const float x = a[r * ar + i * ai];                                                   \
                for (int v = 0; v < V; v++) acc[r][v] += x * bv[v];                                   \
            }                                                                                         \
        }                                                                                             \
        for (int r = 0; r < R; r++)                                                                   \
            for (int v = 0; v < V; v++) {                                                             \
                float *at = out + r * ldo + VL * v;                                                   \
                STOREV(at, add ? LOADV(at) + acc[r][v] : acc[r][v]);                                  \
            }                                                                                         \
    }
PRODUCT_TILE(product_tile, TILE_ROWS, 3)      /* 24 accumulators with AVX-512, 12 with AVX */
PRODUCT_TILE(product_wide, TILE_ROWS / 2, 4)  /* for rows of 4 vectors: half the rows, 16 (8) */
PRODUCT_TILE(product_column, TILE_ROWS, 1)

/* Strict causal windows are mostly hidden: query i of a window sees only keys [c + i - span,
 * c + i], on average about a third of them. A band per group of BAND_ROWS rows of a product
 * (the smallest tile height) says which inner indices or output columns it needs: [lo, hi). */
#define BAND_ROWS (TILE_ROWS / 2)
typedef struct {
    int64_t lo, hi;
} band;

/* The union of the bands of rows [r, r + count) (count a multiple of BAND_ROWS) */
static inline band band_union(const band *bands, int64_t r, int64_t count) {
    band u = bands[r / BAND_ROWS];
    for (int64_t g = r / BAND_ROWS + 1; g < (r + count) / BAND_ROWS; g++) {
        if (bands[g].lo < u.lo) u.lo = bands[g].lo;
        if (bands[g].hi > u.hi) u.hi = bands[g].hi;
    }
    return u;
}

/* small_product with a row tile's inner indices limited to its rows' bands (a is 0 outside
 * them), for products with add: tiles of TILE_ROWS / 2 rows and 4 vectors where cols allow. */
static void inner_banded_product(const float *a, int64_t ar, int64_t ai, const float *b, int64_t ldb, float *out,
                                 int64_t ldo, int64_t rows, int64_t cols, const band *inner) {
    const int wide = cols % (4 * VL) == 0;
    const int64_t height = wide ? TILE_ROWS / 2 : TILE_ROWS;
    for (int64_t r = 0; r < rows; r += height) {
        const band u = band_union(inner, r, height);
        if (u.hi <= u.lo) continue;
        const float *ar0 = a + r * ar + u.lo * ai, *b0 = b + u.lo * ldb;
        float *o = out + r * ldo;
        int64_t j = 0;
        if (wide) {
            for (; j < cols; j += 4 * VL) product_wide(ar0, ar, ai, b0 + j, ldb, o + j, ldo, u.hi - u.lo, 1);
            continue;
        }
        for (; j + 3 * VL <= cols; j += 3 * VL) product_tile(ar0, ar, ai, b0 + j, ldb, o + j, ldo, u.hi - u.lo, 1);
        for (; j < cols; j += VL) product_column(ar0, ar, ai, b0 + j, ldb, o + j, ldo, u.hi - u.lo, 1);
    }
}

/* small_product (without add) computing only the output columns in a row tile's bands,
 * widened to whole vectors; the other columns of out are left as they were. */
static void column_banded_product(const float *a, int64_t ar, int64_t ai, const float *b, int64_t ldb, float *out,
                                  int64_t ldo, int64_t rows, int64_t n, const band *columns) {
    for (int64_t r = 0; r < rows; r += TILE_ROWS) {
        const band u = band_union(columns, r, TILE_ROWS);
        int64_t j = u.lo / VL * VL;
        const int64_t end = (u.hi + VL - 1) / VL * VL;
        const float *ar0 = a + r * ar;
        float *o = out + r * ldo;
        for (; j + 3 * VL <= end; j += 3 * VL) product_tile(ar0, ar, ai, b + j, ldb, o + j, ldo, n, 0);
        for (; j < end; j += VL) product_column(ar0, ar, ai, b + j, ldb, o + j, ldo, n, 0);
    }
}

/* The bands of a strict window's s queries (span_row as reformer_strict_softmax takes it) over
 * its c + s keys, per group of BAND_ROWS queries: keys [min(c + i - span_i), c + last + 1);
 * and, per group of BAND_ROWS keys, the queries that see any of them. */
static void strict_bands(const int64_t *span_row, int64_t s, int64_t c, band *by_query, band *by_key) {
    int64_t first_seen[MAX_WIDTH]; /* per query: its first visible key */
    for (int64_t i = 0; i < s; i++) first_seen[i] = c + i - span_row[i] / s;
    for (int64_t g = 0; g < s / BAND_ROWS; g++) {
        band q = {first_seen[g * BAND_ROWS], c + (g + 1) * BAND_ROWS};
        for (int64_t i = g * BAND_ROWS + 1; i < (g + 1) * BAND_ROWS; i++)
            if (first_seen[i] < q.lo) q.lo = first_seen[i];
        by_query[g] = q;
    }
    for (int64_t g = 0; g < (c + s) / BAND_ROWS; g++) {
        /* key j is seen by query i when first_seen[i] <= j <= c + i: so i >= j - c, and i <= j */
        const int64_t j0 = g * BAND_ROWS, j1 = j0 + BAND_ROWS - 1;
        band k = {j0 - c > 0 ? j0 - c : 0, 0};
        int64_t i = j1 < s - 1 ? j1 : s - 1;
        while (i >= k.lo && first_seen[i] > j1) i--;
        k.hi = i + 1;
        by_key[g] = k;
    }
}

/* The strict softmax backward (reformer_softmax_backward) of a window's rows g (s, c + s) whose
 * logit gradients were computed only in their bands' columns (as column_banded_product widens
 * them): there g = (g - shift) * p, elsewhere 0 (p is 0 there too), and 0 at the own key. */
static void banded_softmax_backward(float *g, const float *p, const float *shift, int64_t s, int64_t c,
                                    const band *by_query) {
    const int64_t w = c + s;
    for (int64_t r = 0; r < s; r++) {
        const band u = band_union(by_query, r / TILE_ROWS * TILE_ROWS, TILE_ROWS);
        const int64_t lo = u.lo / VL * VL, hi = (u.hi + VL - 1) / VL * VL;
        float *row = g + r * w;
        const float *pr = p + r * w;
        const float sh = shift[r];
        for (int64_t j = 0; j < lo; j++) row[j] = 0.0f;
#pragma omp simd
        for (int64_t j = lo; j < hi; j++) row[j] = (row[j] - sh) * pr[j];
        for (int64_t j = hi; j < w; j++) row[j] = 0.0f;
        row[c + r] = 0.0f;
    }
}

#if defined(__clang__)
#define SHUFFLE(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE(a, b, ...) __builtin_shuffle(a, b, (i8){__VA_ARGS__})
#endif

/* t (8 x 8, stride ldt) = the transpose of x (8 x 8, stride ldx): three rounds of interleaving */
static inline void transpose8(const float *x, int64_t ldx, float *t, int64_t ldt) {
    f8 r[8], u[8];
    for (int l = 0; l < 8; l++) r[l] = load8(x + l * ldx, LANES);
    for (int l = 0; l < 8; l += 2) { /* pairs of rows, element by element */
        u[l] = SHUFFLE(r[l], r[l + 1], 0, 8, 1, 9, 4, 12, 5, 13);
        u[l + 1] = SHUFFLE(r[l], r[l + 1], 2, 10, 3, 11, 6, 14, 7, 15);
    }
    for (int l = 0; l < 8; l += 4) /* pairs of pairs */
        for (int k = 0; k < 2; k++) {
            r[l + 2 * k] = SHUFFLE(u[l + k], u[l + k + 2], 0, 1, 8, 9, 4, 5, 12, 13);
            r[l + 2 * k + 1] = SHUFFLE(u[l + k], u[l + k + 2], 2, 3, 10, 11, 6, 7, 14, 15);
        }
    for (int k = 0; k < 4; k++) { /* halves: column k from r[k] and r[k + 4], column k + 4 too */
        store8(t + k * ldt, SHUFFLE(r[k], r[k + 4], 0, 1, 2, 3, 8, 9, 10, 11), LANES);
        store8(t + (k + 4) * ldt, SHUFFLE(r[k], r[k + 4], 4, 5, 6, 7, 12, 13, 14, 15), LANES);
    }
}

/* columns [from, from + count) of rows (length of them, stride e) as rows: t[j * length + i] */
static void transpose_columns(const float *rows, int64_t e, int64_t from, int64_t count, int64_t length,
                              float *t) {
    const int64_t whole = length - length % 8, cols = count - count % 8;
    for (int64_t i = 0; i < whole; i += 8)
        for (int64_t j = 0; j < cols; j += 8) transpose8(rows + i * e + from + j, e, t + j * length + i, length);
    for (int64_t i = 0; i < length; i++)
        for (int64_t j = i < whole ? cols : 0; j < count; j++) t[j * length + i] = rows[i * e + from + j];
}

/* The fused kernels below work through a batch row's windows a chunk at a time: its key run
 * (the chunk's m * s query slots and the c before them) gathered into a scratch buffer and
 * its keys or values transposed, sized to stay in cache with the window's tiles. */

/* The forward of strict causal windows (see reformer_strict_softmax), fused: per window the
 * logits q k^T, their softmax and the outputs p v added to their positions' rows as
 * reformer_accumulate_rounds does. nb batch rows of n windows; ext_row (nb, c + n * s): the
 * qkv row of each slot in ext order (a row's last c slots first); span_row and query_rows
 * (nb, n * s): each query slot's strict mask row and its position row in out. Writes the
 * probabilities (nb * n, s, c + s), unless probs is NULL, and the log-sum-exps (nb * n * s).
 * scratch: (chunk * s + c) * (2d + dv + d) + s * (dv + 2 * (c + s)) floats. Needs s a multiple
 * of 8, c + s, d and dv multiples of 16 (every machine's TILE_ROWS and VL divide those). */
void reformer_strict_windows_forward(const float *qkv, const int64_t *ext_row, const int64_t *span_row,
                                     const int64_t *query_rows, int64_t nb, int64_t n, int64_t chunk, int64_t s,
                                     int64_t c, int64_t d, int64_t dv, float self_value, float *probs, float *lse,
                                     float *out, float *top, float *total, float *scratch) {
    const int64_t e = 2 * d + dv, w = c + s, slots = n * s, longest = chunk * s + c;
    float *run = scratch, *keys_t = run + longest * e, *o = keys_t + d * longest, *logits = o + s * dv;
    float *spare = logits + s * w;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t j0 = 0; j0 < n; j0 += chunk) {
            const int64_t m = n - j0 < chunk ? n - j0 : chunk, length = m * s + c;
            reformer_gather_rows(qkv, ext_row + b * (c + slots) + j0 * s, run, length, e);
            transpose_columns(run, e, d, d, length, keys_t); /* keys as columns: a window's are a slice */
            for (int64_t win = 0; win < m; win++) {
                const int64_t slot = b * slots + (j0 + win) * s; /* the window's first query slot */
                float *p = probs ? probs + slot * w : spare;
                band by_query[MAX_WIDTH / BAND_ROWS], by_key[MAX_WIDTH / BAND_ROWS];
                strict_bands(span_row + slot, s, c, by_query, by_key);
                column_banded_product(run + (c + win * s) * e, e, 1, keys_t + win * s, length, logits, w, s, d,
                                      by_query);
                reformer_strict_softmax(logits, p, lse + slot, span_row + slot, s, s, c, self_value, 0);
                __builtin_memset(o, 0, s * dv * sizeof(float));
                inner_banded_product(p, w, 1, run + win * s * e + 2 * d, e, o, dv, s, dv, by_query);
                reformer_accumulate_rounds(out, top, total, o, lse + slot, query_rows + slot, s, dv);
            }
        }
    }
}

/* The backward of reformer_strict_windows_forward's windows: per window, the output gradient
 * of its queries (grad_out rows at query_rows times their round weights, with shift = weight
 * * (g . out), as window_torch.TorchWindows.backward derives), the gradients of the values p^T g, of
 * the logits (g v^T - shift) * p, of the queries and of the keys; summed per chunk in a buffer
 * of its key run, then added to grad (rows, 2d + dv) at the run's qkv rows minus first_row.
 * scratch: (chunk * s + c) * (2 * (2d + dv) + dv) + s * (chunk * dv + c + s + 1) floats. */
void reformer_strict_windows_backward(const float *qkv, const int64_t *ext_row, const int64_t *span_row,
                                      const int64_t *query_rows, const float *weight, int64_t first_row, int64_t nb,
                                      int64_t n, int64_t chunk,
                                      int64_t s, int64_t c, int64_t d, int64_t dv, const float *probs,
                                      const float *grad_out, const float *g_dot_out, float *grad, float *scratch) {
    const int64_t e = 2 * d + dv, w = c + s, slots = n * s, longest = chunk * s + c;
    float *run = scratch, *values_t = run + longest * e, *acc = values_t + dv * longest, *go = acc + longest * e;
    float *gd = go + chunk * s * dv, *shift = gd + s * w;
    for (int64_t b = 0; b < nb; b++) {
        for (int64_t j0 = 0; j0 < n; j0 += chunk) {
            const int64_t m = n - j0 < chunk ? n - j0 : chunk, length = m * s + c;
            const int64_t *run_rows = ext_row + b * (c + slots) + j0 * s;
            reformer_gather_rows(qkv, run_rows, run, length, e);
            transpose_columns(run, e, 2 * d, dv, length, values_t);
            __builtin_memset(acc, 0, length * e * sizeof(float));
            const int64_t chunk_slot = b * slots + j0 * s; /* the chunk's first query slot */
            reformer_gather_rows(grad_out, query_rows + chunk_slot, go, m * s, dv);
            for (int64_t win = 0; win < m; win++) {
                const int64_t slot = chunk_slot + win * s;
                const float *p = probs + slot * w, *q = run + (c + win * s) * e, *keys = run + win * s * e;
                float *g = go + win * s * dv; /* the window's queries' output gradients */
                for (int64_t i = 0; i < s; i++) {
                    const float wt = weight[slot + i];
#pragma omp simd
                    for (int64_t j = 0; j < dv; j++) g[i * dv + j] *= wt;
                    shift[i] = g_dot_out[query_rows[slot + i]] * wt;
                }
                band by_query[MAX_WIDTH / BAND_ROWS], by_key[MAX_WIDTH / BAND_ROWS];
                strict_bands(span_row + slot, s, c, by_query, by_key);
                float *window_acc = acc + win * s * e; /* the window's keys' rows of the run */
                inner_banded_product(p, 1, w, g, dv, window_acc + 2 * d, e, w, dv, by_key); /* values: p^T g */
                column_banded_product(g, dv, 1, values_t + win * s, length, gd, w, s, dv, by_query); /* g v^T */
                banded_softmax_backward(gd, p, shift, s, c, by_query);
                inner_banded_product(gd, w, 1, keys + d, e, acc + (c + win * s) * e, e, s, d, by_query); /* q */
                inner_banded_product(gd, 1, w, q, e, window_acc + d, e, w, d, by_key);                   /* k */
            }
            for (int64_t i = 0; i < length; i++) {
                if (i + ROWS_AHEAD < length) prefetch_row(grad + (run_rows[i + ROWS_AHEAD] - first_row) * e, e, 1);
                float *target = grad + (run_rows[i] - first_row) * e;
                const float *from = acc + i * e;
#pragma omp simd
                for (int64_t j = 0; j < e; j++) target[j] += from[j];
            }
        }
    }
}
