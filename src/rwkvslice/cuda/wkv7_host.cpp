// Host build of the WKV-7 kernels: the arithmetic of wkv7_core.cuh compiled by the C++ compiler, for CPU
// tests. Each CUDA block becomes one (batch, head) iteration and its N threads run one after another
// between what are __syncthreads() barriers on the GPU. fp32 inputs only; loaded with ctypes by
// rwkvslice/cuda/build.py, which builds this file into a shared library on first use.
#include <vector>

#include "wkv7_core.cuh"

namespace {

template <int N>
void forward_head(const Wkv7ForwardArgs<float>& p, int bb, int h) {
    struct Row { float s[N]; };
    std::vector<Row> rows(N);  // rows[i] = the registers of thread i (row i of the state)
    Wkv7ForwardStep<N> step;
    for (int i = 0; i < N; i++) wkv7_forward_begin<N>(p, bb, h, i, rows[i].s);
    for (int t = 0; t < p.T; t++) {
        for (int i = 0; i < N; i++) wkv7_forward_load<N>(p, bb, h, t, i, step);
        for (int i = 0; i < N; i++) wkv7_forward_step<N>(p, bb, h, t, i, step, rows[i].s);
    }
    for (int i = 0; i < N; i++) wkv7_forward_end<N>(p, bb, h, i, rows[i].s);
}

template <int N>
void backward_head(const Wkv7BackwardArgs<float>& p, int bb, int h) {
    std::vector<Wkv7BackwardThread<N>> threads(N);
    Wkv7BackwardStep<N> step;
    for (int i = 0; i < N; i++) wkv7_backward_begin<N>(p, bb, h, i, threads[i]);
    for (int t = p.T - 1; t >= 0; t--) {
        for (int i = 0; i < N; i++) wkv7_backward_load<N>(p, bb, h, t, i, step);
        for (int i = 0; i < N; i++) wkv7_backward_phase1<N>(p, bb, h, t, i, step, threads[i]);
        for (int i = 0; i < N; i++) wkv7_backward_phase2<N>(p, bb, h, t, i, step, threads[i]);
    }
    for (int i = 0; i < N; i++) wkv7_backward_end<N>(p, bb, h, i, threads[i]);
}

template <int N>
void forward_all(const Wkv7ForwardArgs<float>& p) {
    for (int bb = 0; bb < p.B; bb++)
        for (int h = 0; h < p.H; h++) forward_head<N>(p, bb, h);
}

template <int N>
void backward_all(const Wkv7BackwardArgs<float>& p) {
    for (int bb = 0; bb < p.B; bb++)
        for (int h = 0; h < p.H; h++) backward_head<N>(p, bb, h);
}

}  // namespace

extern "C" {

// Returns 0 on success, -1 for a head size that is not compiled (1, 2, 4, ..., 128 are).
int rwkvslice_wkv7_host_forward(int B, int T, int H, int N, const float* r, const float* w, const float* k,
                                const float* v, const float* a, const float* b, const float* s0, float* y,
                                float* sT, float* snap, float* sa) {
    const Wkv7ForwardArgs<float> p{B, T, H, r, w, k, v, a, b, s0, y, sT, snap, sa};
    switch (N) {
        case 1: forward_all<1>(p); return 0;
        case 2: forward_all<2>(p); return 0;
        case 4: forward_all<4>(p); return 0;
        case 8: forward_all<8>(p); return 0;
        case 16: forward_all<16>(p); return 0;
        case 32: forward_all<32>(p); return 0;
        case 64: forward_all<64>(p); return 0;
        case 128: forward_all<128>(p); return 0;
        default: return -1;
    }
}

int rwkvslice_wkv7_host_backward(int B, int T, int H, int N, const float* r, const float* w, const float* k,
                                 const float* v, const float* a, const float* b, const float* dy,
                                 const float* dsT, const float* snap, const float* sa, float* dr, float* dw,
                                 float* dk, float* dv, float* da, float* db, float* ds0) {
    const Wkv7BackwardArgs<float> p{B, T, H, r, w, k, v, a, b, dy, dsT, snap, sa, dr, dw, dk, dv, da, db, ds0};
    switch (N) {
        case 1: backward_all<1>(p); return 0;
        case 2: backward_all<2>(p); return 0;
        case 4: backward_all<4>(p); return 0;
        case 8: backward_all<8>(p); return 0;
        case 16: backward_all<16>(p); return 0;
        case 32: backward_all<32>(p); return 0;
        case 64: backward_all<64>(p); return 0;
        case 128: backward_all<128>(p); return 0;
        default: return -1;
    }
}

// The snapshot interval compiled in, so Python can check its own copy of the constant at load time.
int rwkvslice_wkv7_chunk_len(void) { return WKV7_CHUNK_LEN; }

}  // extern "C"
