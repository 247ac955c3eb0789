// Fused CPU kernels for RWKV-7 RNN-mode generation (one token per sequence, fp32, contiguous rows).
//
// Generation on a CPU is bound by reading the weights, which torch's GEMVs (MKL/oneDNN) already do at
// memory speed. What is left is everything between the GEMVs: about forty small ops per layer, each a
// few microseconds once the weights have pushed their operands out of the cache. These kernels do that
// work in four calls per layer; the GEMVs stay in torch. The maths is TimeMix.step / ChannelMix.step /
// Block.step in model/rwkv7.py, which stays the reference (tests compare the two).
//
// Plain C++17, no torch headers: built by cuda/build.py with the host C++ compiler and loaded with ctypes.
// No fast-math: IEEE float arithmetic in the same order of operations as the eager path where it matters.

#include <cmath>

namespace {

// y = LayerNorm(x) over n values (biased variance, eps inside the square root), as torch.layer_norm.
inline void layer_norm(const float* x, const float* w, const float* b, float eps, int n, float* y) {
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

}  // namespace

extern "C" {

// Start of a block's time mix, per row b of B:
//   x_out = x + dx (dx may be null: x_out = x)                         the residual stream
//   h = LayerNorm(x_out; ln_w, ln_b)        -> shift_out (the next att shift state)
//   xs[j] = h + (prev - h) * mix_j           j = r, w, k, v, a, g    (6, B, C)
int rwkvslice_step_att_in(int B, int C, const float* x, const float* dx, float* x_out, const float* ln_w,
                          const float* ln_b, float eps, const float* prev, const float* mix_r,
                          const float* mix_w, const float* mix_k, const float* mix_v, const float* mix_a,
                          const float* mix_g, float* shift_out, float* xs) {
    const float* mix[6] = {mix_r, mix_w, mix_k, mix_v, mix_a, mix_g};
    for (int b = 0; b < B; ++b) {
        const float* xb = x + (long)b * C;
        float* xo = x_out + (long)b * C;
        for (int i = 0; i < C; ++i) xo[i] = dx ? xb[i] + dx[(long)b * C + i] : xb[i];
        float* h = shift_out + (long)b * C;
        layer_norm(xo, ln_w, ln_b, eps, C, h);
        const float* p = prev + (long)b * C;
        for (int j = 0; j < 6; ++j) {
            float* out = xs + ((long)j * B + b) * C;
            const float* m = mix[j];
            for (int i = 0; i < C; ++i) out[i] = h[i] + (p[i] - h[i]) * m[i];
        }
    }
    return 0;
}

// The WKV part of the time mix, per row b and head h (N channels each, state S in [value][key] layout):
//   a = sigmoid(az); v = lerp(v, v_first, sigmoid(vz)) unless vz is null (layer 0)
//   kk = normalize(k * k_k) per head; k = k * (1 + (a - 1) * k_a); decay = exp(-e^-0.5 * sigmoid(z))
//   S' = S diag(decay) - (S kk)(kk a)^T + v k^T;  y = S' r
//   out = (GroupNorm_h(y; lnx_w, lnx_b) + (sum_i r_i k_i r_k_i) v) * g
// S_out must not overlap S_in. Scratch: none (N <= 256).
int rwkvslice_step_att_wkv(int B, int H, int N, const float* r, const float* z, const float* k_in,
                           const float* v_in, const float* v_first, const float* vz, const float* az,
                           const float* g, const float* k_k, const float* k_a, const float* r_k,
                           const float* lnx_w, const float* lnx_b, float lnx_eps, const float* S_in,
                           float* S_out, float* out) {
    if (N > 256) return 1;
    const int C = H * N;
    const float neg_exp_half = -std::exp(-0.5f);
    float a[256], v[256], kk[256], k[256], decay[256], ka[256], y[256];
    for (int b = 0; b < B; ++b) {
        for (int h = 0; h < H; ++h) {
            const long base = (long)b * C + (long)h * N;
            float norm2 = 0.f;
            for (int i = 0; i < N; ++i) {
                const long c = base + i;
                const int ch = h * N + i;
                a[i] = sigmoid(az[c]);
                v[i] = vz ? v_in[c] + sigmoid(vz[c]) * (v_first[c] - v_in[c]) : v_in[c];
                kk[i] = k_in[c] * k_k[ch];
                norm2 += kk[i] * kk[i];
                k[i] = k_in[c] + k_in[c] * (a[i] - 1.f) * k_a[ch];
                decay[i] = std::exp(sigmoid(z[c]) * neg_exp_half);
            }
            const float inv = 1.f / std::fmax(std::sqrt(norm2), 1e-12f);
            for (int i = 0; i < N; ++i) {
                kk[i] *= inv;
                ka[i] = kk[i] * a[i];
            }
            const long s0 = ((long)b * H + h) * N * N;
            for (int i = 0; i < N; ++i) {  // row i of S: value channel i
                const float* Si = S_in + s0 + (long)i * N;
                float* So = S_out + s0 + (long)i * N;
                float s_kk = 0.f;
                for (int j = 0; j < N; ++j) s_kk += Si[j] * kk[j];
                float acc = 0.f;
                for (int j = 0; j < N; ++j) {
                    const float s = Si[j] * decay[j] - s_kk * ka[j] + v[i] * k[j];
                    So[j] = s;
                    acc += s * r[base + j];
                }
                y[i] = acc;
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
            for (int i = 0; i < N; ++i) bonus += r[base + i] * k[i] * r_k[h * N + i];
            for (int i = 0; i < N; ++i) {
                const int ch = h * N + i;
                const float yn = (y[i] - mean) * rstd * lnx_w[ch] + lnx_b[ch];
                out[base + i] = (yn + bonus * v[i]) * g[base + i];
            }
        }
    }
    return 0;
}

// Between the time mix and the channel mix, per row b:
//   x_out = x + dx;  h = LayerNorm(x_out; ln_w, ln_b) -> shift_out;  xk = h + (prev - h) * x_k
int rwkvslice_step_ffn_in(int B, int C, const float* x, const float* dx, float* x_out, const float* ln_w,
                          const float* ln_b, float eps, const float* prev, const float* x_k, float* shift_out,
                          float* xk) {
    for (int b = 0; b < B; ++b) {
        const long o = (long)b * C;
        for (int i = 0; i < C; ++i) x_out[o + i] = x[o + i] + dx[o + i];
        layer_norm(x_out + o, ln_w, ln_b, eps, C, shift_out + o);
        for (int i = 0; i < C; ++i) {
            const float h = shift_out[o + i];
            xk[o + i] = h + (prev[o + i] - h) * x_k[i];
        }
    }
    return 0;
}

// relu(x)^2 in place over n values (the channel mix's activation).
int rwkvslice_step_relu_square(long n, float* x) {
    for (long i = 0; i < n; ++i) {
        const float t = x[i] > 0.f ? x[i] : 0.f;
        x[i] = t * t;
    }
    return 0;
}

}  // extern "C"
