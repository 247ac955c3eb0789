// Host build of the WKV-7 kernels: the drivers of wkv7_core.cuh compiled by the C++ compiler, for CPU tests.
// Each CUDA block becomes one (batch, head) iteration run by Wkv7HostBlock: its N threads run one after
// another inside each phase of the driver, the end of a phase standing where __syncthreads() is on the GPU.
// fp32 inputs only; loaded with ctypes by rwkvslice/cuda/build.py, which builds this file on first use.
#include "wkv7_core.cuh"

namespace {

template <int N>
void forward_all(const Wkv7ForwardArgs<float>& p) {
    Wkv7HostBlock<N> blk;
    Wkv7ForwardStep<N> step;  // __shared__ on the GPU
    for (int bb = 0; bb < p.B; bb++)
        for (int h = 0; h < p.H; h++) wkv7_forward_block<N>(blk, p, bb, h, step);
}

template <int N>
void backward_all(const Wkv7BackwardArgs<float>& p) {
    Wkv7HostBlock<N> blk;
    Wkv7BackwardStep<N> step;
    for (int bb = 0; bb < p.B; bb++)
        for (int h = 0; h < p.H; h++) wkv7_backward_block<N>(blk, p, bb, h, step);
}

}  // namespace

extern "C" {

// Returns 0 on success, -1 for a head size that is not compiled (1, 2, 4, ..., 128 are).
// resets, reset_state, snap and sa may be null (no resets; zero reset state; a forward no backward follows).
int rwkvslice_wkv7_host_forward(int B, int T, int H, int N, const float* r, const float* w, const float* k,
                                const float* v, const float* a, const float* b, const float* s0,
                                const bool* resets, const float* reset_state, float* y, float* sT, float* snap,
                                float* sa) {
    const Wkv7ForwardArgs<float> p{B, T, H, r, w, k, v, a, b, s0, resets, reset_state, y, sT, snap, sa};
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

// dreset_state is written (the gradient of reset_state) when resets is not null.
int rwkvslice_wkv7_host_backward(int B, int T, int H, int N, const float* r, const float* w, const float* k,
                                 const float* v, const float* a, const float* b, const float* dy,
                                 const float* dsT, const float* snap, const float* sa, const float* s0,
                                 const bool* resets, const float* reset_state, float* dr, float* dw, float* dk,
                                 float* dv, float* da, float* db, float* ds0, float* dreset_state) {
    const Wkv7BackwardArgs<float> p{B, T, H, r, w, k, v, a, b, dy, dsT, snap, sa, s0, resets, reset_state,
                                    dr, dw, dk, dv, da, db, ds0, dreset_state};
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
