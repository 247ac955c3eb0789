// Fused CPU kernel for RWKV-7 RNN-mode generation: one whole layer (time mix + channel mix) per call,
// fp32, B rows of one token each.
//
// Generation on a CPU is bound by reading the weights once per token. torch's GEMVs do that at memory
// speed, but an eager layer also runs ~60 small ops, each costing microseconds of dispatch once the weights
// have pushed its operands out of the cache. Here the whole layer is one call; its GEMVs call the BLAS sgemm
// torch itself uses (MKL in torch's x86 wheels), so they stream the weights as fast as F.linear does, and
// each weight is read once for all B rows. The head stays in torch (one large GEMV). The maths is
// TimeMix.step / ChannelMix.step / Block.step in model/rwkv7.py, which stays the reference (tests compare).
//
// Plain C++17, no torch headers: built by cuda/build.py with the host C++ compiler and loaded with ctypes.
// No fast-math: IEEE float arithmetic.

#include <cmath>
#include <cstring>
#include <vector>

namespace {

// y = LayerNorm(x) over n values (biased variance, eps inside the square root), as torch.layer_norm.
void layer_norm(const float* x, const float* w, const float* b, float eps, int n, float* y) {
    float mean = 0.f;
    for (int i = 0; i < n; ++i) mean += x[i];
    mean /= n;
    float var = 0.f;
    for (int i = 0; i < n; ++i) {
        const float d = x[i] - mean;
        var += d * d;
    }
    var /= n;
    const float inv = 1.f / std::sqrt(var + eps);
    for (int i = 0; i < n; ++i) y[i] = (x[i] - mean) * inv * w[i] + b[i];
}

inline float sigmoid(float z) { return 1.f / (1.f + std::exp(-z)); }

// Dot product with 16 independent partial sums, so the compiler vectorises it and the adds do not wait
// on each other (memory-bound rather than latency-bound).
inline float dot(const float* a, const float* b, int n) {
    float acc[16] = {0.f};
    int i = 0;
    for (; i + 16 <= n; i += 16)
        for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
    float s = 0.f;
    for (int l = 0; l < 16; ++l) s += acc[l];
    for (; i < n; ++i) s += a[i] * b[i];
    return s;
}

// BLAS sgemm (Fortran interface), taken from the BLAS torch itself links (set by rwkvslice_step_set_sgemm):
// the same GEMM torch's F.linear would call for these shapes, without the per-op dispatch around it.
typedef void (*sgemm_t)(const char* ta, const char* tb, const int* m, const int* n, const int* k, const float* alpha,
                        const float* a, const int* lda, const float* b, const int* ldb, const float* beta, float* c,
                        const int* ldc);
sgemm_t g_sgemm = nullptr;

// Y (B x O) = X (B x I) W^T (+ bias) for an nn.Linear weight W (O x I, row-major), all row-major.
void linear(int B, int I, int O, const float* W, const float* x, float* y, const float* bias = nullptr) {
    const float one = 1.f, beta = bias ? 1.f : 0.f;
    if (bias)
        for (int b = 0; b < B; ++b) std::memcpy(y + (long)b * O, bias, sizeof(float) * O);
    // column-major view: Y^T (O x B) = W (col-major I x O, transposed) * X^T (I x B)
    g_sgemm("T", "N", &O, &B, &I, &one, W, &I, x, &I, &beta, y, &O);
}

// Y (B x O) = X (B x I) M (+ bias) for a LoRA factor M stored (I x O) row-major, as the official x070 keeps them.
void matmul(int B, int I, int O, const float* M, const float* x, float* y, const float* bias = nullptr) {
    const float one = 1.f, beta = bias ? 1.f : 0.f;
    if (bias)
        for (int b = 0; b < B; ++b) std::memcpy(y + (long)b * O, bias, sizeof(float) * O);
    // column-major view: Y^T (O x B) = M (col-major O x I) * X^T (I x B)
    g_sgemm("N", "N", &O, &B, &I, &one, M, &O, x, &I, &beta, y, &O);
}

// Parameter table order (ops/rnn_step_cpu.py PARAMS builds it).
enum Param {
    LN1_W, LN1_B, LN2_W, LN2_B, X_R, X_W, X_K, X_V, X_A, X_G, W0, W1, W2, A0, A1, A2, V0, V1, V2, G1, G2,
    K_K, K_A, R_K, W_R, W_K, W_V, W_O, LNX_W, LNX_B, FFN_X_K, FFN_KEY, FFN_VALUE, N_PARAMS
};

}  // namespace

extern "C" {

int rwkvslice_step_n_params() { return N_PARAMS; }

// The BLAS sgemm_ to use (from torch's own libraries); the layer call refuses to run without one.
int rwkvslice_step_set_sgemm(void* fn) {
    g_sgemm = reinterpret_cast<sgemm_t>(fn);
    return 0;
}

// y = x W^T through the same path the layer uses, so the loader can check the BLAS it was handed (its
// integer width and calling convention) against torch before trusting it.
int rwkvslice_step_linear_probe(int B, int I, int O, const float* W, const float* x, float* y) {
    if (!g_sgemm) return 2;
    linear(B, I, O, W, x, y);
    return 0;
}

// One layer for B rows. dims: C, H, N (head size), rank of the w / a / v / g LoRAs, ffn hidden size.
// x_in + dx_in (dx_in may be null) is the layer's input; the outputs x_out + dx_out are the next layer's
// (the channel-mix output is left unadded, so the addition rides in the next call). v_first (B x C) is
// written by layer 0 and read by the others. States: att/ffn shift (B x C) and WKV (B x H x N x N, [value]
// [key]) in and out; the outputs must not overlap the inputs. eps: ln1/ln2 eps, lnx_eps: ln_x's.
int rwkvslice_step_layer(int B, const int* dims, int layer0, float eps, float lnx_eps, const float* const* P,
                         const float* x_in, const float* dx_in, float* v_first, const float* att_in,
                         const float* wkv_in, const float* ffn_in, float* att_out, float* wkv_out, float* ffn_out,
                         float* x_out, float* dx_out) {
    const int C = dims[0], H = dims[1], N = dims[2], dw = dims[3], da = dims[4], dv = dims[5], dg = dims[6];
    const int F = dims[7];
    if (N > 256 || H * N != C) return 1;
    if (!g_sgemm) return 2;
    const long BC = (long)B * C;
    thread_local std::vector<float> scratch;
    const long need = 12 * BC + (long)B * (dw + da + dv + dg) + (long)B * F;
    if ((long)scratch.size() < need) scratch.resize(need);
    float* s = scratch.data();
    float* x = s; s += BC;      // the residual stream
    float* xs = s; s += 6 * BC; // mixed inputs r, w, k, v, a, g
    float* r = s; s += BC;
    float* k = s; s += BC;
    float* v = s; s += BC;
    float* z = s; s += BC;      // decay pre-activation, then reused below
    float* t = s; s += BC;      // scratch row block
    float* lw = s; s += (long)B * dw;
    float* la = s; s += (long)B * da;
    float* lv = s; s += (long)B * dv;
    float* lg = s; s += (long)B * dg;
    float* hidden = s;

    // time mix input: x = x_in + dx_in; h = ln1(x) -> att shift; six token-shift mixes
    for (long i = 0; i < BC; ++i) x[i] = dx_in ? x_in[i] + dx_in[i] : x_in[i];
    for (int b = 0; b < B; ++b) {
        const long o = (long)b * C;
        float* h = att_out + o;
        layer_norm(x + o, P[LN1_W], P[LN1_B], eps, C, h);
        for (int j = 0; j < 6; ++j) {
            const float* m = P[X_R + j];
            float* out = xs + j * BC + o;
            for (int i = 0; i < C; ++i) out[i] = h[i] + (att_in[o + i] - h[i]) * m[i];
        }
    }
    const float *xr = xs, *xw = xs + BC, *xk = xs + 2 * BC, *xv = xs + 3 * BC, *xa = xs + 4 * BC, *xg = xs + 5 * BC;
    linear(B, C, C, P[W_R], xr, r);
    linear(B, C, C, P[W_K], xk, k);
    linear(B, C, C, P[W_V], xv, v);
    matmul(B, C, dw, P[W1], xw, lw);
    for (long i = 0; i < (long)B * dw; ++i) lw[i] = std::tanh(lw[i]);
    matmul(B, dw, C, P[W2], lw, z, P[W0]);
    matmul(B, C, da, P[A1], xa, la);
    float* az = t;
    matmul(B, da, C, P[A2], la, az, P[A0]);
    float* g = xs;  // xr is no longer needed: reuse its rows for the gate
    matmul(B, C, dg, P[G1], xg, lg);
    for (long i = 0; i < (long)B * dg; ++i) lg[i] = sigmoid(lg[i]);
    matmul(B, dg, C, P[G2], lg, g);
    float* vz = nullptr;
    if (layer0) {
        std::memcpy(v_first, v, sizeof(float) * BC);
    } else {
        vz = xs + BC;  // xw is no longer needed
        matmul(B, C, dv, P[V1], xv, lv);
        matmul(B, dv, C, P[V2], lv, vz, P[V0]);
    }

    // WKV per row and head: a, value residual, kk, k update, decay; state update and read-out; ln_x, bonus, gate
    const float neg_exp_half = -std::exp(-0.5f);
    float* gated = xs + 2 * BC;  // xk is no longer needed
    float a[256], vv[256], kk[256], kx[256], decay[256], ka[256], y[256];
    for (int b = 0; b < B; ++b) {
        for (int h = 0; h < H; ++h) {
            const long base = (long)b * C + (long)h * N;
            float norm2 = 0.f;
            for (int i = 0; i < N; ++i) {
                const long c = base + i;
                const int ch = h * N + i;
                a[i] = sigmoid(az[c]);
                vv[i] = vz ? v[c] + sigmoid(vz[c]) * (v_first[c] - v[c]) : v[c];
                kk[i] = k[c] * P[K_K][ch];
                norm2 += kk[i] * kk[i];
                kx[i] = k[c] + k[c] * (a[i] - 1.f) * P[K_A][ch];
                decay[i] = std::exp(sigmoid(z[c]) * neg_exp_half);
            }
            const float inv = 1.f / std::fmax(std::sqrt(norm2), 1e-12f);
            for (int i = 0; i < N; ++i) {
                kk[i] *= inv;
                ka[i] = kk[i] * a[i];
            }
            const long s0 = ((long)b * H + h) * N * N;
            for (int i = 0; i < N; ++i) {  // row i of S: value channel i
                const float* Si = wkv_in + s0 + (long)i * N;
                float* So = wkv_out + s0 + (long)i * N;
                const float s_kk = dot(Si, kk, N);
                for (int j = 0; j < N; ++j) So[j] = Si[j] * decay[j] - s_kk * ka[j] + vv[i] * kx[j];
                y[i] = dot(So, r + base, N);
            }
            float mean = 0.f, var = 0.f, bonus = 0.f;
            for (int i = 0; i < N; ++i) mean += y[i];
            mean /= N;
            for (int i = 0; i < N; ++i) {
                const float d = y[i] - mean;
                var += d * d;
            }
            var /= N;
            const float rstd = 1.f / std::sqrt(var + lnx_eps);
            for (int i = 0; i < N; ++i) bonus += r[base + i] * kx[i] * P[R_K][h * N + i];
            for (int i = 0; i < N; ++i) {
                const int ch = h * N + i;
                const float yn = (y[i] - mean) * rstd * P[LNX_W][ch] + P[LNX_B][ch];
                gated[base + i] = (yn + bonus * vv[i]) * g[base + i];
            }
        }
    }
    float* dx_att = t;
    linear(B, C, C, P[W_O], gated, dx_att);

    // channel mix: x += dx_att; h = ln2(x) -> ffn shift; relu(key(mix))^2 -> value
    float* xk2 = xs + 3 * BC;  // xv is no longer needed
    for (int b = 0; b < B; ++b) {
        const long o = (long)b * C;
        for (int i = 0; i < C; ++i) x_out[o + i] = x[o + i] + dx_att[o + i];
        float* h = ffn_out + o;
        layer_norm(x_out + o, P[LN2_W], P[LN2_B], eps, C, h);
        for (int i = 0; i < C; ++i) xk2[o + i] = h[i] + (ffn_in[o + i] - h[i]) * P[FFN_X_K][i];
    }
    linear(B, C, F, P[FFN_KEY], xk2, hidden);
    for (long i = 0; i < (long)B * F; ++i) {
        const float q = hidden[i] > 0.f ? hidden[i] : 0.f;
        hidden[i] = q * q;
    }
    linear(B, F, C, P[FFN_VALUE], hidden, dx_out);
    return 0;
}

}  // extern "C"
