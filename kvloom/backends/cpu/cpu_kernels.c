/* kvloom's CPU kernels for bf16 models on x86-64 with AVX-512 BF16 (AMD Zen 4+, Intel Cooper Lake+).
 *
 * Plain C with OpenMP, built by build.py beside it with the system compiler (at install or first use) and
 * called through ctypes with raw pointers: no PyTorch headers, so the build takes about a second.
 * The shared object needs libgomp.so.1 by soname, so inside a process where torch is loaded it shares
 * torch's OpenMP runtime and thread pool (one set of threads, never two spinning against each other).
 *
 * Every kernel computes in fp32 and rounds to bf16 once per output element, as PyTorch's CPU kernels do.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

typedef uint16_t bf16;

#define INLINE static inline __attribute__((always_inline))

INLINE float b2f(bf16 v) {
    union { uint32_t u; float f; } c;
    c.u = (uint32_t)v << 16;
    return c.f;
}

INLINE bf16 f2b(float f) { /* round to nearest even, NaN stays NaN */
    union { uint32_t u; float f; } c;
    c.f = f;
    if ((c.u & 0x7fffffffu) > 0x7f800000u) return (bf16)((c.u >> 16) | 0x40);
    c.u += 0x7fffu + ((c.u >> 16) & 1u);
    return (bf16)(c.u >> 16);
}

INLINE __m512 load16(const bf16 *p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

INLINE __m512 load16_mask(const bf16 *p, __mmask16 m) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

INLINE __m512 round16(__m512 v) { /* fp32 -> nearest bf16 -> fp32 */
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(v)), 16));
}

/* exp(x) in fp32, ~1 ulp: exp(x) = 2^n * exp(r), n = round(x / ln 2), |r| <= ln 2 / 2, degree-6 Taylor. */
INLINE __m512 exp16(__m512 x) {
    x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(88.3762626647949f)), _mm512_set1_ps(-103.972077f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

INLINE void store16(bf16 *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }

INLINE void store16_mask(bf16 *p, __m512 v, __mmask16 m) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}

/* ---------------------------------------------------------------------------------------------------
 * Linear on packed weights: y[m, n] = bf16(sum_k x[m, k] * w[n, k] + bias[n]).
 * The weight is packed once at load (kvloom/backends/cpu/kernels.py, pack_linear_weight) as
 * [ceil(N / 16), K / 2, 16, 2]: for each block of 16 outputs, the K/2 pairs of consecutive k, 16 outputs
 * wide. One vdpbf16ps then adds a broadcast pair of x into all 16 outputs of a block: no horizontal sums,
 * and each block is one contiguous stream, which the hardware prefetcher follows at full bandwidth.
 * Threads split groups of 3 blocks (48 outputs); each group's weights are read from memory once and
 * stay in L1/L2 while every tile of up to 8 input rows is multiplied with them (8 x 3 = 24 accumulators:
 * 3 weight loads and 8 broadcasts per 24 vdpbf16ps).
 */
#define LIN_ROWS 8 /* row tiles of 8, then 4, 2, 1 (TILES below) */
/* Overridable for A/B builds (bench/kernel_ab.py --variant name=src.c:-DLIN_MC=128): */
#ifndef LIN_GROUP
#define LIN_GROUP 3 /* blocks of 16 outputs per group, at most 4 */
#endif
#ifndef LIN_MC
#define LIN_MC 256 /* rows per chunk */
#endif
#ifndef LIN_PF_MIN_TILES
#define LIN_PF_MIN_TILES 2 /* fewer row tiles per group: no prefetch of the next group */
#endif

INLINE int tile_rows(int64_t left) { return left >= 8 ? 8 : left >= 4 ? 4 : left >= 2 ? 2 : 1; }

/* A tile's fp32 sums (rows `row_stride` floats apart, 16 outputs per block) + bias -> bf16 outputs,
 * masking the columns past N. */
INLINE void store_tile(const float *acc, int64_t row_stride, int mm, int nb, int64_t b0, const bf16 *bias, bf16 *y,
                       int64_t ldy, int64_t m0, int64_t N) {
    for (int i = 0; i < mm; i++)
        for (int b = 0; b < nb; b++) {
            const int64_t n0 = (b0 + b) * 16;
            if (n0 >= N) continue; /* a padding block */
            __m512 v = _mm512_loadu_ps(acc + i * row_stride + b * 16);
            const __mmask16 m = N - n0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1u);
            if (bias) v = _mm512_add_ps(v, load16_mask(bias + n0, m));
            store16_mask(y + (m0 + i) * ldy + n0, v, m);
        }
}

/* MM rows x NB blocks over all of K. Along the way it prefetches `pf_lines` 64-byte lines from `pf` (its
 * share of the next group's weights), spread evenly over the k steps. */
INLINE void linear_tile(int MM, int NB, const bf16 *x, int64_t ldx, const bf16 *wp, int64_t K,
                        float acc_out[LIN_ROWS][LIN_GROUP][16], const char *pf, int64_t pf_lines) {
    __m512 acc[LIN_ROWS][LIN_GROUP];
    for (int i = 0; i < MM; i++)
        for (int b = 0; b < NB; b++) acc[i][b] = _mm512_setzero_ps();
    const int64_t block_stride = K * 16;
    const int64_t pf_per_step = (pf_lines + K / 2 - 1) / (K / 2);
    for (int64_t kp = 0; kp < K / 2; kp++) {
        for (int64_t j = kp * pf_per_step; j < (kp + 1) * pf_per_step && j < pf_lines; j++)
            _mm_prefetch(pf + j * 64, _MM_HINT_T0);
        __m512bh wv[LIN_GROUP];
        for (int b = 0; b < NB; b++) wv[b] = (__m512bh)_mm512_loadu_si512(wp + b * block_stride + kp * 32);
        for (int i = 0; i < MM; i++) {
            const __m512bh xb = (__m512bh)_mm512_set1_epi32(*(const int32_t *)(x + i * ldx + 2 * kp));
            for (int b = 0; b < NB; b++) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], xb, wv[b]);
        }
    }
    for (int i = 0; i < MM; i++)
        for (int b = 0; b < NB; b++) _mm512_storeu_ps(acc_out[i][b], acc[i][b]);
}

/* Row tiles of 8, then 4, 2, 1 for the rest: 12 instantiations (compile time is start-up time). */
#define TILE(MM, NB) linear_tile(MM, NB, xt, ldx, w, K, acc, pf, pf_lines)
#define TILES(NB)                                                                                                \
    switch (mm) {                                                                                                \
    case 1: TILE(1, NB); break;                                                                                  \
    case 2: TILE(2, NB); break;                                                                                  \
    case 4: TILE(4, NB); break;                                                                                  \
    default: TILE(8, NB); break;                                                                                 \
    }

/* Each thread takes an equal, contiguous share of the 16-output blocks (an uneven split of groups
 * left one thread idle for up to a quarter of the small layers, e.g. 9 groups of N = 576), in groups of up
 * to LIN_GROUP blocks; must be called by every thread of the team (it ends with a barrier).
 * While a group is multiplied, its row tiles prefetch the thread's next group into L1, each tile an equal
 * share: at 32 rows the weights stream from memory every step, and the hardware prefetcher alone left
 * each group's first tile waiting on them (A/B in one engine, bench/kernel_ab.py: gate/up 12.2 -> 10.2 ms
 * per step with these tiles and prefetches, from 4 x 4 tiles without). */
static void linear_bf16_body(const bf16 *x, int64_t ldx, const bf16 *wp, const bf16 *bias, bf16 *y, int64_t ldy,
                             int64_t M, int64_t N, int64_t K) {
    const int64_t nblocks = (N + 15) / 16;
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t b_hi = nblocks * (t + 1) / nt;
    /* Rows in chunks of LIN_MC, each chunk over all of the thread's groups: a chunk's x stays in L2 while
     * the weights are read once per chunk, instead of all of x (2048 prefill rows: 2.4 MB) per group. */
    for (int64_t c0 = 0; c0 < M; c0 += LIN_MC) {
        const int64_t c1 = M - c0 < LIN_MC ? M : c0 + LIN_MC;
        int64_t ntiles = 0; /* row tiles per group: 8s, then one each of 4, 2, 1 as the remainder needs */
        for (int64_t m0 = c0; m0 < c1; ntiles++) m0 += tile_rows(c1 - m0);
        for (int64_t b0 = nblocks * t / nt; b0 < b_hi; b0 += LIN_GROUP) {
            const int nb = b_hi - b0 < LIN_GROUP ? (int)(b_hi - b0) : LIN_GROUP;
            const bf16 *w = wp + b0 * 16 * K;
            const int64_t next = b0 + nb, next_nb = b_hi - next < LIN_GROUP ? b_hi - next : LIN_GROUP;
            /* lines of the next group (none after the thread's last, nor for one tile, where the tile
             * itself streams the weights and prefetches only compete with it) */
            const int64_t lines = ntiles >= LIN_PF_MIN_TILES ? next_nb * K / 2 : 0;
            const int64_t share = (lines + ntiles - 1) / ntiles;
            int64_t tile = 0;
            for (int64_t m0 = c0; m0 < c1; tile++) {
                const int mm = tile_rows(c1 - m0);
                const bf16 *xt = x + m0 * ldx;
                const char *pf = (const char *)(wp + next * 16 * K) + tile * share * 64;
                const int64_t left = lines - tile * share, pf_lines = left < 0 ? 0 : left < share ? left : share;
                float acc[LIN_ROWS][LIN_GROUP][16];
                switch (nb) {
                case 1: TILES(1); break;
                case 2: TILES(2); break;
#if LIN_GROUP > 3
                case 3: TILES(3); break;
#endif
                default: TILES(LIN_GROUP); break;
                }
                store_tile(&acc[0][0][0], LIN_GROUP * 16, mm, nb, b0, bias, y, ldy, m0, N);
                m0 += mm;
            }
        }
    }
#pragma omp barrier
}

/* ---------------------------------------------------------------------------------------------------
 * RMSNorm, optionally fused with the residual add before it (the transformers Llama arithmetic):
 *   residual = bf16(x + residual)            (when residual is given; written back in place)
 *   h = residual or x;  out = bf16(w * bf16(h * rsqrt(mean(h^2) + eps)))
 * Rows are ldx / ldr / ldo elements apart; D must be a multiple of 16.
 */
INLINE void rms_row(const bf16 *xt, bf16 *rt, const bf16 *w, bf16 *ot, int64_t D, float eps) {
    __m512 ss = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
        __m512 h = load16(xt + d);
        if (rt) {
            h = round16(_mm512_add_ps(h, load16(rt + d)));
            store16(rt + d, h);
        }
        ss = _mm512_fmadd_ps(h, h, ss);
    }
    const __m512 r = _mm512_set1_ps(1.0f / sqrtf(_mm512_reduce_add_ps(ss) / (float)D + eps));
    const bf16 *src = rt ? rt : xt;
    for (int64_t d = 0; d < D; d += 16)
        store16(ot + d, _mm512_mul_ps(load16(w + d), round16(_mm512_mul_ps(load16(src + d), r))));
}

static void rms_norm_bf16_body(const bf16 *x, int64_t ldx, bf16 *residual, int64_t ldr, const bf16 *w, bf16 *out,
                      int64_t ldo, int64_t T, int64_t D, float eps) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++)
        rms_row(x + t * ldx, residual ? residual + t * ldr : NULL, w, out + t * ldo, D, eps);
}

void kv_rms_norm_bf16(const bf16 *x, int64_t ldx, bf16 *residual, int64_t ldr, const bf16 *w, bf16 *out,
                      int64_t ldo, int64_t T, int64_t D, float eps) {
#pragma omp parallel if (T > 16)
    rms_norm_bf16_body(x, ldx, residual, ldr, w, out, ldo, T, D, eps);
}

/* Per-head q and k norms in place in a fused projection's output: rows of qkv [T, W] hold H query heads
 * then KVH key heads of D each (the values after them are left alone); each head normalized as one row of
 * rms_norm (weights wq, wk). */
static void head_norm_bf16_body(bf16 *qkv, int64_t W, int64_t T, int64_t H, int64_t KVH, int64_t D, const bf16 *wq,
                                const bf16 *wk, float eps) {
#pragma omp for schedule(static)
    for (int64_t r = 0; r < T * (H + KVH); r++) {
        const int64_t t = r / (H + KVH), h = r % (H + KVH);
        bf16 *row = qkv + t * W + h * D;
        rms_row(row, NULL, h < H ? wq : wk, row, D, eps);
    }
}

void kv_head_norm_bf16(bf16 *qkv, int64_t W, int64_t T, int64_t H, int64_t KVH, int64_t D, const bf16 *wq,
                       const bf16 *wk, float eps) {
#pragma omp parallel if (T * (H + KVH) > 64)
    head_norm_bf16_body(qkv, W, T, H, KVH, D, wq, wk, eps);
}

/* ---------------------------------------------------------------------------------------------------
 * out[t, i] = bf16(bf16(silu(gate[t, i])) * up[t, i]) with gate = x[t, :I], up = x[t, I:2I].
 * I must be a multiple of 16.
 */
static void silu_mul_bf16_body(const bf16 *x, int64_t ldx, bf16 *out, int64_t ldo, int64_t T, int64_t I) {
    const int64_t chunks = I / 16;
#pragma omp for schedule(static)
    for (int64_t c = 0; c < T * chunks; c++) {
        const int64_t t = c / chunks, i = (c % chunks) * 16;
        const __m512 g = load16(x + t * ldx + i);
        const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        store16(out + t * ldo + i, _mm512_mul_ps(round16(s), load16(x + t * ldx + I + i)));
    }
}

void kv_silu_mul_bf16(const bf16 *x, int64_t ldx, bf16 *out, int64_t ldo, int64_t T, int64_t I) {
#pragma omp parallel if (T * I >= 16384)
    silu_mul_bf16_body(x, ldx, out, ldo, T, I);
}

/* out[t, i] = bf16(bf16(gelu(gate[t, i])) * up[t, i]), gelu's tanh approximation (Gemma's GeGLU):
 * 0.5 g (1 + tanh(u)) with u = sqrt(2 / pi) (g + 0.044715 g^3) and tanh(u) = 1 - 2 / (exp(2u) + 1): the
 * formula PyTorch evaluates (1 + tanh cancels to 0 for g below about -5 there too). */
static void gelu_tanh_mul_bf16_body(const bf16 *x, int64_t ldx, bf16 *out, int64_t ldo, int64_t T, int64_t I) {
    const int64_t chunks = I / 16;
    const __m512 one = _mm512_set1_ps(1.0f), two = _mm512_set1_ps(2.0f), half = _mm512_set1_ps(0.5f);
    const __m512 c0 = _mm512_set1_ps(0.7978845608028654f), c1 = _mm512_set1_ps(0.044715f);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < T * chunks; c++) {
        const int64_t t = c / chunks, i = (c % chunks) * 16;
        const __m512 g = load16(x + t * ldx + i);
        const __m512 u = _mm512_mul_ps(c0, _mm512_fmadd_ps(_mm512_mul_ps(c1, g), _mm512_mul_ps(g, g), g));
        const __m512 th = _mm512_sub_ps(one, _mm512_div_ps(two, _mm512_add_ps(exp16(_mm512_mul_ps(two, u)), one)));
        const __m512 gelu = _mm512_mul_ps(_mm512_mul_ps(half, g), _mm512_add_ps(one, th));
        store16(out + t * ldo + i, _mm512_mul_ps(round16(gelu), load16(x + t * ldx + I + i)));
    }
}

void kv_gelu_tanh_mul_bf16(const bf16 *x, int64_t ldx, bf16 *out, int64_t ldo, int64_t T, int64_t I) {
#pragma omp parallel if (T * I >= 16384)
    gelu_tanh_mul_bf16_body(x, ldx, out, ldo, T, I);
}

/* ---------------------------------------------------------------------------------------------------
 * Bytes widened to bf16 dot-product operands, exactly: int8 weights and KV caches, FP8 ones.
 */
/* One k pair of a block: 32 int8 (output j's two k at bytes 2j, 2j + 1) -> 32 bf16, exact. */
INLINE __m512i q8_pairs(const int8_t *p) {
    const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p)));
    const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)(p + 16))));
    return (__m512i)_mm512_cvtne2ps_pbh(hi, lo); /* lanes 0-15 from lo, 16-31 from hi */
}

/* 32 FP8 bytes with M mantissa bits (E4M3: 3, E5M2: 2) -> 32 bf16, exact (their mantissas fit bf16's 7,
 * their exponents bf16's). A normal byte s e..e m..m is the bf16 s | (mag << (7 - M)) + (bias << 7), bias
 * 127 - the format's (E4M3: 120, E5M2: 112); a subnormal one (e = 0: mag < 2^M) comes from `sub`, the
 * table of its 2^M values (index 0: zero). */
INLINE __m512i fp8_widen(const uint8_t *p, const int M, const int bias, const __m512i sub_table) {
    const __m512i v = _mm512_cvtepu8_epi16(_mm256_loadu_si256((const __m256i *)p));
    const __m512i mag = _mm512_and_si512(v, _mm512_set1_epi16(0x7f));
    const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(v, _mm512_set1_epi16(0x80)), 8);
    const __m512i normal = _mm512_add_epi16(_mm512_slli_epi16(mag, 7 - M), _mm512_set1_epi16(bias << 7));
    const __m512i sub = _mm512_permutexvar_epi16(mag, sub_table);
    const __m512i out =
        _mm512_mask_blend_epi16(_mm512_cmplt_epu16_mask(mag, _mm512_set1_epi16(1 << M)), normal, sub);
    return _mm512_or_si512(out, sign);
}

/* One k pair of a block in kind 10: FP8 E4M3 (subnormals m 2^-9). NaN (0x7f / 0xff) is not a weight: it
 * comes out as 480. */
INLINE __m512i fp8_pairs(const uint8_t *p) {
    return fp8_widen(p, 3, 120,
                     _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x3C60,
                                      0x3C40, 0x3C20, 0x3C00, 0x3BC0, 0x3B80, 0x3B00, 0));
}

/* FP8 E5M2 (fp16's top byte; subnormals m 2^-16). Inf / NaN (e = 31) are never written: KV values are scaled
 * to at most 57344. */
INLINE __m512i fp8e5_pairs(const uint8_t *p) {
    return fp8_widen(p, 2, 112,
                     _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                                      0x3840, 0x3800, 0x3780, 0));
}

/* ---------------------------------------------------------------------------------------------------
 * KV cache layout of the kernels (block_size a multiple of 16), per (KV head, block) of bs * D elements:
 *   K: [D / 2][bs][2]   position p, dim d at ((d / 2) * bs + p) * 2 + d % 2
 *   V: [bs / 2][D][2]   position p, dim d at ((p / 2) * D + d) * 2 + p % 2
 * so that attention runs on vdpbf16ps without horizontal sums: one instruction adds a broadcast pair of
 * query dims times a pair of key dims into the scores of 16 positions, and a broadcast pair of
 * probabilities times two positions' values into 16 output dims. Caches are [KVH, num_blocks, bs, D].
 *
 * Quantized caches (--kv-cache-dtype; `kv` below: 0 bf16, 1 int8, 2 FP8 E4M3, 3 FP8 E5M2) keep one byte per
 * element in the same layout, and after a block's bs * D bytes its positions' scales, bs bf16: a (position,
 * head)'s K (or V) is scale * q, scale = amax / QMAX rounded up to a bf16 (amax over its D values; 1 where
 * they are all 0), q = round(x / scale) to the nearest int8 / FP8 value. A (head, block) is then
 * bs * (D + 2) bytes: the cache is [KVH, num_blocks, bs, D + 2] uint8. Widened back to bf16 in registers
 * (exact: int8 and both FP8 kinds fit bf16), K's scale multiplies a position's score, V's its probability.
 */
static const float KV_QMAX[4] = {0.0f, 127.0f, 448.0f, 57344.0f};

INLINE int64_t kv_block_bytes(int kv, int64_t bs, int64_t D) { return kv ? bs * (D + 2) : bs * D * 2; }

/* 16 positions' bf16 scales (at byte address p) -> fp32 */
INLINE __m512 kv_scales16(const uint8_t *p) { return load16((const bf16 *)p); }

/* 32 cache bytes of kind kv (1..3) as bf16 operands */
INLINE __m512bh kv_widen32(const uint8_t *p, int kv) {
    return (__m512bh)(kv == 1 ? q8_pairs((const int8_t *)p) : kv == 2 ? fp8_pairs(p) : fp8e5_pairs(p));
}

/* D bf16 values -> their D bytes of kind kv and the bf16 scale: what KVFormat.quantize computes, bit for
 * bit (amax / QMAX rounded up to a bf16; x / scale by true division; int8 rounded half to even; FP8 rounded
 * to nearest even, subnormals too). */
INLINE bf16 kv_quantize_row(const bf16 *x, int64_t D, int kv, uint8_t *q) {
    __m512 m = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) m = _mm512_max_ps(m, _mm512_abs_ps(load16(x + d)));
    const float qmax = KV_QMAX[kv], amax = _mm512_reduce_max_ps(m);
    float scale = 1.0f;
    if (amax > 0.0f) {
        uint32_t bits;
        scale = amax / qmax;
        memcpy(&bits, &scale, 4);
        if (bits & 0xFFFF) bits = (bits + 0x10000) & 0xFFFF0000u;
        memcpy(&scale, &bits, 4);
    }
    const __m512 s = _mm512_set1_ps(scale), top = _mm512_set1_ps(qmax);
    for (int64_t d = 0; d < D; d += 16) {
        const __m512 y = _mm512_div_ps(load16(x + d), s);
        __m512i b;
        if (kv == 1) {
            b = _mm512_cvtps_epi32(_mm512_max_ps(_mm512_min_ps(y, top), _mm512_set1_ps(-qmax)));
        } else { /* FP8: normals rounded by integer arithmetic on the fp32 bits, subnormals by cvtps (RNE) */
            const int shift = kv == 2 ? 20 : 21;
            const __m512 a = _mm512_min_ps(_mm512_abs_ps(y), top);
            const __m512i bits = _mm512_castps_si512(a), sh = _mm512_set1_epi32(shift);
            const __m512i odd = _mm512_and_si512(_mm512_srlv_epi32(bits, sh), _mm512_set1_epi32(1));
            const __m512i up = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32((1 << (shift - 1)) - 1)));
            const __m512i normal = _mm512_sub_epi32(_mm512_srlv_epi32(up, sh), _mm512_set1_epi32(kv == 2 ? 120 << 3 : 112 << 2));
            const __m512i sub = _mm512_cvtps_epi32(_mm512_mul_ps(a, _mm512_set1_ps(kv == 2 ? 512.0f : 65536.0f)));
            const __mmask16 tiny = _mm512_cmp_ps_mask(a, _mm512_set1_ps(kv == 2 ? 0.015625f : 6.103515625e-05f), _CMP_LT_OQ);
            const __m512i sign = _mm512_and_si512(_mm512_srli_epi32(_mm512_castps_si512(y), 24), _mm512_set1_epi32(0x80));
            b = _mm512_or_si512(_mm512_mask_blend_epi32(tiny, normal, sub), sign);
        }
        _mm_storeu_si128((__m128i *)(q + d), _mm512_cvtepi32_epi8(b));
    }
    uint32_t bits;
    memcpy(&bits, &scale, 4);
    return (bf16)(bits >> 16);
}

/* Token `slot`'s K and V of KV head h (D values each) into the cache of kind kv. */
INLINE void cache_write_row(uint8_t *k_cache, uint8_t *v_cache, const bf16 *k, const bf16 *v, int64_t h, int64_t slot,
                            int64_t num_blocks, int64_t bs, int64_t D, int kv) {
    const int64_t b = slot / bs, p = slot % bs, BB = kv_block_bytes(kv, bs, D);
    uint8_t *kb = k_cache + (h * num_blocks + b) * BB, *vb = v_cache + (h * num_blocks + b) * BB;
    if (kv) {
        uint8_t qk[256], qv[256];
        ((bf16 *)(kb + bs * D))[p] = kv_quantize_row(k, D, kv, qk);
        ((bf16 *)(vb + bs * D))[p] = kv_quantize_row(v, D, kv, qv);
        for (int64_t i = 0; i < D / 2; i++) memcpy(kb + (i * bs + p) * 2, qk + 2 * i, 2);
        uint8_t *vrow = vb + (p / 2) * D * 2 + (p & 1);
        for (int64_t d = 0; d < D; d++) vrow[2 * d] = qv[d];
        return;
    }
    for (int64_t i = 0; i < D / 2; i++) memcpy(kb + (i * bs + p) * 4, k + 2 * i, 2 * sizeof(bf16));
    /* V: 16 dims at a time, each widened to a 32-bit lane and stored to the half of the pair that is p's. */
    bf16 *vrow = (bf16 *)vb + (p / 2) * D * 2;
    const __mmask32 half = (p & 1) ? 0xAAAAAAAAu : 0x55555555u;
    for (int64_t d = 0; d < D; d += 16) {
        __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)(v + d)));
        if (p & 1) w = _mm512_slli_epi32(w, 16);
        _mm512_mask_storeu_epi16(vrow + 2 * d, half, w);
    }
}

/* ---------------------------------------------------------------------------------------------------
 * Rotary embedding (rotate-half form) applied in place to q and k (when `rope`), then k and v written to
 * their cache slots in the layout above. Rows of a token are ldq / ldk / ldv elements apart (views into the
 * fused qkv output, or separate tensors); cos/sin are [max_positions, D] tables. The arithmetic mirrors
 * `q * cos + rotate_half(q) * sin` in bf16: each product rounded, then the sum rounded.
 */
INLINE void rope_row(bf16 *x, const bf16 *cos, const bf16 *sin, int64_t D) {
    const int64_t half = D / 2;
    if (half % 16 == 0) { /* 16 dims of each half at a time, the same roundings as below */
        for (int64_t d = 0; d < half; d += 16) {
            const __m512 x1 = load16(x + d), x2 = load16(x + d + half);
            const __m512 lo = _mm512_add_ps(round16(_mm512_mul_ps(x1, load16(cos + d))),
                                            round16(_mm512_mul_ps(_mm512_xor_ps(x2, _mm512_set1_ps(-0.0f)), load16(sin + d))));
            const __m512 hi = _mm512_add_ps(round16(_mm512_mul_ps(x2, load16(cos + d + half))),
                                            round16(_mm512_mul_ps(x1, load16(sin + d + half))));
            store16(x + d, lo);
            store16(x + d + half, hi);
        }
        return;
    }
    float tmp[512];
    for (int64_t d = 0; d < D; d++) {
        const float rot = d < half ? -b2f(x[d + half]) : b2f(x[d - half]);
        const float a = b2f(f2b(b2f(x[d]) * b2f(cos[d])));
        const float b = b2f(f2b(rot * b2f(sin[d])));
        tmp[d] = a + b;
    }
    for (int64_t d = 0; d < D; d++) x[d] = f2b(tmp[d]);
}

static void rope_cache_bf16_body(bf16 *q, int64_t ldq, bf16 *k, int64_t ldk, const bf16 *v, int64_t ldv,
                                 const int64_t *positions, const bf16 *cos, const bf16 *sin, int64_t T, int64_t H,
                                 int64_t KVH, int64_t D, uint8_t *k_cache, uint8_t *v_cache, const int64_t *slots,
                                 int64_t num_blocks, int64_t bs, int rope, int kv) {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        if (rope) {
            const bf16 *c = cos + positions[t] * D, *s = sin + positions[t] * D;
            for (int64_t h = 0; h < H; h++) rope_row(q + t * ldq + h * D, c, s, D);
            for (int64_t h = 0; h < KVH; h++) rope_row(k + t * ldk + h * D, c, s, D);
        }
        for (int64_t h = 0; h < KVH; h++)
            cache_write_row(k_cache, v_cache, k + t * ldk + h * D, v + t * ldv + h * D, h, slots[t], num_blocks, bs, D,
                            kv);
    }
}

void kv_rope_cache_bf16(bf16 *q, int64_t ldq, bf16 *k, int64_t ldk, const bf16 *v, int64_t ldv,
                        const int64_t *positions, const bf16 *cos, const bf16 *sin, int64_t T, int64_t H, int64_t KVH,
                        int64_t D, void *k_cache, void *v_cache, const int64_t *slots, int64_t num_blocks, int64_t bs,
                        int rope, int64_t kv) {
#pragma omp parallel if (T > 16)
    rope_cache_bf16_body(q, ldq, k, ldk, v, ldv, positions, cos, sin, T, H, KVH, D, k_cache, v_cache, slots,
                         num_blocks, bs, rope, (int)kv);
}

/* ---------------------------------------------------------------------------------------------------
 * AMX (Intel Sapphire Rapids on): the tile state, asked of Linux once per process (kv_set_amx), used by the
 * bf16 and W8A8 linears and by attention. Each kernel loads its tile configuration when it starts and
 * releases the tiles when it ends.
 */
static int kv_amx = 0;

typedef struct {
    uint8_t palette_id, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

/* on != 0: use AMX for W8A8 when the kernel may (the process asks Linux for the tile state once). Returns
 * whether AMX is on. */
int kv_set_amx(int64_t on) {
    static int permitted = -1;
    if (on && permitted < 0) permitted = syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    kv_amx = on && permitted > 0;
    return kv_amx;
}

/* Quantized layers above 4 rows on AMX (kv_q_invariant = 0, the default), or every row on the AVX-512 path
 * so that a row's bits do not depend on its batch (kv_set_batch_invariant; qlinear_amx_body says why). */
static int kv_q_invariant = 0;

void kv_set_batch_invariant(int64_t on) { kv_q_invariant = on != 0; }

__attribute__((target("amx-tile"))) static void amx_begin(void) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    for (int t = 0; t < 8; t++) c.rows[t] = 16, c.colsb[t] = 64; /* every tile 16 rows of 64 bytes */
    _tile_loadconfig(&c);
}

__attribute__((target("amx-tile"))) static void amx_end(void) { _tile_release(); }

/* ---------------------------------------------------------------------------------------------------
 * Attention of single query rows over the paged cache (layout above), read in place: decodes, and prefill
 * rows once their K/V are in the cache (row r attends positions [0, ctx_lens[r]) of its sequence, the
 * last `window` of them when window > 0). q, out: [rows, H, D], rows ld_q / ld_o apart; tables
 * [num_seqs, max_blocks], row_table[r] the table of row r (NULL: row r uses table r).
 * Work items are (row, KV head): the G = H / KVH query heads of a KV head share every K/V load.
 * Per 16 positions: scores = q . k on vdpbf16ps (fp32 sums) times scale, kept in an fp32 buffer; then
 * probabilities exp(s - max) (fp32, summed in fp32) rounded to bf16 as transformers' bf16 attention rounds
 * them, times V on vdpbf16ps, and one division by the sum at the end.
 */
/* Attention reads the cache in pieces of 2 x 16 D bytes (K and V of 16 positions of one block), streams too
 * short for the hardware prefetchers to follow from one block to the next. So each piece is fetched into L2
 * ATTN_PF + 1 pieces ahead, and a thread's next work item while it works on the current one. */
#ifndef ATTN_PF
#define ATTN_PF 1
#endif
INLINE void attn_prefetch(const uint8_t *kbase, const uint8_t *vbase, const int64_t *table, int64_t p0, int64_t bs,
                          int64_t D, int kv) {
    const int64_t ES = kv ? 1 : 2, blk = table[p0 / bs] * kv_block_bytes(kv, bs, D), r = p0 % bs;
    const char *kp = (const char *)(kbase + blk + r * 2 * ES), *vp = (const char *)(vbase + blk + r * D * ES);
    for (int64_t i = 0; i < D / 2; i++) _mm_prefetch(kp + i * bs * 2 * ES, _MM_HINT_T1); /* 16 positions of pair i */
    for (int64_t i = 0; i < 16 * D * ES; i += 64) _mm_prefetch(vp + i, _MM_HINT_T1);
    if (kv) { /* the 16 positions' scales: one line each */
        _mm_prefetch((const char *)(kbase + blk + bs * D + r * 2), _MM_HINT_T1);
        _mm_prefetch((const char *)(vbase + blk + bs * D + r * 2), _MM_HINT_T1);
    }
}

INLINE void attn_item(const int64_t G, const int64_t DC, const int KV, const bf16 *q, const uint8_t *kbase,
                      const uint8_t *vbase, const int64_t *table, int64_t lo, int64_t ctx, int64_t bs, float scale,
                      bf16 *out, float *scores, int pf) {
    const int64_t D = DC * 16, KP = D / 2; /* KP: pairs of dims */
    const int64_t ES = KV ? 1 : 2, BB = kv_block_bytes(KV, bs, D); /* element and (head, block) bytes */
    const int64_t first = lo & ~(int64_t)15, nsub = (ctx - first + 15) / 16, L = nsub * 16;
    const int32_t *qp = (const int32_t *)q; /* head g's pair i at qp[g * KP + i] */
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 mx[16];
    for (int64_t g = 0; g < G; g++) mx[g] = _mm512_set1_ps(-INFINITY);
    for (int64_t sb = 0; sb < nsub; sb++) {
        const int64_t p0 = first + 16 * sb;
        const uint8_t *blk = kbase + table[p0 / bs] * BB;
        const uint8_t *kb = blk + p0 % bs * 2 * ES; /* pair i of these 16 at kb + i * bs * 2 * ES */
        if (pf && sb + ATTN_PF + 1 < nsub) /* the first ATTN_PF + 1 came before the item (attn_prefetch_item) */
            attn_prefetch(kbase, vbase, table, first + 16 * (sb + ATTN_PF + 1), bs, D, KV);
        __m512 a0[16], a1[16];
        for (int64_t g = 0; g < G; g++) a0[g] = a1[g] = _mm512_setzero_ps();
        for (int64_t i = 0; i < KP; i += 2) {
            const __m512bh k0 = KV ? kv_widen32(kb + i * bs * 2, KV) : (__m512bh)_mm512_loadu_si512(kb + i * bs * 4);
            const __m512bh k1 =
                KV ? kv_widen32(kb + (i + 1) * bs * 2, KV) : (__m512bh)_mm512_loadu_si512(kb + (i + 1) * bs * 4);
            for (int64_t g = 0; g < G; g++) {
                a0[g] = _mm512_dpbf16_ps(a0[g], (__m512bh)_mm512_set1_epi32(qp[g * KP + i]), k0);
                a1[g] = _mm512_dpbf16_ps(a1[g], (__m512bh)_mm512_set1_epi32(qp[g * KP + i + 1]), k1);
            }
        }
        const __m512i pos = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)p0));
        const __mmask16 valid = _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32((int32_t)lo)) &
                                _mm512_cmplt_epi32_mask(pos, _mm512_set1_epi32((int32_t)ctx));
        /* the positions' K scales (quantized caches) folded into the softmax scale */
        const __m512 sc = KV ? _mm512_mul_ps(kv_scales16(blk + bs * D + p0 % bs * 2), _mm512_set1_ps(scale))
                             : _mm512_set1_ps(scale);
        for (int64_t g = 0; g < G; g++) {
            const __m512 s =
                _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(_mm512_add_ps(a0[g], a1[g]), sc));
            _mm512_storeu_ps(scores + g * L + 16 * sb, s);
            mx[g] = _mm512_max_ps(mx[g], s);
        }
    }
    __m512 mv[16], sum[16], ov[16][16];
    for (int64_t g = 0; g < G; g++) {
        mv[g] = _mm512_set1_ps(_mm512_reduce_max_ps(mx[g]));
        sum[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < DC; c++) ov[g][c] = _mm512_setzero_ps();
    }
    for (int64_t sb = 0; sb < nsub; sb++) {
        const int64_t p0 = first + 16 * sb;
        /* the 8 position pairs of these 16 positions: pair j at vb + j * D * 2 * ES */
        const uint8_t *blk = vbase + table[p0 / bs] * BB, *vb = blk + p0 % bs * D * ES;
        int32_t pr[16][8]; /* bf16 probability pairs of each head (times V's scales: quantized caches) */
        for (int64_t g = 0; g < G; g++) {
            const __m512 s = _mm512_loadu_ps(scores + g * L + 16 * sb);
            /* masked positions hold -inf: exp16 clamps its argument, so zero them explicitly */
            const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                                 exp16(_mm512_sub_ps(s, mv[g])));
            sum[g] = _mm512_add_ps(sum[g], e);
            const __m512 ev = KV ? _mm512_mul_ps(e, kv_scales16(blk + bs * D + p0 % bs * 2)) : e;
            _mm256_storeu_si256((__m256i *)pr[g], (__m256i)_mm512_cvtneps_pbh(ev));
        }
        for (int64_t j = 0; j < 8; j++) {
            const uint8_t *vr = vb + j * D * 2 * ES;
            for (int64_t c = 0; c < DC; c++) {
                const __m512bh vv = KV ? kv_widen32(vr + c * 32, KV) : (__m512bh)_mm512_loadu_si512(vr + c * 64);
                for (int64_t g = 0; g < G; g++)
                    ov[g][c] = _mm512_dpbf16_ps(ov[g][c], (__m512bh)_mm512_set1_epi32(pr[g][j]), vv);
            }
        }
    }
    for (int64_t g = 0; g < G; g++) {
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum[g]));
        for (int64_t c = 0; c < DC; c++) store16(out + g * D + c * 16, _mm512_mul_ps(ov[g][c], inv));
    }
}

/* attn_item on AMX tiles (D % 32 == 0): scores of 16 positions = Q [G x 32 dims] x K^T tiles,
 * accumulated over D / 32 (tdpbf16ps reads the K layout as it is: pair row i of 16 positions is a B row),
 * kept in `scores` as above; then each 16 positions' bf16 probabilities (`probs`: [G][L]) times their V
 * tile (8 position pairs x 16 dims, the V layout as it is) into output tiles of [G x 16 dims], up to 4 at a
 * time (D = 128: two passes over the probabilities). Tiles (attn_amx_config): 0, 5, 6, 7 outputs (0 the
 * scores first), 1 Q, 2 K, 3 P, 4 V. Every sum is over the same bf16 products as attn_item's, in fp32.
 * One-byte caches (kv): their K pair rows and V position pairs are widened into `wide` (kv_widen32) for
 * the tiles to load, the K scales multiply the scores and the V scales the probabilities. */
__attribute__((target("amx-tile"))) static void attn_amx_config(int64_t G) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    const int rows[8] = {(int)G, (int)G, 16, (int)G, 8, (int)G, (int)G, (int)G};
    const int colsb[8] = {64, 64, 64, 32, 64, 64, 64, 64};
    for (int t = 0; t < 8; t++) c.rows[t] = rows[t], c.colsb[t] = colsb[t];
    _tile_loadconfig(&c);
}

__attribute__((target("amx-tile,amx-bf16"))) static void attn_item_amx(
    const int64_t G, const int64_t D, const int kv, const bf16 *q, const uint8_t *kbase, const uint8_t *vbase,
    const int64_t *table, int64_t lo, int64_t ctx, int64_t bs, float scale, bf16 *out, float *scores, bf16 *probs,
    int pf) {
    const int64_t BB = kv_block_bytes(kv, bs, D), DC = D / 16;
    bf16 wide[4][16 * 32]; /* one-byte caches: K pair rows / V position pairs widened to bf16 for the tiles */
    const int64_t first = lo & ~(int64_t)15, nsub = (ctx - first + 15) / 16, L = nsub * 16;
    const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    __m512 mx[16];
    for (int64_t g = 0; g < G; g++) mx[g] = _mm512_set1_ps(-INFINITY);
    for (int64_t sb = 0; sb < nsub; sb++) {
        const int64_t p0 = first + 16 * sb;
        const uint8_t *blk = kbase + table[p0 / bs] * BB;
        const bf16 *kb = (const bf16 *)blk + p0 % bs * 2;
        if (pf && sb + ATTN_PF + 1 < nsub) attn_prefetch(kbase, vbase, table, first + 16 * (sb + ATTN_PF + 1), bs, D, kv);
        _tile_zero(0);
        for (int64_t k = 0; k < D / 32; k++) {
            _tile_loadd(1, q + 32 * k, D * 2);
            if (kv) { /* pair rows 16 k .. 16 k + 15 of these 16 positions: 32 bytes each, bs * 2 apart */
                for (int64_t i = 0; i < 16; i++)
                    _mm512_storeu_si512(wide[0] + i * 32, (__m512i)kv_widen32(blk + (16 * k + i) * bs * 2 + p0 % bs * 2, kv));
                _tile_loadd(2, wide[0], 64);
            } else {
                _tile_loadd(2, kb + 16 * k * bs * 2, bs * 4);
            }
            _tile_dpbf16ps(0, 1, 2);
        }
        _tile_stored(0, scores + 16 * sb, L * 4);
        const __m512i pos = _mm512_add_epi32(lane, _mm512_set1_epi32((int32_t)p0));
        const __mmask16 valid = _mm512_cmpge_epi32_mask(pos, _mm512_set1_epi32((int32_t)lo)) &
                                _mm512_cmplt_epi32_mask(pos, _mm512_set1_epi32((int32_t)ctx));
        /* the positions' K scales (one-byte caches) folded into the softmax scale */
        const __m512 sc = kv ? _mm512_mul_ps(kv_scales16(blk + bs * D + p0 % bs * 2), _mm512_set1_ps(scale))
                             : _mm512_set1_ps(scale);
        for (int64_t g = 0; g < G; g++) {
            float *sg = scores + g * L + 16 * sb;
            const __m512 s = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), valid, _mm512_mul_ps(_mm512_loadu_ps(sg), sc));
            _mm512_storeu_ps(sg, s);
            mx[g] = _mm512_max_ps(mx[g], s);
        }
    }
    __m512 mv[16], sum[16];
    for (int64_t g = 0; g < G; g++) mv[g] = _mm512_set1_ps(_mm512_reduce_max_ps(mx[g])), sum[g] = _mm512_setzero_ps();
    float acc[16 * 64];
    for (int64_t c0 = 0; c0 < DC; c0 += 4) { /* output dims 16 c0 .. 16 c0 + 63 */
        _tile_zero(0);
        _tile_zero(5);
        _tile_zero(6);
        _tile_zero(7);
        for (int64_t sb = 0; sb < nsub; sb++) {
            const int64_t p0 = first + 16 * sb;
            const uint8_t *vblk = vbase + table[p0 / bs] * BB;
            if (c0 == 0)
                for (int64_t g = 0; g < G; g++) {
                    const __m512 s = _mm512_loadu_ps(scores + g * L + 16 * sb);
                    const __m512 e = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, _mm512_set1_ps(-INFINITY), _CMP_NEQ_OQ),
                                                         exp16(_mm512_sub_ps(s, mv[g])));
                    sum[g] = _mm512_add_ps(sum[g], e);
                    /* times V's scales (one-byte caches), as attn_item */
                    const __m512 ev = kv ? _mm512_mul_ps(e, kv_scales16(vblk + bs * D + p0 % bs * 2)) : e;
                    _mm256_storeu_si256((__m256i *)(probs + g * L + 16 * sb), (__m256i)_mm512_cvtneps_pbh(ev));
                }
            const int64_t nc = DC - c0 < 4 ? DC - c0 : 4;
            const bf16 *vt[4];
            int64_t ldv = D * 4;
            if (kv) { /* position pairs 0..7 of dims 16 (c0 + c) ..: 32 bytes each, 2 D apart */
                const uint8_t *vb = vblk + p0 % bs * D + c0 * 32;
                for (int64_t c = 0; c < nc; c++) {
                    for (int64_t j = 0; j < 8; j++)
                        _mm512_storeu_si512(wide[c] + j * 32, (__m512i)kv_widen32(vb + j * D * 2 + c * 32, kv));
                    vt[c] = wide[c];
                }
                ldv = 64;
            } else {
                const bf16 *vb = (const bf16 *)vblk + p0 % bs * D + c0 * 32;
                for (int64_t c = 0; c < nc; c++) vt[c] = vb + c * 32;
            }
            _tile_loadd(3, probs + 16 * sb, L * 2);
            _tile_loadd(4, vt[0], ldv);
            _tile_dpbf16ps(0, 3, 4);
            if (c0 + 1 < DC) {
                _tile_loadd(4, vt[1], ldv);
                _tile_dpbf16ps(5, 3, 4);
            }
            if (c0 + 2 < DC) {
                _tile_loadd(4, vt[2], ldv);
                _tile_dpbf16ps(6, 3, 4);
            }
            if (c0 + 3 < DC) {
                _tile_loadd(4, vt[3], ldv);
                _tile_dpbf16ps(7, 3, 4);
            }
        }
        _tile_stored(0, acc, 256);
        _tile_stored(5, acc + 16, 256);
        _tile_stored(6, acc + 32, 256);
        _tile_stored(7, acc + 48, 256);
        const int64_t nc = DC - c0 < 4 ? DC - c0 : 4;
        for (int64_t g = 0; g < G; g++) {
            const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum[g]));
            for (int64_t c = 0; c < nc; c++)
                store16(out + g * D + (c0 + c) * 16, _mm512_mul_ps(_mm512_loadu_ps(acc + g * 64 + c * 16), inv));
        }
    }
}

#define ATTN(GG, DD, KV) attn_item(GG, DD, KV, qp, kbase, vbase, table, lo, ctx, block_size, scale, op, scores, pf)
/* Constant (G, D, kind) for the common shapes, so that the compiler keeps everything in registers. */
#define ATTN_KINDS(GG, DD)                                                                                         \
    do {                                                                                                           \
        if (kv == 0) ATTN(GG, DD, 0);                                                                              \
        else if (kv == 1) ATTN(GG, DD, 1);                                                                         \
        else if (kv == 2) ATTN(GG, DD, 2);                                                                         \
        else ATTN(GG, DD, 3);                                                                                      \
    } while (0)

/* The first position a row with `ctx` positions attends to (sliding window: the last `window` of them). */
INLINE int64_t attn_lo(int64_t ctx, int64_t window) { return window > 0 && ctx > window ? ctx - window : 0; }

/* A row's attention cost (positions read, plus a fixed part), for splitting the work between threads. */
INLINE int64_t attn_cost(const int64_t *ctx_lens, int64_t row, int64_t window) {
    return ctx_lens[row] - (attn_lo(ctx_lens[row], window) & ~(int64_t)15) + 32;
}

/* Whether a row's K/V are likely out of cache, worth prefetching: decode rows (each its own sequence) and the
 * first row of a sequence in a prefill chunk. The next rows of the chunk read the same K/V, just read (and
 * just written), from L2: there the prefetch loop only cost instructions (a fifth of a 2000-token
 * prompt's attention time). */
INLINE int attn_cold(const int64_t *row_table, int64_t row) {
    return !row_table || row == 0 || row_table[row] != row_table[row - 1];
}

/* The first ATTN_PF + 1 pieces of an item, and the piece its new K/V go to when the item writes them. */
INLINE void attn_prefetch_item(const uint8_t *k_cache, const uint8_t *v_cache, const int64_t *tables,
                               const int64_t *row_table, int64_t max_blocks, const int64_t *ctx_lens, int64_t item,
                               int64_t KVH, int64_t D, int64_t num_blocks, int64_t bs, int64_t window, int writes,
                               int kv) {
    const int64_t row = item / KVH, kvh = item % KVH, ctx = ctx_lens[row];
    const int64_t first = attn_lo(ctx, window) & ~(int64_t)15;
    const int64_t *table = tables + (row_table ? row_table[row] : row) * max_blocks;
    const int64_t head = kvh * num_blocks * kv_block_bytes(kv, bs, D);
    const uint8_t *kbase = k_cache + head, *vbase = v_cache + head;
    for (int64_t p = first; p < ctx && p <= first + 16 * ATTN_PF; p += 16)
        attn_prefetch(kbase, vbase, table, p, bs, D, kv);
    if (writes && ctx - 1 > first + 16 * ATTN_PF)
        attn_prefetch(kbase, vbase, table, (ctx - 1) & ~(int64_t)15, bs, D, kv);
}

/* This step's K/V rows to write before attending (decode steps: every row its own sequence, so a work item
 * (row, KV head) is the only reader of what it writes): rotary on the item's query heads and K head, then the
 * cache write, as rope_cache_bf16_body does for all rows in a phase of its own. The write's cache lines are
 * the ones the item reads last, so they come in with the item's other reads instead of one by one. */
typedef struct {
    bf16 *k;
    int64_t ldk;
    const bf16 *v;
    int64_t ldv;
    const int64_t *positions, *slots;
    const bf16 *cos, *sin; /* NULL: no rotary */
} attn_write;

static void decode_attention_bf16_body(bf16 *q, int64_t ld_q, uint8_t *k_cache, uint8_t *v_cache,
                              const int64_t *tables, const int64_t *row_table, int64_t max_blocks,
                              const int64_t *ctx_lens, bf16 *out,
                              int64_t ld_o, int64_t S, int64_t H, int64_t KVH, int64_t D, int64_t num_blocks,
                              int64_t block_size, float scale, int64_t window, const attn_write *wr, int kv) {
    const int64_t G = H / KVH, DC = D / 16;
    /* Each thread takes a contiguous range of items of about equal cost (an item goes to the thread whose
     * share holds the middle of its cost), so that it knows its next item and fetches it ahead. */
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    int64_t total = 0, acc = 0, i0 = -1, i1 = S * KVH, longest = 0;
    for (int64_t r = 0; r < S; r++) total += attn_cost(ctx_lens, r, window) * KVH;
    for (int64_t item = 0; item < S * KVH; item++) {
        const int64_t c = attn_cost(ctx_lens, item / KVH, window), owner = (2 * acc + c) * nt / (2 * total);
        if (owner > tid) {
            i1 = item;
            break;
        }
        if (owner == tid) {
            if (i0 < 0) i0 = item;
            if (c > longest) longest = c;
        }
        acc += c;
    }
    if (i0 < 0) i0 = i1;
    /* a head's scores start on a cache line (L = 16 nsub); sizes whole lines, as aligned_alloc wants */
    const int64_t Lmax = (longest + 31) & ~(int64_t)15;
    float *scores = (float *)aligned_alloc(64, sizeof(float) * G * Lmax);
    const int amx = kv_amx && D % 32 == 0; /* on AMX tiles (attn_item_amx) */
    bf16 *probs = amx ? (bf16 *)malloc(sizeof(bf16) * G * Lmax) : NULL;
    if (amx) attn_amx_config(G);
    for (int64_t item = i0; item < i1; item++) {
        if (item == i0 && attn_cold(row_table, item / KVH))
            attn_prefetch_item(k_cache, v_cache, tables, row_table, max_blocks, ctx_lens, item, KVH, D, num_blocks,
                               block_size, window, wr != 0, kv);
        if (item + 1 < i1 && attn_cold(row_table, (item + 1) / KVH))
            attn_prefetch_item(k_cache, v_cache, tables, row_table, max_blocks, ctx_lens, item + 1, KVH, D,
                               num_blocks, block_size, window, wr != 0, kv);
        const int64_t seq = item / KVH, kvh = item % KVH;
        const int64_t ctx = ctx_lens[seq];
        const int pf = attn_cold(row_table, seq);
        const int64_t lo = attn_lo(ctx, window);
        const int64_t *table = tables + (row_table ? row_table[seq] : seq) * max_blocks;
        bf16 *qp = q + seq * ld_q + kvh * G * D;
        bf16 *op = out + seq * ld_o + kvh * G * D;
        const int64_t head = kvh * num_blocks * kv_block_bytes(kv, block_size, D);
        const uint8_t *kbase = k_cache + head, *vbase = v_cache + head;
        if (wr) {
            bf16 *kr = wr->k + seq * wr->ldk + kvh * D;
            if (wr->cos) {
                const bf16 *c = wr->cos + wr->positions[seq] * D, *s = wr->sin + wr->positions[seq] * D;
                for (int64_t g = 0; g < G; g++) rope_row(qp + g * D, c, s, D);
                rope_row(kr, c, s, D);
            }
            cache_write_row(k_cache, v_cache, kr, wr->v + seq * wr->ldv + kvh * D, kvh, wr->slots[seq], num_blocks,
                            block_size, D, kv);
        }
        if (amx) attn_item_amx(G, D, kv, qp, kbase, vbase, table, lo, ctx, block_size, scale, op, scores, probs, pf);
        else if (DC == 4 && G == 1) ATTN_KINDS(1, 4);
        else if (DC == 4 && G == 2) ATTN_KINDS(2, 4);
        else if (DC == 4 && G == 3) ATTN_KINDS(3, 4);
        else if (DC == 4 && G == 4) ATTN_KINDS(4, 4);
        else if (DC == 8 && G == 1) ATTN_KINDS(1, 8);
        else if (DC == 8 && G == 2) ATTN_KINDS(2, 8);
        else if (DC == 8 && G == 4) ATTN_KINDS(4, 8);
        else if (DC == 8 && G == 8) ATTN_KINDS(8, 8);
        else attn_item(G, DC, kv, qp, kbase, vbase, table, lo, ctx, block_size, scale, op, scores, pf);
    }
    if (amx) amx_end();
    free(scores);
    free(probs);
#pragma omp barrier
}

void kv_decode_attention_bf16(const bf16 *q, int64_t ld_q, const void *k_cache, const void *v_cache,
                              const int64_t *tables, const int64_t *row_table, int64_t max_blocks, const int64_t *ctx_lens, bf16 *out,
                              int64_t ld_o, int64_t S, int64_t H, int64_t KVH, int64_t D, int64_t num_blocks,
                              int64_t block_size, float scale, int64_t window, int64_t kv) {
#pragma omp parallel
    decode_attention_bf16_body((bf16 *)q, ld_q, (uint8_t *)k_cache, (uint8_t *)v_cache, tables, row_table,
                               max_blocks, ctx_lens, out, ld_o, S, H, KVH, D, num_blocks, block_size, scale, window,
                               NULL, (int)kv);
}

/* ---------------------------------------------------------------------------------------------------
 * Linear on group-quantized weights, kept packed (GGUF blocks, --quantization int4/int8):
 *   w[n, k] = scale[n, g] * q[n, k] + min[n, g],  g = k / GS    (min absent for symmetric formats)
 *   y[m, n] = bf16(sum_g (scale[n, g] * sum_{k in g} x[m, k] q[n, k] + min[n, g] * sum_{k in g} x[m, k]) + b[n])
 * The integer q are exact in bf16, so the inner sums run on vdpbf16ps like the bf16 kernel, and the
 * scales apply in fp32 once per group: no weight is ever rounded, and the result does not depend on M.
 *
 * Layout (kvloom/layers/quantization.py, QuantizedWeight.pack). Work items are 32 outputs (two blocks of 16;
 * N padded to 32). Everything an item needs for one group of GS inputs lies together, items and groups in
 * order, so each thread reads one sequential stream (separate q / scale / min arrays read at 12 GB/s,
 * this at about the bf16 kernel's bandwidth). Per (item, group), with lane 2j + e of a k pair holding
 * output j's k = 2 kp + e:
 *   q:     kind 4: [GS / 8 chunks][2 blocks][32] uint16, nibble i (bits 4i..4i+3) of a lane = pair 4c + i,
 *                  unsigned 0..15. A nibble becomes a bf16 operand in one bit operation: 0x4300 | q is the
 *                  bf16 of 128 + q, so the sums are of x (128 + q) and the stored min is min - 128 scale,
 *                  which takes the 128 back out.
 *          kind 5: kind 4's nibbles (the low 4 bits), then [GS / 8 chunks][2 blocks][4] uint32: the fifth bits
 *                  of pairs 4c .. 4c + 3, bit l = lane l: 16 added to 0x4300 | nibble under that mask
 *          kind 6: kind 5's, then the sixth bits the same way (32 added): 0..63, Q6_K in 6 bits a weight
 *          kind 8: [GS / 2 pairs][2 blocks][32] int8;  kind 10: the same bytes in FP8 E4M3 (fp8_pairs)
 *   scale: [2 blocks][16] fp32;  min (when has_min): [2 blocks][16] fp32
 * Up to 4 rows the weights are expanded to bf16 in registers as they stream in; above that, each thread
 * expands its item once into a buffer and every tile of 4 rows reads it from L2.
 */
#define QGROUP 2 /* blocks of 16 outputs per work item: 32 outputs */
#ifndef QPF_AHEAD
#define QPF_AHEAD 4096
#endif

INLINE int64_t q_bytes(int kind, int64_t GS) { /* an (item, group)'s q */
    return kind == 4 ? GS / 8 * QGROUP * 64 : kind == 5 ? GS / 8 * QGROUP * 80 : kind == 6 ? GS / 8 * QGROUP * 96
                                                                                      : GS / 2 * QGROUP * 32;
}

INLINE int64_t q_group_bytes(int kind, int64_t GS, int has_min) {
    return q_bytes(kind, GS) + (has_min ? 2 : 1) * QGROUP * 64;
}

/* Two-level scales (`sub`: K-quant files, whose group scales are a super-block's fp16 d times small integers):
 * per span of QSPAN inputs, [d: 2 blocks x 16 fp32][dm: the same, when has_min][codes: QSPAN / GS groups x 32
 * int8][min codes: the same, when has_min], then the q of its groups in order. scale = d code, min = dm code:
 * exact products, the same fp32 values as the one-level layout, in 1 byte a group and output instead of 4. */
#define QSPAN 256

INLINE int64_t q_span_head(int64_t GS, int has_min) { return (has_min ? 2 : 1) * (QGROUP * 64 + QSPAN / GS * QGROUP * 16); }

INLINE int64_t q_span_bytes(int kind, int64_t GS, int has_min) { return q_span_head(GS, has_min) + QSPAN / GS * q_bytes(kind, GS); }

/* Scales and mins as fp16 (sub 2: files whose factors are fp16 per group, Q4_0 / Q4_1 / Q5_x / Q8_0 /
 * IQ4_NL): per group its q, then [2 blocks][16] fp16 scales and (has_min) the mins as the file has them;
 * kinds 4-6 take min - 128 scale in fp32 here, the value the fp32 layout stores. */
INLINE int64_t q_half_group_bytes(int kind, int64_t GS, int has_min) {
    return q_bytes(kind, GS) + (has_min ? 2 : 1) * QGROUP * 32;
}

/* sub: how an item stores its scales: 0 fp32 per group, 1 two-level (QSPAN), 2 fp16 per group. */
INLINE int64_t q_item_bytes(int kind, int64_t GS, int64_t K, int has_min, int sub) {
    return sub == 1   ? K / QSPAN * q_span_bytes(kind, GS, has_min)
           : sub == 2 ? K / GS * q_half_group_bytes(kind, GS, has_min)
                      : K / GS * q_group_bytes(kind, GS, has_min);
}

/* The q of group g of an item. */
INLINE const uint8_t *q_group_q(int kind, const uint8_t *item, int has_min, int sub, int64_t GS, int64_t g) {
    if (!sub) return item + g * q_group_bytes(kind, GS, has_min);
    if (sub == 2) return item + g * q_half_group_bytes(kind, GS, has_min);
    const int64_t gps = QSPAN / GS;
    return item + g / gps * q_span_bytes(kind, GS, has_min) + q_span_head(GS, has_min) + g % gps * q_bytes(kind, GS);
}

INLINE __m512 i8_to_ps(const int8_t *p) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i *)p))); }

/* Block b's scales and mins of group g (gq: its q); kinds 4-6 take min - 128 scale (see above: the fp32
 * layout stores it so, the others store the file's min). */
INLINE void q_group_scales(int kind, const uint8_t *item, const uint8_t *gq, int has_min, int sub, int64_t GS,
                           int64_t g, int b, __m512 *s, __m512 *mn) {
    __m512 m = _mm512_setzero_ps();
    if (!sub) {
        const float *scale = (const float *)(gq + q_bytes(kind, GS));
        *s = _mm512_loadu_ps(scale + b * 16);
        *mn = has_min ? _mm512_loadu_ps(scale + QGROUP * 16 + b * 16) : m;
        return;
    }
    if (sub == 2) {
        const uint16_t *half = (const uint16_t *)(gq + q_bytes(kind, GS));
        *s = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(half + b * 16)));
        if (has_min) m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(half + QGROUP * 16 + b * 16)));
    } else {
        const int64_t gps = QSPAN / GS, j = g % gps;
        const uint8_t *span = item + g / gps * q_span_bytes(kind, GS, has_min);
        const float *d = (const float *)span;
        const int8_t *code = (const int8_t *)(span + (has_min ? 2 : 1) * QGROUP * 64) + j * 32 + b * 16;
        *s = _mm512_mul_ps(_mm512_loadu_ps(d + b * 16), i8_to_ps(code));
        if (has_min) m = _mm512_mul_ps(_mm512_loadu_ps(d + 32 + b * 16), i8_to_ps(code + gps * 32));
    }
    *mn = has_min && kind != 8 ? _mm512_fnmadd_ps(_mm512_set1_ps(128.0f), *s, m) : m;
}

/* Four k pairs of one 16-output block: 64 bytes, nibble i of each 16-bit lane = pair 4c + i, each
 * turned into the bf16 of 128 + q by (v >> 4i) & 15 | 0x4300 (one vpternlogd: 0xEA = (a & b) | c). */
INLINE void q4_pairs4(const uint8_t *p, __m512i w[4]) {
    const __m512i v = _mm512_loadu_si512(p);
    const __m512i nib = _mm512_set1_epi16(15), one28 = _mm512_set1_epi16(0x4300);
    w[0] = _mm512_ternarylogic_epi32(v, nib, one28, 0xEA);
    w[1] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 4), nib, one28, 0xEA);
    w[2] = _mm512_ternarylogic_epi32(_mm512_srli_epi16(v, 8), nib, one28, 0xEA);
    w[3] = _mm512_or_si512(_mm512_srli_epi16(v, 12), one28);
}

/* Pairs 4c .. 4c + 3 of a group of GS inputs of block b, as bf16 dot-product operands (gq: the group's q). */
INLINE void qpairs4(int kind, const uint8_t *gq, int64_t GS, int64_t c, int b, __m512i w[4]) {
    if (kind == 4) {
        q4_pairs4(gq + (c * QGROUP + b) * 64, w);
    } else if (kind == 5 || kind == 6) {
        q4_pairs4(gq + (c * QGROUP + b) * 64, w);
        const uint32_t *high = (const uint32_t *)(gq + GS / 8 * QGROUP * 64 + (c * QGROUP + b) * 16);
        const __m512i sixteen = _mm512_set1_epi16(16);
        /* bit 4 of 0x4300 | nibble is clear: adding 16 sets it (AVX-512 has no 16-bit masked OR) */
        for (int i = 0; i < 4; i++) w[i] = _mm512_mask_add_epi16(w[i], _cvtu32_mask32(high[i]), w[i], sixteen);
        if (kind == 6) { /* bit 5 the same way, from the next plane */
            const uint32_t *top = high + GS / 8 * QGROUP * 4;
            const __m512i th2 = _mm512_set1_epi16(32);
            for (int i = 0; i < 4; i++) w[i] = _mm512_mask_add_epi16(w[i], _cvtu32_mask32(top[i]), w[i], th2);
        }
    } else if (kind == 10) {
        for (int i = 0; i < 4; i++) w[i] = fp8_pairs(gq + ((4 * c + i) * QGROUP + b) * 32);
    } else {
        for (int i = 0; i < 4; i++) w[i] = q8_pairs((const int8_t *)gq + ((4 * c + i) * QGROUP + b) * 32);
    }
}

/* One work item (32 outputs) times MM rows of x. `item`: the item's first group; pbuf: the item expanded
 * to bf16 pairs ([2 blocks][K / 2][32]) when `panel`. */
INLINE void qlinear_tile(int MM, int kind, int panel, int has_min, int sub, const bf16 *x, int64_t ldx,
                         const uint8_t *item, const bf16 *pbuf, const float *xsum, int64_t K, int64_t GS,
                         float out[4][QGROUP][16]) {
    const int64_t ngroups = K / GS, gbytes = q_item_bytes(kind, GS, K, has_min, sub) / ngroups;
    __m512 y[4][QGROUP];
    for (int i = 0; i < MM; i++)
        for (int b = 0; b < QGROUP; b++) y[i][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < ngroups; g++) {
        const uint8_t *gq = q_group_q(kind, item, has_min, sub, GS, g);
        if (!panel) /* the hardware prefetcher alone reaches about half the bandwidth here */
            for (int64_t off = 0; off < gbytes; off += 64) _mm_prefetch((const char *)gq + QPF_AHEAD + off, _MM_HINT_T0);
        __m512 acc[4][QGROUP], acc2[4][QGROUP]; /* even and odd k pairs: two dependency chains */
        for (int i = 0; i < MM; i++)
            for (int b = 0; b < QGROUP; b++) acc[i][b] = acc2[i][b] = _mm512_setzero_ps();
        for (int64_t c = 0; c < GS / 8; c++) {
            const int64_t kp = g * GS / 2 + 4 * c;
            __m512i w[QGROUP][4];
            for (int b = 0; b < QGROUP; b++) {
                if (panel) {
                    for (int j = 0; j < 4; j++) w[b][j] = _mm512_loadu_si512(pbuf + (b * (K / 2) + kp + j) * 32);
                } else {
                    qpairs4(kind, gq, GS, c, b, w[b]);
                }
            }
            for (int i = 0; i < MM; i++) {
                const int32_t *xp = (const int32_t *)(x + i * ldx + 2 * kp);
                for (int j = 0; j < 4; j += 2) {
                    const __m512bh x0 = (__m512bh)_mm512_set1_epi32(xp[j]);
                    const __m512bh x1 = (__m512bh)_mm512_set1_epi32(xp[j + 1]);
                    for (int b = 0; b < QGROUP; b++) {
                        acc[i][b] = _mm512_dpbf16_ps(acc[i][b], x0, (__m512bh)w[b][j]);
                        acc2[i][b] = _mm512_dpbf16_ps(acc2[i][b], x1, (__m512bh)w[b][j + 1]);
                    }
                }
            }
        }
        for (int b = 0; b < QGROUP; b++) {
            __m512 s, mn;
            q_group_scales(kind, item, gq, has_min, sub, GS, g, b, &s, &mn);
            for (int i = 0; i < MM; i++) y[i][b] = _mm512_fmadd_ps(_mm512_add_ps(acc[i][b], acc2[i][b]), s, y[i][b]);
            if (has_min) {
                for (int i = 0; i < MM; i++)
                    y[i][b] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[i * ngroups + g]), y[i][b]);
            }
        }
    }
    for (int i = 0; i < MM; i++)
        for (int b = 0; b < QGROUP; b++) _mm512_storeu_ps(out[i][b], y[i][b]);
}

#define QTILES(KIND, PANEL, HAS_MIN)                                                                     \
    switch (mm) {                                                                                       \
    case 1: QTILE(1, KIND, PANEL, HAS_MIN); break;                                                      \
    case 2: QTILE(2, KIND, PANEL, HAS_MIN); break;                                                      \
    case 3: QTILE(3, KIND, PANEL, HAS_MIN); break;                                                      \
    default: QTILE(4, KIND, PANEL, HAS_MIN); break;                                                     \
    }
#define QTILE(MM, KIND, PANEL, HAS_MIN) qlinear_tile(MM, KIND, PANEL, HAS_MIN, sub, xt, ldx, item, pbuf, xs, K, GS, acc)

/* The group sums of row x (K inputs, groups of GS) for the min terms: xsum[g]. */
INLINE void q_xsum_row(const bf16 *x, int64_t GS, int64_t K, float *xsum) {
    for (int64_t g = 0; g < K / GS; g++) {
        float s = 0;
        for (int64_t k = g * GS; k < (g + 1) * GS; k++) s += b2f(x[k]);
        xsum[g] = s;
    }
}

/* Group g of an item expanded to bf16 pairs in the panel layout: [2 blocks][K / 2][32], pairs of group g at
 * g GS / 2. Block b's pairs of a group are then AMX B-tile rows, 64 bytes apart. */
INLINE void q_expand_group(int kind, const uint8_t *item, int has_min, int sub, int64_t GS, int64_t K, int64_t g,
                           bf16 *pbuf) {
    const uint8_t *gq = q_group_q(kind, item, has_min, sub, GS, g);
    for (int64_t c = 0; c < GS / 8; c++)
        for (int b = 0; b < QGROUP; b++) {
            __m512i v[4];
            qpairs4(kind, gq, GS, c, b, v);
            for (int j = 0; j < 4; j++) _mm512_storeu_si512(pbuf + (b * (K / 2) + g * GS / 2 + 4 * c + j) * 32, v[j]);
        }
}

/* Work item `it` (32 outputs) of a quantized linear for M rows; pbuf: QGROUP * 16 * K bf16 when M > 4. */
static void qlinear_item(int kind, const bf16 *x, int64_t ldx, const uint8_t *w, int has_min, int sub, int64_t GS,
                         const bf16 *bias, bf16 *y, int64_t ldy, int64_t M, int64_t N, int64_t K, const float *xsum,
                         int64_t it, bf16 *pbuf) {
    const int64_t ngroups = K / GS, item_bytes = q_item_bytes(kind, GS, K, has_min, sub);
    const int panel = M > 4;
    const uint8_t *item = w + it * item_bytes;
    if (panel)
        for (int64_t g = 0; g < ngroups; g++) q_expand_group(kind, item, has_min, sub, GS, K, g, pbuf);
    for (int64_t m0 = 0; m0 < M; m0 += 4) {
        const int mm = M - m0 < 4 ? (int)(M - m0) : 4;
        const bf16 *xt = x + m0 * ldx;
        const float *xs = xsum + m0 * ngroups;
        float acc[4][QGROUP][16];
        /* constant kind, panel, min and MM: no branches in the inner loops */
        if (kind == 4 && panel) {
            QTILES(4, 1, 1)
        } else if (kind == 4) {
            QTILES(4, 0, 1)
        } else if (kind == 5 && panel) {
            QTILES(5, 1, 1)
        } else if (kind == 5) {
            QTILES(5, 0, 1)
        } else if (kind == 6 && panel) {
            QTILES(6, 1, 1)
        } else if (kind == 6) {
            QTILES(6, 0, 1)
        } else if (kind == 10 && panel) {
            QTILES(10, 1, 0)
        } else if (kind == 10) {
            QTILES(10, 0, 0)
        } else if (panel && has_min) {
            QTILES(8, 1, 1)
        } else if (panel) {
            QTILES(8, 1, 0)
        } else if (has_min) {
            QTILES(8, 0, 1)
        } else {
            QTILES(8, 0, 0)
        }
        store_tile(&acc[0][0][0], QGROUP * 16, mm, QGROUP, it * QGROUP, bias, y, ldy, m0, N);
    }
}

/* The quantized linear above 4 rows on AMX (where AMX is on and GS is 16 or a multiple of 32). Per (16-row
 * tile, item, group): the group's
 * sums x . (128 + q) of each block on tdpbf16ps (k steps of KT = min(GS, 32) inputs, fp32 in the tile's own
 * order) into tiles 0 and 1, stored, then y += sums * scale (+ min * group sum of x) in fp32 as
 * qlinear_tile applies them: the same products, summed in another order than the AVX-512 path. Up to 16
 * rows, each group is expanded to bf16 pairs just before its tiles read it (the weights stream once); above,
 * the item is expanded into the panel once per chunk of LIN_MC rows and every row tile reads it from L2.
 * Tiles (amx_q_config): 0, 1 sums (R rows), 4 x (R rows of KT inputs), 6, 7 weights (KT / 2 pairs); R =
 * min(M, 16) so that up to 16 rows need no padding. */
__attribute__((target("amx-tile"))) static void amx_q_config(int64_t R, int64_t KT) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette_id = 1;
    c.rows[0] = c.rows[1] = c.rows[4] = (uint8_t)R;
    c.colsb[0] = c.colsb[1] = 64, c.colsb[4] = (uint16_t)(KT * 2);
    c.rows[6] = c.rows[7] = (uint8_t)(KT / 2);
    c.colsb[6] = c.colsb[7] = 64;
    _tile_loadconfig(&c);
}

/* NOTE: the AMX sums are not the AVX-512 path's bits (tdpbf16ps rounds inside in its own way; no order of
 * vdpbf16ps steps reproduces it), so a row's result depends on whether its step had more than 4 rows. Up
 * to 4 rows the AVX-512 path stays: there AMX would first store the expanded weights for the tiles to load,
 * which measured 2.3x slower than expanding them in registers (Q4_K 8192 x 2048, one row), and decode is
 * most of a GGUF model's use. kv_set_batch_invariant(1) (--batch-invariant) keeps every row on AVX-512.
 * Rows m0 .. m0 + mm - 1 (a: their x, lda elements apart; R rows as configured) of item `it`, whose panel
 * holds group g expanded (`expand`: expand each group here first). yacc: [16][32] fp32 scratch. */
__attribute__((target("amx-tile,amx-bf16"))) static void qlinear_rows_amx(
    int kind, const bf16 *a, int64_t lda, const uint8_t *item, int has_min, int sub, int64_t GS, int64_t K,
    const float *xsum, int64_t mm, int expand, bf16 *pbuf, float yacc[16][32]) {
    const int64_t ngroups = K / GS, gbytes = q_item_bytes(kind, GS, K, has_min, sub) / ngroups;
    const int64_t KT = GS < 32 ? GS : 32;
    float sums[16][32];
    for (int64_t i = 0; i < mm; i++)
        for (int b = 0; b < QGROUP; b++) _mm512_storeu_ps(yacc[i] + 16 * b, _mm512_setzero_ps());
    for (int64_t g = 0; g < ngroups; g++) {
        const uint8_t *gq = q_group_q(kind, item, has_min, sub, GS, g);
        if (expand) {
            for (int64_t off = 0; off < gbytes; off += 64) _mm_prefetch((const char *)gq + QPF_AHEAD + off, _MM_HINT_T0);
            q_expand_group(kind, item, has_min, sub, GS, K, g, pbuf);
        }
        _tile_zero(0);
        _tile_zero(1);
        for (int64_t k0 = g * GS; k0 < (g + 1) * GS; k0 += KT) {
            _tile_loadd(4, a + k0, lda * 2);
            _tile_loadd(6, pbuf + k0 * 16, 64);
            _tile_loadd(7, pbuf + (K / 2 + k0 / 2) * 32, 64);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
        }
        _tile_stored(0, &sums[0][0], 128);
        _tile_stored(1, &sums[0][16], 128);
        for (int b = 0; b < QGROUP; b++) {
            __m512 s, mn;
            q_group_scales(kind, item, gq, has_min, sub, GS, g, b, &s, &mn);
            for (int64_t i = 0; i < mm; i++) {
                __m512 y = _mm512_fmadd_ps(_mm512_loadu_ps(sums[i] + 16 * b), s, _mm512_loadu_ps(yacc[i] + 16 * b));
                if (has_min) y = _mm512_fmadd_ps(mn, _mm512_set1_ps(xsum[i * ngroups + g]), y);
                _mm512_storeu_ps(yacc[i] + 16 * b, y);
            }
        }
    }
}

/* Whether a quantized linear of M rows runs on AMX (qlinear_amx_body) rather than AVX-512 (qlinear_item). */
INLINE int q_on_amx(int64_t M, int64_t GS) { return kv_amx && !kv_q_invariant && M > 4 && (GS == 16 || GS % 32 == 0); }

/* The last partial tile's rows of x (M > 16, M % 16), zero-padded to 16 rows of K: a new buffer, or NULL. */
static bf16 *q_amx_pad(const bf16 *x, int64_t ldx, int64_t M, int64_t K) {
    const int64_t full = M / 16 * 16;
    if (M <= 16 || M == full) return NULL;
    bf16 *pad = (bf16 *)calloc(16 * K, sizeof(bf16));
    for (int64_t m = full; m < M; m++) memcpy(pad + (m - full) * K, x + m * ldx, K * sizeof(bf16));
    return pad;
}

/* Rows c0 .. c1 - 1 of item `it` of a quantized linear of M rows on AMX (pbuf: QGROUP * 16 * K bf16; pad:
 * q_amx_pad's). The tile configuration is the caller's (amx_q_config for M and GS), as is amx_end. */
static void qlinear_item_amx(int kind, const bf16 *x, int64_t ldx, const uint8_t *w, int has_min, int sub, int64_t GS,
                             const bf16 *bias, bf16 *y, int64_t ldy, int64_t M, int64_t N, int64_t K, const float *xsum,
                             int64_t it, int64_t c0, int64_t c1, bf16 *pbuf, const bf16 *pad) {
    const int64_t ngroups = K / GS;
    const uint8_t *item = w + it * q_item_bytes(kind, GS, K, has_min, sub);
    const int expand = M <= 16;
    float yacc[16][32];
    if (!expand)
        for (int64_t g = 0; g < ngroups; g++) q_expand_group(kind, item, has_min, sub, GS, K, g, pbuf);
    for (int64_t m0 = c0; m0 < c1; m0 += 16) {
        const int64_t mm = c1 - m0 < 16 ? c1 - m0 : 16;
        const int padded = M > 16 && m0 + 16 > M;
        qlinear_rows_amx(kind, padded ? pad : x + m0 * ldx, padded ? K : ldx, item, has_min, sub, GS, K,
                         xsum + m0 * ngroups, mm, expand, pbuf, yacc);
        store_tile(&yacc[0][0], QGROUP * 16, (int)mm, QGROUP, it * QGROUP, bias, y, ldy, m0, N);
    }
}

/* Each thread an equal contiguous share of the items; every thread of the team calls it (ends with a barrier). */
static void qlinear_amx_body(int kind, const bf16 *x, int64_t ldx, const uint8_t *w, int has_min, int sub, int64_t GS,
                             const bf16 *bias, bf16 *y, int64_t ldy, int64_t M, int64_t N, int64_t K,
                             const float *xsum) {
    const int64_t nitems = (N + 16 * QGROUP - 1) / (16 * QGROUP);
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t lo = nitems * t / nt, hi = nitems * (t + 1) / nt;
    if (lo < hi) {
        bf16 *pbuf = (bf16 *)malloc(sizeof(bf16) * QGROUP * 16 * K), *pad = q_amx_pad(x, ldx, M, K);
        amx_q_config(M < 16 ? M : 16, GS < 32 ? GS : 32);
        /* chunks of LIN_MC rows outside: a chunk of x stays in L2 while every item of the share multiplies it
         * (each item widened again per chunk) */
        for (int64_t c0 = 0; c0 < M; c0 += LIN_MC)
            for (int64_t it = lo; it < hi; it++)
                qlinear_item_amx(kind, x, ldx, w, has_min, sub, GS, bias, y, ldy, M, N, K, xsum, it, c0,
                                 M - c0 < LIN_MC ? M : c0 + LIN_MC, pbuf, pad);
        amx_end();
        free(pad);
        free(pbuf);
    }
#pragma omp barrier
}

static void qlinear_bf16_body(int kind, const bf16 *x, int64_t ldx, const uint8_t *w, int has_min, int sub, int64_t GS,
                              const bf16 *bias, bf16 *y, int64_t ldy, int64_t M, int64_t N, int64_t K, float *xsum) {
    const int64_t nitems = (N + 16 * QGROUP - 1) / (16 * QGROUP);
    /* per-row group sums of x, for the min terms (every thread needs all of them) */
    if (has_min) {
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++) q_xsum_row(x + m * ldx, GS, K, xsum + m * (K / GS));
    }
    if (q_on_amx(M, GS)) {
        qlinear_amx_body(kind, x, ldx, w, has_min, sub, GS, bias, y, ldy, M, N, K, xsum);
        return;
    }
    bf16 *pbuf = M > 4 ? (bf16 *)malloc(sizeof(bf16) * QGROUP * 16 * K) : NULL;
#pragma omp for schedule(static)
    for (int64_t it = 0; it < nitems; it++)
        qlinear_item(kind, x, ldx, w, has_min, sub, GS, bias, y, ldy, M, N, K, xsum, it, pbuf);
    free(pbuf);
}

/* ---------------------------------------------------------------------------------------------------
 * W8A8 (kind 9, --quantization w8a8): int8 weights per output channel, int8 activations per token,
 * quantized here on the fly (ZeroQuant's dynamic per-token scales); the products on AVX-512 VNNI, whose
 * vpdpbusd adds four u8 x s8 products into each 32-bit lane: 64 multiply-adds an instruction, twice
 * vdpbf16ps's 32.
 *   row m:   sx[m] = amax_k |x[m, k]| / 127,  xq[m, k] = rint(x[m, k] * (127 / amax)) in -127..127,
 *            stored as u = xq + 128 (vpdpbusd's unsigned operand)
 *   y[m, n] = bf16(float(sum_k u[m, k] q[n, k] - 128 wsum[n]) * sw[n] * sx[m] + b[n]),  wsum[n] = sum_k q[n, k]
 * The integer sums are exact (int32: |sum| < K 255 127), so the result does not depend on M or threads.
 * Layout (kernels.py, pack_w8a8), per item of 32 outputs (two blocks of 16): [K / 4 quads][2 blocks][16
 * outputs][4 k] int8, then sw [2][16] fp32, then wsum [2][16] int32. Scratch: sx [M] fp32, then u [M][K].
 */
#define W8_ROWS 8 /* row tiles of 8 x 2 blocks: 16 accumulators, 2 weight loads and 8 broadcasts a quad */

INLINE int64_t w8a8_item_bytes(int64_t K) { return K * 32 + 2 * QGROUP * 64; }

/* Row m of x -> its scale and u[K] (K a multiple of 4; a masked tail for K % 16). */
static void w8a8_quantize_row(const bf16 *x, int64_t K, uint8_t *u, float *sx) {
    __m512 amax = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1u);
        amax = _mm512_max_ps(amax, _mm512_abs_ps(load16_mask(x + k, m)));
    }
    const float a = _mm512_reduce_max_ps(amax);
    *sx = a / 127.0f;
    const __m512 inv = _mm512_set1_ps(a > 0 ? 127.0f / a : 0.0f);
    const __m512i off = _mm512_set1_epi32(128);
    for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1u);
        const __m512i q = _mm512_cvt_roundps_epi32(_mm512_mul_ps(load16_mask(x + k, m), inv),
                                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        _mm512_mask_cvtepi32_storeu_epi8(u + k, m, _mm512_add_epi32(q, off)); /* 1..255 */
    }
}

INLINE void w8a8_tile(int MM, const uint8_t *u, int64_t K, const int8_t *wq, __m512i acc[W8_ROWS][QGROUP]) {
    for (int i = 0; i < MM; i++)
        for (int b = 0; b < QGROUP; b++) acc[i][b] = _mm512_setzero_si512();
    for (int64_t kq = 0; kq < K / 4; kq++) {
        const __m512i w0 = _mm512_loadu_si512(wq + kq * 128), w1 = _mm512_loadu_si512(wq + kq * 128 + 64);
        for (int i = 0; i < MM; i++) {
            const __m512i xb = _mm512_set1_epi32(*(const int32_t *)(u + i * K + 4 * kq));
            acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], xb, w0);
            acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], xb, w1);
        }
    }
}

/* AMX (Intel Sapphire Rapids on; kv_set_amx): tdpbusd multiplies a 16 x 64 tile of u by a 64 x 16 tile
 * of q into 16 x 16 int32 sums, 16384 multiply-adds an instruction. The item layout above is AMX's: the B
 * tile of block b over inputs 64 kc .. 64 kc + 63 is 16 rows (quads) of 64 bytes, 128 bytes apart from
 * offset kc 2048 + 64 b. Rows go in tiles of 16 (u is padded with zero rows to a multiple of 16). The same
 * exact integer sums as the VNNI tile, so the same bits. Needs K % 64 == 0; taken above 4 rows. */

/* 16 rows of u (K bytes apart) times an item's two blocks: c [16][32] int32. */
__attribute__((target("amx-tile,amx-int8"))) static void w8a8_tile_amx(const uint8_t *u, int64_t K,
                                                                        const int8_t *wq, int32_t *c) {
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t kc = 0; kc < K / 64; kc++) {
        _tile_loadd(2, u + kc * 64, K);
        _tile_loadd(3, wq + kc * 2048, 128);
        _tile_loadd(4, wq + kc * 2048 + 64, 128);
        _tile_dpbusd(0, 2, 3);
        _tile_dpbusd(1, 2, 4);
    }
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
}

/* 32 rows of u (two A tiles) times the item's two blocks: four sums tiles, each A and B tile loaded once per
 * 64 inputs for two tdpbusd (the 16-row tile above loads three tiles for two). c [32][32] int32. */
__attribute__((target("amx-tile,amx-int8"))) static void w8a8_tile_amx32(const uint8_t *u, int64_t K,
                                                                          const int8_t *wq, int32_t *c) {
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t kc = 0; kc < K / 64; kc++) {
        _tile_loadd(4, u + kc * 64, K);
        _tile_loadd(5, u + 16 * K + kc * 64, K);
        _tile_loadd(6, wq + kc * 2048, 128);
        _tile_loadd(7, wq + kc * 2048 + 64, 128);
        _tile_dpbusd(0, 4, 6);
        _tile_dpbusd(1, 4, 7);
        _tile_dpbusd(2, 5, 6);
        _tile_dpbusd(3, 5, 7);
    }
    _tile_stored(0, c, 128);
    _tile_stored(1, c + 16, 128);
    _tile_stored(2, c + 16 * 32, 128);
    _tile_stored(3, c + 16 * 32 + 16, 128);
}

#ifndef W8_AMX_BLOCK
#define W8_AMX_BLOCK 256 /* rows (a multiple of 32) */
#endif

/* LLM.int8's decomposition (outlier > 0): the input columns whose magnitude exceeds `outlier` in any row of the
 * step are left out of the int8 product (zeros in u, and in each row's amax) and added in fp32 from the int8
 * weights: y = (sums * scale_w) * scale_x + (sum over those columns c, ascending, of x[m, c] q[n, c]) * scale_w.
 * Shared between the team's threads for one call: */
static float *w8_colmax;  /* [threads][K] each thread's column maxima */
static int64_t *w8_cols;  /* the outlier columns, ascending */
static int64_t w8_ncols;

/* Ternary weights (BitNet b1.58: q in {-1, 0, 1}) in 2 bits (kv_lin.sub = 1, K % 16 == 0): an item's q as
 * [K / 16 chunks][2 blocks][64 bytes], byte j of (chunk h, block b) holding in bits 2i, 2i + 1 the q + 1 of
 * byte j of quad 4h + i of the int8 layout; then the same scales and row sums. Each item is widened back to
 * that layout (w8a8_ternary_widen) before the same tiles multiply it: the same bits as its int8 packing,
 * from a quarter of the bytes. */
INLINE int64_t w8a8_ternary_item_bytes(int64_t K) { return K * 8 + 2 * QGROUP * 64; }

/* Quad 4h + j of a block as int8 q, from the 64 bytes v of its chunk (bits 2j, 2j + 1 of each byte: q + 1;
 * the 16-bit shift moves bits across bytes, the mask keeps each byte's own). */
INLINE __m512i ternary_quad(__m512i v, int j) {
    return _mm512_sub_epi8(_mm512_and_si512(_mm512_srli_epi16(v, 2 * j), _mm512_set1_epi8(3)), _mm512_set1_epi8(1));
}

/* w8a8_tile on the 2-bit layout, each quad widened in registers as it streams in (VNNI: no widened copy). */
INLINE void w8a8_tile_ternary(int MM, const uint8_t *u, int64_t K, const uint8_t *t, __m512i acc[W8_ROWS][QGROUP]) {
    for (int i = 0; i < MM; i++)
        for (int b = 0; b < QGROUP; b++) acc[i][b] = _mm512_setzero_si512();
    for (int64_t h = 0; h < K / 16; h++) {
        const __m512i v0 = _mm512_loadu_si512(t + h * 128), v1 = _mm512_loadu_si512(t + h * 128 + 64);
        for (int j = 0; j < 4; j++) {
            const __m512i w0 = ternary_quad(v0, j), w1 = ternary_quad(v1, j);
            for (int i = 0; i < MM; i++) {
                const __m512i xb = _mm512_set1_epi32(*(const int32_t *)(u + i * K + 4 * (4 * h + j)));
                acc[i][0] = _mm512_dpbusd_epi32(acc[i][0], xb, w0);
                acc[i][1] = _mm512_dpbusd_epi32(acc[i][1], xb, w1);
            }
        }
    }
}

static void w8a8_ternary_widen(const uint8_t *t, int64_t K, int8_t *q) {
    for (int64_t h = 0; h < K / 16; h++)
        for (int b = 0; b < QGROUP; b++) {
            const __m512i v = _mm512_loadu_si512(t + (h * QGROUP + b) * 64);
            for (int j = 0; j < 4; j++) _mm512_storeu_si512(q + ((4 * h + j) * QGROUP + b) * 64, ternary_quad(v, j));
        }
}

/* Every thread of the team: quantize the rows, then items of 32 outputs split between the threads. */
static void w8a8_body(const bf16 *x, int64_t ldx, const uint8_t *w, const bf16 *bias, bf16 *y, int64_t ldy,
                      int64_t M, int64_t N, int64_t K, float *scratch, float outlier, int ternary) {
    const int amx = kv_amx && K % 64 == 0 && M > 4; /* a few rows: VNNI streams the weights faster */
    const int64_t rows = amx ? (M + 15) / 16 * 16 : M;
    float *sx = scratch;
    uint8_t *u = (uint8_t *)(scratch + M);
    const int64_t nthreads = omp_get_num_threads(), me = omp_get_thread_num();
    int64_t ncols = 0;
    bf16 *xrow = NULL; /* a row with the outlier columns zeroed */
    if (outlier > 0) {
#pragma omp single
        {
            w8_colmax = (float *)calloc(nthreads * K, sizeof(float));
            w8_cols = (int64_t *)malloc(sizeof(int64_t) * K);
        }
        float *mine = w8_colmax + me * K;
#pragma omp for schedule(static)
        for (int64_t m = 0; m < M; m++)
            for (int64_t k = 0; k < K; k++) {
                const float a = fabsf(b2f(x[m * ldx + k]));
                if (a > mine[k]) mine[k] = a;
            }
#pragma omp single
        {
            w8_ncols = 0;
            for (int64_t k = 0; k < K; k++) {
                float a = 0.0f;
                for (int64_t t = 0; t < nthreads; t++) a = fmaxf(a, w8_colmax[t * K + k]);
                if (a > outlier) w8_cols[w8_ncols++] = k;
            }
        }
        ncols = w8_ncols;
        if (ncols) xrow = (bf16 *)malloc(sizeof(bf16) * K);
    }
#pragma omp for schedule(static)
    for (int64_t m = 0; m < rows; m++) {
        if (m < M && ncols) {
            memcpy(xrow, x + m * ldx, sizeof(bf16) * K);
            for (int64_t j = 0; j < ncols; j++) xrow[w8_cols[j]] = 0;
            w8a8_quantize_row(xrow, K, u + m * K, sx + m);
        } else if (m < M) {
            w8a8_quantize_row(x + m * ldx, K, u + m * K, sx + m);
        } else {
            memset(u + m * K, 0, K); /* AMX's padding rows */
        }
    }
    /* the outlier columns' weights of the item being done, as fp32: [ncols][32 outputs] */
    float *qcols = ncols ? (float *)malloc(sizeof(float) * ncols * QGROUP * 16) : NULL;
    const int64_t nitems = (N + 16 * QGROUP - 1) / (16 * QGROUP);
    const int64_t ib = ternary ? w8a8_ternary_item_bytes(K) : w8a8_item_bytes(K), qb = ternary ? K * 8 : K * 32;
    int8_t *widened = ternary && amx ? (int8_t *)malloc(K * 32) : NULL; /* VNNI widens in registers */
    const int step = amx ? 32 : W8_ROWS;
    /* Each thread takes an equal contiguous share of the items. On AMX, rows go in blocks of W8_AMX_BLOCK that
     * every item of the share multiplies in turn: the block's u stays in L2 (all of u did not: 2048 rows of
     * the down projection are 3 MB, read again for every item), and the share's weights too. */
    const int64_t nt = omp_get_num_threads(), tid = omp_get_thread_num();
    const int64_t i0 = nitems * tid / nt, i1 = nitems * (tid + 1) / nt, RB = amx ? W8_AMX_BLOCK : M;
    if (amx) amx_begin();
    for (int64_t r0 = 0; r0 < M; r0 += RB)
    for (int64_t it = i0; it < i1; it++) {
        const int8_t *wq = (const int8_t *)(w + it * ib);
        const float *sw = (const float *)(w + it * ib + qb);
        if (ternary && amx) w8a8_ternary_widen(w + it * ib, K, widened), wq = widened;
        const int32_t *wsum = (const int32_t *)(sw + QGROUP * 16);
        const int64_t r1 = r0 + RB < M ? r0 + RB : M;
        for (int64_t j = 0; j < ncols; j++) { /* input c of output n: quad c / 4 (128 bytes each), byte c % 4 */
            const int64_t c = w8_cols[j];
            for (int64_t n = 0; n < QGROUP * 16; n++)
                qcols[j * QGROUP * 16 + n] =
                    ternary && !amx /* 2-bit field (c / 4) % 4 of the byte of chunk c / 16 */
                        ? (float)(((w[it * ib + (c / 16) * 128 + (n / 16) * 64 + (n % 16) * 4 + c % 4] >> (2 * (c / 4 % 4))) & 3) - 1)
                        : (float)wq[(c / 4) * 128 + (n / 16) * 64 + (n % 16) * 4 + c % 4];
        }
        for (int64_t m0 = r0; m0 < r1; m0 += step) {
            const int mm = r1 - m0 < step ? (int)(r1 - m0) : step;
            int32_t c[32][QGROUP * 16]; /* the tile's sums, rows of 32 outputs */
            if (amx && mm > 16) {
                w8a8_tile_amx32(u + m0 * K, K, wq, &c[0][0]);
            } else if (amx) {
                w8a8_tile_amx(u + m0 * K, K, wq, &c[0][0]);
            } else {
                __m512i acc[W8_ROWS][QGROUP];
                const uint8_t *tq = w + it * ib;
                if (ternary) switch (mm) {
                case 1: w8a8_tile_ternary(1, u + m0 * K, K, tq, acc); break;
                case 2: w8a8_tile_ternary(2, u + m0 * K, K, tq, acc); break;
                case 3: w8a8_tile_ternary(3, u + m0 * K, K, tq, acc); break;
                case 4: w8a8_tile_ternary(4, u + m0 * K, K, tq, acc); break;
                default: w8a8_tile_ternary(W8_ROWS, u + m0 * K, K, tq, acc); break;
                }
                else switch (mm) { /* constant MM: no branches in the inner loop */
                case 1: w8a8_tile(1, u + m0 * K, K, wq, acc); break;
                case 2: w8a8_tile(2, u + m0 * K, K, wq, acc); break;
                case 3: w8a8_tile(3, u + m0 * K, K, wq, acc); break;
                case 4: w8a8_tile(4, u + m0 * K, K, wq, acc); break;
                default: w8a8_tile(W8_ROWS, u + m0 * K, K, wq, acc); break;
                }
                for (int i = 0; i < mm; i++)
                    for (int b = 0; b < QGROUP; b++) _mm512_storeu_si512(&c[i][b * 16], acc[i][b]);
            }
            /* sums -> (sum - 128 wsum) * scale_w * scale_x (+ bias) -> bf16, straight to y */
            for (int b = 0; b < QGROUP; b++) {
                const int64_t n0 = (it * QGROUP + b) * 16;
                if (n0 >= N) continue; /* a padding block */
                const __m512i corr = _mm512_slli_epi32(_mm512_loadu_si512(wsum + b * 16), 7); /* 128 wsum */
                const __m512 s = _mm512_loadu_ps(sw + b * 16);
                const __mmask16 keep = N - n0 >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (N - n0)) - 1u);
                const __m512 bv = bias ? load16_mask(bias + n0, keep) : _mm512_setzero_ps();
                for (int i = 0; i < mm; i++) {
                    const __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_loadu_si512(&c[i][b * 16]), corr));
                    __m512 o = _mm512_mul_ps(_mm512_mul_ps(v, s), _mm512_set1_ps(sx[m0 + i]));
                    if (ncols) { /* the outlier columns in fp32 (x q is exact: no rounding before the sum) */
                        const bf16 *xr = x + (m0 + i) * ldx;
                        __m512 extra = _mm512_setzero_ps();
                        for (int64_t j = 0; j < ncols; j++)
                            extra = _mm512_add_ps(extra, _mm512_mul_ps(_mm512_set1_ps(b2f(xr[w8_cols[j]])),
                                                                       _mm512_loadu_ps(qcols + j * QGROUP * 16 + b * 16)));
                        o = _mm512_add_ps(o, _mm512_mul_ps(extra, s));
                    }
                    if (bias) o = _mm512_add_ps(o, bv);
                    store16_mask(y + (m0 + i) * ldy + n0, o, keep);
                }
            }
        }
    }
    if (amx) amx_end();
    free(widened);
    free(qcols);
    free(xrow);
#pragma omp barrier
    if (outlier > 0) {
#pragma omp single
        {
            free(w8_colmax);
            free(w8_cols);
        }
    }
}

/* Floats of scratch a linear of M rows and K inputs needs: group sums (groups >= 16) or W8A8's sx and u. */
INLINE int64_t lin_scratch_floats(int64_t M, int64_t K) {
    const int64_t sums = M * (K / 16), w8 = M + ((M + 15) / 16 * 16 * K + 3) / 4; /* AMX pads to 16 rows */
    return (sums > w8 ? sums : w8) + 16;
}

/* The bf16 linear on AMX tiles (tdpbf16ps: 16 x 32 inputs times 32 x 16 weights into 16 x 16 fp32 sums),
 * taken for every M where AMX is on and K % 32 == 0, so that a row's result does not depend on its batch.
 * The packed layout is AMX's too: the B tile of block b over inputs 32 kc .. 32 kc + 31 is 16 pairs of 64
 * bytes, contiguous at wp + b 16 K + kc 512. A tile is 16 rows of x (the last partial one copied into a
 * zero-padded buffer); tiles 0-2 hold the sums of up to LIN_GROUP (3) blocks, 3 the rows, 4-6 the weights.
 * The sums run in fp32 in the tile's own order: not the vdpbf16ps kernel's bits, the same for every M. */
#define AMX_BF16_TILE(NB)                                                                                          \
    __attribute__((target("amx-tile,amx-bf16"))) static void linear_amx_tile##NB(                                \
        const bf16 *a, int64_t lda, const bf16 *wp, int64_t K, float *c) {                                        \
        _tile_zero(0);                                                                                             \
        if (NB > 1) _tile_zero(1);                                                                                 \
        if (NB > 2) _tile_zero(2);                                                                                 \
        for (int64_t kc = 0; kc < K / 32; kc++) {                                                                  \
            _tile_loadd(3, a + kc * 32, lda * 2);                                                                  \
            _tile_loadd(4, wp + kc * 512, 64);                                                                     \
            _tile_dpbf16ps(0, 3, 4);                                                                               \
            if (NB > 1) {                                                                                          \
                _tile_loadd(5, wp + 16 * K + kc * 512, 64);                                                        \
                _tile_dpbf16ps(1, 3, 5);                                                                           \
            }                                                                                                      \
            if (NB > 2) {                                                                                          \
                _tile_loadd(6, wp + 32 * K + kc * 512, 64);                                                        \
                _tile_dpbf16ps(2, 3, 6);                                                                           \
            }                                                                                                      \
        }                                                                                                          \
        _tile_stored(0, c, LIN_GROUP * 64);                                                                        \
        if (NB > 1) _tile_stored(1, c + 16, LIN_GROUP * 64);                                                       \
        if (NB > 2) _tile_stored(2, c + 32, LIN_GROUP * 64);                                                       \
    }
AMX_BF16_TILE(1)
AMX_BF16_TILE(2)
AMX_BF16_TILE(3)

/* linear_bf16_body's work split (each thread an equal contiguous share of the blocks, in groups of up to
 * LIN_GROUP; rows in chunks of LIN_MC) with tiles of 16 rows on AMX. Every thread of the team calls it. */
static void linear_bf16_amx_body(const bf16 *x, int64_t ldx, const bf16 *wp, const bf16 *bias, bf16 *y,
                                 int64_t ldy, int64_t M, int64_t N, int64_t K) {
    const int64_t nblocks = (N + 15) / 16;
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t b_lo = nblocks * t / nt, b_hi = nblocks * (t + 1) / nt;
    const int64_t full = M / 16 * 16;
    bf16 *pad = NULL;
    if (M > full && b_lo < b_hi) { /* the last rows, zero-padded to a tile */
        pad = (bf16 *)calloc(16 * K, sizeof(bf16));
        for (int64_t m = full; m < M; m++) memcpy(pad + (m - full) * K, x + m * ldx, K * sizeof(bf16));
    }
    if (b_lo < b_hi) amx_begin();
    for (int64_t c0 = 0; c0 < M; c0 += LIN_MC) {
        const int64_t c1 = M - c0 < LIN_MC ? M : c0 + LIN_MC;
        for (int64_t b0 = b_lo; b0 < b_hi; b0 += LIN_GROUP) {
            const int nb = b_hi - b0 < LIN_GROUP ? (int)(b_hi - b0) : LIN_GROUP;
            const bf16 *w = wp + b0 * 16 * K;
            for (int64_t m0 = c0; m0 < c1; m0 += 16) {
                const int mm = c1 - m0 < 16 ? (int)(c1 - m0) : 16;
                const bf16 *a = m0 + 16 <= M ? x + m0 * ldx : pad;
                const int64_t lda = m0 + 16 <= M ? ldx : K;
                float c[16][LIN_GROUP * 16];
                if (nb == 1) linear_amx_tile1(a, lda, w, K, &c[0][0]);
                else if (nb == 2) linear_amx_tile2(a, lda, w, K, &c[0][0]);
                else linear_amx_tile3(a, lda, w, K, &c[0][0]);
                store_tile(&c[0][0], LIN_GROUP * 16, mm, nb, b0, bias, y, ldy, m0, N);
            }
        }
    }
    if (b_lo < b_hi) amx_end();
    free(pad);
#pragma omp barrier
}

/* A linear layer as the kernels see it: kind 0 = packed bf16, 4 / 5 / 8 = quantized (w: the item stream above), 9 = W8A8. */
typedef struct {
    int64_t kind;
    const void *w;
    int64_t has_min;
    int64_t group;
    const bf16 *bias;
    float outlier; /* W8A8: LLM.int8's threshold (0: none): w8a8_body */
    int64_t sub;   /* kinds 4-8: the scales' layout (q_item_bytes); kind 9: 1 = ternary in 2 bits */
} kv_lin;

static void lin_body(const kv_lin *L, const bf16 *x, int64_t ldx, bf16 *y, int64_t ldy, int64_t M, int64_t N,
                     int64_t K, float *xsum) {
    if (L->kind == 0 && kv_amx && K % 32 == 0 && LIN_GROUP <= 3)
        linear_bf16_amx_body(x, ldx, (const bf16 *)L->w, L->bias, y, ldy, M, N, K);
    else if (L->kind == 0)
        linear_bf16_body(x, ldx, (const bf16 *)L->w, L->bias, y, ldy, M, N, K);
    else if (L->kind == 9)
        w8a8_body(x, ldx, (const uint8_t *)L->w, L->bias, y, ldy, M, N, K, xsum, L->outlier, (int)L->sub);
    else
        qlinear_bf16_body((int)L->kind, x, ldx, (const uint8_t *)L->w, (int)L->has_min, (int)L->sub, L->group, L->bias, y, ldy, M,
                          N, K, xsum);
}

void kv_lin_forward(const kv_lin *L, const bf16 *x, int64_t ldx, bf16 *y, int64_t ldy, int64_t M, int64_t N,
                    int64_t K) {
    float *xsum = L->kind ? (float *)malloc(sizeof(float) * lin_scratch_floats(M, K)) : NULL;
#pragma omp parallel
    lin_body(L, x, ldx, y, ldy, M, N, K, xsum);
    free(xsum);
}

/* A mixture-of-experts layer's experts over a step's (token, expert) rows grouped by expert: counts[e]
 * consecutive rows of xs go through expert e, out = down_e(silu(gate_e x) * up_e x) (the same kernels as one
 * call per matrix, so the same bits). gu / down: arrays of n_experts descriptors; scratch gu_buf [R, 2I],
 * act [R, I] (R = sum of counts), xsum as lin_body's. Called inside a parallel region. */
static void moe_experts_body(const kv_lin *gu, const kv_lin *down, const bf16 *xs, int64_t ldx,
                             const int64_t *counts, int64_t n_experts, bf16 *out, int64_t ldo, int64_t E,
                             int64_t I, bf16 *gu_buf, bf16 *act, float *xsum) {
    int quantized = 1, most = 0; /* group-quantized (kinds 4, 5, 8, 10): the items of all experts in one loop */
    for (int64_t e = 0; e < n_experts; e++) {
        quantized &= gu[e].kind != 0 && gu[e].kind != 9 && down[e].kind != 0 && down[e].kind != 9;
        if (counts[e] > most) most = (int)counts[e];
    }
    if (!quantized) { /* bf16 and W8A8 experts: one call per matrix (each splits its work between the threads) */
        int64_t start = 0;
        for (int64_t e = 0; e < n_experts; e++) {
            const int64_t n = counts[e];
            if (n) {
                lin_body(gu + e, xs + start * ldx, ldx, gu_buf + start * 2 * I, 2 * I, n, 2 * I, E, xsum);
                silu_mul_bf16_body(gu_buf + start * 2 * I, 2 * I, act + start * I, I, n, I);
                lin_body(down + e, act + start * I, I, out + start * ldo, ldo, n, E, I, xsum);
            }
            start += n;
        }
        return;
    }
    /* Quantized experts: all experts' work items of a matrix in one loop over the threads (three barriers
     * per layer, not three per expert; a decode step's 8 experts of 24-32 items each balance across the
     * threads), each item computed as qlinear_bf16_body computes it (AMX or AVX-512 alike), so the same bits. xsum: expert e's
     * rows' group sums at row offset starts[e] (stride K / 16: groups are >= 16). */
    int64_t starts[n_experts + 1], units[n_experts + 1];
    const int64_t gu_items = (2 * I + 31) / 32, down_items = (E + 31) / 32;
    starts[0] = units[0] = 0;
    for (int64_t e = 0; e < n_experts; e++) starts[e + 1] = starts[e] + counts[e];
    const int64_t R = starts[n_experts];
    bf16 *pbuf = most > 4 ? (bf16 *)malloc(sizeof(bf16) * QGROUP * 16 * (E > I ? E : I)) : NULL;
    for (int pass = 0; pass < 2; pass++) {
        const kv_lin *L = pass ? down : gu;
        const bf16 *in = pass ? act : xs;
        const int64_t ldi = pass ? I : ldx, K = pass ? I : E, N = pass ? E : 2 * I, items = pass ? down_items : gu_items;
        bf16 *o = pass ? out : gu_buf;
        const int64_t ldout = pass ? ldo : 2 * I;
        for (int64_t e = 0; e < n_experts; e++) units[e + 1] = units[e] + (counts[e] ? items : 0);
#pragma omp for schedule(static)
        for (int64_t m = 0; m < R; m++) {
            int64_t e = 0;
            while (starts[e + 1] <= m) e++;
            if (L[e].has_min)
                q_xsum_row(in + m * ldi, L[e].group, K, xsum + starts[e] * (K / 16) + (m - starts[e]) * (K / L[e].group));
        }
        bf16 *pad = NULL; /* q_amx_pad's rows of expert pad_e */
        int64_t pad_e = -1;
        int tiles = 0;
#pragma omp for schedule(static)
        for (int64_t u = 0; u < units[n_experts]; u++) {
            int64_t e = 0;
            while (units[e + 1] <= u) e++;
            const int kind = (int)L[e].kind, has_min = (int)L[e].has_min, sub = (int)L[e].sub;
            const uint8_t *w = (const uint8_t *)L[e].w;
            const bf16 *x = in + starts[e] * ldi;
            if (q_on_amx(counts[e], L[e].group)) {
                if (pad_e != e) free(pad), pad = q_amx_pad(x, ldi, counts[e], K), pad_e = e;
                amx_q_config(counts[e] < 16 ? counts[e] : 16, L[e].group < 32 ? L[e].group : 32);
                qlinear_item_amx(kind, x, ldi, w, has_min, sub, L[e].group, L[e].bias, o + starts[e] * ldout, ldout,
                                 counts[e], N, K, xsum + starts[e] * (K / 16), u - units[e], 0, counts[e], pbuf,
                                 pad);
                tiles = 1;
            } else {
                qlinear_item(kind, x, ldi, w, has_min, sub, L[e].group, L[e].bias, o + starts[e] * ldout, ldout,
                             counts[e], N, K, xsum + starts[e] * (K / 16), u - units[e], pbuf);
            }
        }
        if (tiles) amx_end();
        free(pad);
        if (!pass) silu_mul_bf16_body(gu_buf, 2 * I, act, I, R, I);
    }
    free(pbuf);
}

static float *moe_xsum(int64_t rows, int64_t E, int64_t I) { /* group sums: groups are >= 16 */
    const int64_t kmax = E > I ? E : I;
    return (float *)malloc(sizeof(float) * lin_scratch_floats(rows ? rows : 1, kmax));
}

void kv_moe_experts_bf16(const kv_lin *gu, const kv_lin *down, const bf16 *xs, int64_t ldx, const int64_t *counts,
                         int64_t n_experts, bf16 *out, int64_t ldo, int64_t E, int64_t I, bf16 *gu_buf, bf16 *act) {
    int64_t R = 0;
    for (int64_t e = 0; e < n_experts; e++) R += counts[e];
    float *xsum = moe_xsum(R, E, I);
#pragma omp parallel
    moe_experts_body(gu, down, xs, ldx, counts, n_experts, out, ldo, E, I, gu_buf, act, xsum);
    free(xsum);
}

/* A whole mixture-of-experts MLP on T rows of x [T, E]: the router's logits (a linear layer, bf16), a
 * softmax in fp32 and each row's top k (the first of equal values; renormalized to sum 1 if asked), the
 * rows grouped by expert (stable) through moe_experts_body, and each row's k outputs weighted and summed
 * in ascending expert order, each product and each sum rounded to bf16 (the PyTorch path's index_add).
 * y [T, E]. Scratch from the caller: logits [T, NE], xs and ys [T k, E], gu_buf [T k, 2I], act [T k, I]. */
/* kv_moe_layer_bf16's integer and fp32 scratch, for R = T k rows and NE experts */
typedef struct {
    int64_t *sel, *pos, *counts, *next;
    float *w, *p;
} moe_scratch;

static moe_scratch moe_scratch_alloc(int64_t R, int64_t NE) {
    moe_scratch m = {(int64_t *)malloc(sizeof(int64_t) * (R ? R : 1)), (int64_t *)malloc(sizeof(int64_t) * (R ? R : 1)),
                     (int64_t *)malloc(sizeof(int64_t) * NE), (int64_t *)malloc(sizeof(int64_t) * NE),
                     (float *)malloc(sizeof(float) * (R ? R : 1)), (float *)malloc(sizeof(float) * NE)};
    return m;
}

static void moe_scratch_free(moe_scratch *m) { free(m->sel), free(m->pos), free(m->counts), free(m->next), free(m->w), free(m->p); }

/* kv_moe_layer_bf16's work, called inside a parallel region (the fused decoder layers call it too). */
static void moe_layer_body(const kv_lin *router, const kv_lin *gu, const kv_lin *down, const bf16 *x, int64_t ldx,
                           int64_t T, int64_t E, int64_t I, int64_t NE, int64_t k, int64_t renormalize,
                           bf16 *logits, bf16 *xs, bf16 *ys, bf16 *gu_buf, bf16 *act, bf16 *y, int64_t ldy,
                           moe_scratch *ms, float *xsum) {
    const int64_t R = T * k;
    int64_t *sel = ms->sel, *pos = ms->pos, *counts = ms->counts, *next = ms->next;
    float *w = ms->w, *p = ms->p;
    lin_body(router, x, ldx, logits, NE, T, NE, E, xsum);
#pragma omp single
    {
        for (int64_t e = 0; e < NE; e++) counts[e] = 0;
        for (int64_t t = 0; t < T; t++) {
            float m = -INFINITY, sum = 0.0f, picked = 0.0f;
            for (int64_t e = 0; e < NE; e++) m = fmaxf(m, b2f(logits[t * NE + e]));
            for (int64_t e = 0; e < NE; e++) sum += (p[e] = expf(b2f(logits[t * NE + e]) - m));
            for (int64_t e = 0; e < NE; e++) p[e] /= sum;
            for (int64_t j = 0; j < k; j++) {
                int64_t best = -1;
                for (int64_t e = 0; e < NE; e++)
                    if (p[e] >= 0.0f && (best < 0 || p[e] > p[best])) best = e;
                sel[t * k + j] = best;
                w[t * k + j] = p[best];
                picked += p[best];
                p[best] = -1.0f; /* taken */
            }
            if (renormalize)
                for (int64_t j = 0; j < k; j++) w[t * k + j] /= picked;
            for (int64_t j = 0; j < k; j++) counts[sel[t * k + j]]++;
        }
        for (int64_t e = 0, at = 0; e < NE; e++) next[e] = at, at += counts[e];
        for (int64_t r = 0; r < R; r++) { /* rows grouped by expert, in (token, choice) order within each */
            pos[r] = next[sel[r]]++;
            memcpy(xs + pos[r] * E, x + (r / k) * ldx, sizeof(bf16) * E);
        }
    }
    moe_experts_body(gu, down, xs, E, counts, NE, ys, E, E, I, gu_buf, act, xsum);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; t++) {
        bf16 *yt = y + t * ldy;
        for (int64_t c = 0; c < E; c++) yt[c] = 0;
        for (int64_t done = 0; done < k; done++) { /* the token's experts in ascending order */
            int64_t j = -1;
            for (int64_t i = 0; i < k; i++) {
                const int64_t e = sel[t * k + i];
                int64_t before = 0; /* how many of the token's experts are lower than e */
                for (int64_t i2 = 0; i2 < k; i2++) before += sel[t * k + i2] < e;
                if (before == done) j = i;
            }
            const bf16 *yr = ys + pos[t * k + j] * E;
            const __m512 wj = _mm512_set1_ps(w[t * k + j]);
            for (int64_t c = 0; c < E; c += 16) /* E is a multiple of 16 */
                store16(yt + c, _mm512_add_ps(load16(yt + c), round16(_mm512_mul_ps(load16(yr + c), wj))));
        }
    }
}

void kv_moe_layer_bf16(const kv_lin *router, const kv_lin *gu, const kv_lin *down, const bf16 *x, int64_t ldx,
                       int64_t T, int64_t E, int64_t I, int64_t NE, int64_t k, int64_t renormalize, bf16 *logits,
                       bf16 *xs, bf16 *ys, bf16 *gu_buf, bf16 *act, bf16 *y) {
    moe_scratch ms = moe_scratch_alloc(T * k, NE);
    float *xsum = moe_xsum(T * k > T ? T * k : T, E, I);
#pragma omp parallel
    moe_layer_body(router, gu, down, x, ldx, T, E, I, NE, k, renormalize, logits, xs, ys, gu_buf, act, y, E, &ms,
                   xsum);
    moe_scratch_free(&ms);
    free(xsum);
}

/* ---------------------------------------------------------------------------------------------------
 * All decoder layers (pre-norm attention + gated MLP: Llama's form, with Qwen3's q/k norms and Gemma 3's
 * extra norms and GeGLU where a layer has them) for a step's tokens (decodes and prefill rows alike: each
 * row attends its own sequence's cache up to its position), in one parallel region: the same kernels as
 * above, separated by the barriers their loops end with. One C call per step, not ~20 Python-level calls
 * per layer (nor one call and one thread wake-up per layer). Per layer:
 *   residual = h + residual (residual all zeros for the first layer: exact, x + 0 rounds to x)
 *   x = norm_in(residual); qkv = x Wqkv (+b); [q, k = norm_q(q), norm_k(k) per head]
 *   rope(q, k), cache <- k, v; a = attention(q, cache); o = a Wo (+b); [o = norm_attn(o)]
 *   residual = o + residual; x = norm_post(residual); h = act_mul(x Wgu) Wdown, or a mixture of experts
 *   (kv_moe_layer_bf16's work) where the layer has a router; [h = norm_mlp(h)]
 * Each layer reads the slots and block tables of its KV group (sliding-window layers have their own) and
 * its own rotary tables. h [S, E] is updated in place. Scratch buffers come from the caller: x [S, E],
 * qkv [S, (H + 2 KVH) D], a [S, H D], gu [S, 2 I], act [S, I].
 */
/* Built with -DKV_PROFILE (bench/kernel_ab.py), thread 0 adds the time of each phase, up to the barrier
 * after it, to kv_prof (TSC ticks; an extra barrier per phase): norm, qkv, rope + cache write, attention, o,
 * norm, gate/up, silu * up, down. Compiled out otherwise. */
#ifdef KV_PROFILE
#include <x86intrin.h>
uint64_t kv_prof[16];
static uint64_t kv_t0;
#define KV_PHASE_START(l)                                                                                          \
    do {                                                                                                           \
        if (omp_get_thread_num() == 0 && (l) == 0) kv_t0 = __rdtsc();                                              \
    } while (0)
#define KV_PHASE(i)                                                                                                \
    do {                                                                                                           \
        _Pragma("omp barrier") if (omp_get_thread_num() == 0) {                                                    \
            const uint64_t now = __rdtsc();                                                                        \
            kv_prof[i] += now - kv_t0;                                                                             \
            kv_t0 = now;                                                                                           \
        }                                                                                                          \
    } while (0)
#else
#define KV_PHASE_START(l) ((void)0)
#define KV_PHASE(i) ((void)0)
#endif

typedef struct {
    const bf16 *norm_in, *norm_post;
    const kv_lin *qkv, *o, *gu, *down;
    uint8_t *k_cache, *v_cache;
    float eps, scale;
    int64_t window;
    const bf16 *norm_q, *norm_k;          /* per-head q/k norms before the rotary (Qwen3, Gemma 3); NULL: none */
    const bf16 *norm_attn, *norm_mlp;     /* norms of the attention's and the MLP's outputs (Gemma 3); NULL: none */
    const bf16 *cos, *sin;                /* the layer's rotary tables */
    int64_t act;                          /* 0: silu, 1: gelu (tanh) */
    int64_t group;                        /* its KV group: which slots and block tables it reads */
    /* a mixture-of-experts MLP in place of gu / down (router NULL: none): kv_moe_layer_bf16's arguments */
    const kv_lin *router, *moe_gu, *moe_down;
    int64_t n_experts, top_k, renormalize, moe_inter;
} kv_layer;

void kv_decode_layers_bf16(const kv_layer *layers, int64_t L, bf16 *h, bf16 *residual, int64_t S_all, int64_t E,
                           int64_t I, int64_t H, int64_t KVH, int64_t D, const int64_t *positions,
                           const int64_t *const *slots_g, const int64_t *const *tables_g, const int64_t *row_table,
                           const int64_t *max_blocks_g, const int64_t *ctx_lens, int64_t num_blocks,
                           int64_t block_size, bf16 *x, bf16 *qkv, bf16 *a, bf16 *gu, bf16 *act,
                           const int64_t *out_rows, int64_t n_out, int64_t kv_kind) {
    const int64_t W = (H + 2 * KVH) * D;
    const int kv = (int)kv_kind; /* the cache's kind: 0 bf16, 1 int8, 2 FP8 E4M3, 3 FP8 E5M2 */
    int64_t kmax = E > I ? (E > H * D ? E : H * D) : (I > H * D ? I : H * D), rows = S_all, NE = 1, MI = 16, K = 1;
    for (int64_t l = 0; l < L; l++) /* the mixture-of-experts layers' sizes, for their scratch */
        if (layers[l].router) {
            const kv_layer *ly = layers + l;
            if (ly->moe_inter > kmax) kmax = ly->moe_inter;
            if (ly->n_experts > NE) NE = ly->n_experts;
            if (ly->moe_inter > MI) MI = ly->moe_inter;
            if (ly->top_k > K) K = ly->top_k;
        }
    if (S_all * K > rows) rows = S_all * K;
    float *xsum = (float *)malloc(sizeof(float) * lin_scratch_floats(rows, kmax));
    moe_scratch ms = moe_scratch_alloc(S_all * K, NE);
    bf16 *moe_buf = NULL, *logits = NULL, *xs = NULL, *ys = NULL, *mgu = NULL, *mact = NULL;
    if (NE > 1) {
        const int64_t R = S_all * K;
        moe_buf = (bf16 *)malloc(sizeof(bf16) * (S_all * NE + 2 * R * E + 3 * R * MI));
        logits = moe_buf, xs = logits + S_all * NE, ys = xs + R * E, mgu = ys + R * E, mact = mgu + 2 * R * MI;
    }
    /* out_rows (ascending; prefill and mixed steps only): the rows whose hidden state is wanted. The last
     * layer writes every row's K/V, then moves those rows to the front and runs its attention, o and MLP
     * on them alone, as their results reach nothing else. */
    if (!row_table || n_out >= S_all) out_rows = NULL;
    int64_t *out_ctx = out_rows ? (int64_t *)malloc(sizeof(int64_t) * (2 * n_out + 1)) : NULL;
#pragma omp parallel
    for (int64_t l = 0; l < L; l++) {
        const kv_layer *ly = layers + l;
        const int64_t *slots = slots_g[ly->group], *tables = tables_g[ly->group];
        const int prune = out_rows && l == L - 1;
        int64_t S = prune ? n_out : S_all; /* the rows from the attention on */
        const int64_t *rows_table = prune ? out_ctx + n_out : row_table, *rows_ctx = prune ? out_ctx : ctx_lens;
        /* row_table NULL: row r is sequence r's only row (a decode step), and attention writes the K/V itself */
        attn_write write = {qkv + H * D, W, qkv + (H + KVH) * D, W, positions, slots, ly->cos, ly->cos ? ly->sin : NULL};
        KV_PHASE_START(l);
        rms_norm_bf16_body(h, E, residual, E, ly->norm_in, x, E, S_all, E, ly->eps);
        KV_PHASE(0);
        lin_body(ly->qkv, x, E, qkv, W, S_all, W, E, xsum);
        if (ly->norm_q) head_norm_bf16_body(qkv, W, S_all, H, KVH, D, ly->norm_q, ly->norm_k, ly->eps);
        KV_PHASE(1);
        if (row_table) /* rows of one sequence read each other's K/V: all are written first */
            rope_cache_bf16_body(qkv, W, qkv + H * D, W, qkv + (H + KVH) * D, W, positions, ly->cos, ly->sin, S_all,
                                 H, KVH, D, ly->k_cache, ly->v_cache, slots, num_blocks, block_size, ly->cos != 0, kv);
        if (prune) {
#pragma omp single
            for (int64_t i = 0; i < n_out; i++) { /* ascending, and out_rows[i] >= i: no source is overwritten */
                const int64_t r = out_rows[i];
                out_ctx[i] = ctx_lens[r];
                out_ctx[n_out + i] = row_table[r];
                memmove(qkv + i * W, qkv + r * W, sizeof(bf16) * H * D);
                memmove(residual + i * E, residual + r * E, sizeof(bf16) * E);
            }
        }
        KV_PHASE(2);
        decode_attention_bf16_body(qkv, W, ly->k_cache, ly->v_cache, tables, rows_table, max_blocks_g[ly->group],
                                   rows_ctx, a, H * D, S, H, KVH, D, num_blocks, block_size, ly->scale, ly->window,
                                   rows_table ? NULL : &write, kv);
        KV_PHASE(3);
        lin_body(ly->o, a, H * D, h, E, S, E, H * D, xsum);
        if (ly->norm_attn) rms_norm_bf16_body(h, E, NULL, 0, ly->norm_attn, h, E, S, E, ly->eps);
        KV_PHASE(4);
        rms_norm_bf16_body(h, E, residual, E, ly->norm_post, x, E, S, E, ly->eps);
        KV_PHASE(5);
        if (ly->router) {
            moe_layer_body(ly->router, ly->moe_gu, ly->moe_down, x, E, S, E, ly->moe_inter, ly->n_experts, ly->top_k,
                           ly->renormalize, logits, xs, ys, mgu, mact, h, E, &ms, xsum);
        } else {
            lin_body(ly->gu, x, E, gu, 2 * I, S, 2 * I, E, xsum);
            KV_PHASE(6);
            if (ly->act)
                gelu_tanh_mul_bf16_body(gu, 2 * I, act, I, S, I);
            else
                silu_mul_bf16_body(gu, 2 * I, act, I, S, I);
            KV_PHASE(7);
            lin_body(ly->down, act, I, h, E, S, E, I, xsum);
        }
        if (ly->norm_mlp) rms_norm_bf16_body(h, E, NULL, 0, ly->norm_mlp, h, E, S, E, ly->eps);
        KV_PHASE(8);
    }

    free(xsum);
    free(out_ctx);
    free(moe_buf);
    moe_scratch_free(&ms);
}

/* ---------------------------------------------------------------------------------------------------
 * Greedy sampling: the index of each row's largest value (the first one on ties, the first NaN if any,
 * as torch.argmax), on bf16 logits: reads them once (torch's argmax took 1.4 ms for 32 x 49152 fp32 rows,
 * plus 0.35 ms to convert them). Rows are ld elements apart.
 */
void kv_argmax_bf16(const bf16 *x, int64_t ld, int64_t rows, int64_t cols, int64_t *out) {
#pragma omp parallel for schedule(static) if (rows * cols >= 65536)
    for (int64_t r = 0; r < rows; r++) {
        const bf16 *xr = x + r * ld;
        __m512 best = _mm512_set1_ps(-INFINITY);
        __m512i best_i = _mm512_set1_epi32(-1), idx = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
        const __m512i sixteen = _mm512_set1_epi32(16);
        __mmask16 nan = 0;
        int64_t c = 0;
        for (; c + 16 <= cols; c += 16) {
            const __m512 v = load16(xr + c);
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            const __mmask16 gt = _mm512_cmp_ps_mask(v, best, _CMP_GT_OQ); /* strictly: a lane keeps its first max */
            best = _mm512_mask_mov_ps(best, gt, v);
            best_i = _mm512_mask_mov_epi32(best_i, gt, idx);
            idx = _mm512_add_epi32(idx, sixteen);
        }
        float bv[16];
        int32_t bi[16];
        _mm512_storeu_ps(bv, best);
        _mm512_storeu_si512(bi, best_i);
        float m = -INFINITY;
        int64_t arg = -1;
        for (int l = 0; l < 16; l++)
            if (bi[l] >= 0 && (bv[l] > m || (bv[l] == m && bi[l] < arg))) m = bv[l], arg = bi[l];
        for (; c < cols; c++) {
            const float v = b2f(xr[c]);
            if (v != v) nan = 1;
            if (v > m) m = v, arg = c;
        }
        if (nan) /* the first NaN wins, as in torch */
            for (c = 0; c < cols; c++)
                if (b2f(xr[c]) != b2f(xr[c])) { arg = c; break; }
        out[r] = arg < 0 ? 0 : arg; /* all -inf: index 0, as torch */
    }
}
