// WKV-7 CUDA kernels: forward and backstepping backward, bf16 or fp32 inputs, fp32 state.
// One block per (batch, head) on the grid's x dimension (block bb * H + h: y and z are limited to 65,535, x to
// 2^31 - 1), one thread per channel; the arithmetic lives in wkv7_core.cuh.
// No torch headers here: this file compiles on its own with `nvcc -c`.
#include <cuda_runtime.h>

#include "wkv7_core.cuh"
#include "wkv7_launch.h"

namespace {

// The kernels only place the block: the phases and barriers are the shared drivers' (wkv7_core.cuh), the
// same code the host build runs on the CPU.
template <typename Tin, int N>
__global__ void __launch_bounds__(N) wkv7_forward_kernel(const Wkv7ForwardArgs<Tin> p) {
    __shared__ Wkv7ForwardStep<N> step;
    Wkv7DeviceBlock blk;
    wkv7_forward_block<N>(blk, p, blockIdx.x / p.H, blockIdx.x % p.H, step);
}

template <typename Tin, int N>
__global__ void __launch_bounds__(N) wkv7_backward_kernel(const Wkv7BackwardArgs<Tin> p) {
    __shared__ Wkv7BackwardStep<N> step;
    Wkv7DeviceBlock blk;
    wkv7_backward_block<N>(blk, p, blockIdx.x / p.H, blockIdx.x % p.H, step);
}

template <typename Tin, int N>
int launch_forward(const Wkv7ForwardArgs<Tin>& p, cudaStream_t stream) {
    wkv7_forward_kernel<Tin, N><<<dim3(p.B * p.H), dim3(N), 0, stream>>>(p);
    return (int)cudaGetLastError();
}

template <typename Tin, int N>
int launch_backward(const Wkv7BackwardArgs<Tin>& p, cudaStream_t stream) {
    wkv7_backward_kernel<Tin, N><<<dim3(p.B * p.H), dim3(N), 0, stream>>>(p);
    return (int)cudaGetLastError();
}

// Head sizes compiled. 64 is the RWKV-7 head size; the smaller ones serve tiny test models. (128 would need
// 3 x 128 fp32 registers per thread in the backward and spill; use the "torch" backend for it.)
template <typename Tin>
int dispatch_forward(int N, const Wkv7ForwardArgs<Tin>& p, cudaStream_t s) {
    switch (N) {
        case 16: return launch_forward<Tin, 16>(p, s);
        case 32: return launch_forward<Tin, 32>(p, s);
        case 64: return launch_forward<Tin, 64>(p, s);
        default: return WKV7_ERR_HEAD_SIZE;
    }
}

template <typename Tin>
int dispatch_backward(int N, const Wkv7BackwardArgs<Tin>& p, cudaStream_t s) {
    switch (N) {
        case 16: return launch_backward<Tin, 16>(p, s);
        case 32: return launch_backward<Tin, 32>(p, s);
        case 64: return launch_backward<Tin, 64>(p, s);
        default: return WKV7_ERR_HEAD_SIZE;
    }
}

template <typename Tin>
int forward_typed(int B, int T, int H, int N, const void* r, const void* w, const void* k, const void* v,
                  const void* a, const void* b, const float* s0, const bool* resets, const float* reset_state,
                  void* y, float* sT, float* snap, float* sa, cudaStream_t stream) {
    const Wkv7ForwardArgs<Tin> p{B, T, H,
                                 (const Tin*)r, (const Tin*)w, (const Tin*)k, (const Tin*)v, (const Tin*)a,
                                 (const Tin*)b, s0, resets, reset_state, (Tin*)y, sT, snap, sa};
    return dispatch_forward<Tin>(N, p, stream);
}

template <typename Tin>
int backward_typed(int B, int T, int H, int N, const void* r, const void* w, const void* k, const void* v,
                   const void* a, const void* b, const void* dy, const float* dsT, const float* snap,
                   const float* sa, const float* s0, const bool* resets, const float* reset_state, void* dr,
                   void* dw, void* dk, void* dv, void* da, void* db, float* ds0, float* dreset_state,
                   cudaStream_t stream) {
    const Wkv7BackwardArgs<Tin> p{B, T, H,
                                  (const Tin*)r, (const Tin*)w, (const Tin*)k, (const Tin*)v, (const Tin*)a,
                                  (const Tin*)b, (const Tin*)dy, dsT, snap, sa, s0, resets, reset_state,
                                  (Tin*)dr, (Tin*)dw, (Tin*)dk, (Tin*)dv, (Tin*)da, (Tin*)db, ds0, dreset_state};
    return dispatch_backward<Tin>(N, p, stream);
}

}  // namespace

namespace rwkvslice {

int wkv7_cuda_forward(int dtype, int B, int T, int H, int N, const void* r, const void* w, const void* k,
                      const void* v, const void* a, const void* b, const float* s0, const bool* resets,
                      const float* reset_state, void* y, float* sT, float* snap, float* sa, void* stream) {
    if (B == 0 || H == 0) return 0;  // an empty grid is not a valid launch
    cudaStream_t s = (cudaStream_t)stream;
    if (dtype == WKV7_DTYPE_BFLOAT16)
        return forward_typed<__nv_bfloat16>(B, T, H, N, r, w, k, v, a, b, s0, resets, reset_state, y, sT, snap,
                                            sa, s);
    if (dtype == WKV7_DTYPE_FLOAT32)
        return forward_typed<float>(B, T, H, N, r, w, k, v, a, b, s0, resets, reset_state, y, sT, snap, sa, s);
    return WKV7_ERR_DTYPE;
}

int wkv7_cuda_backward(int dtype, int B, int T, int H, int N, const void* r, const void* w, const void* k,
                       const void* v, const void* a, const void* b, const void* dy, const float* dsT,
                       const float* snap, const float* sa, const float* s0, const bool* resets,
                       const float* reset_state, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                       float* ds0, float* dreset_state, void* stream) {
    if (B == 0 || H == 0) return 0;
    cudaStream_t s = (cudaStream_t)stream;
    if (dtype == WKV7_DTYPE_BFLOAT16)
        return backward_typed<__nv_bfloat16>(B, T, H, N, r, w, k, v, a, b, dy, dsT, snap, sa, s0, resets,
                                             reset_state, dr, dw, dk, dv, da, db, ds0, dreset_state, s);
    if (dtype == WKV7_DTYPE_FLOAT32)
        return backward_typed<float>(B, T, H, N, r, w, k, v, a, b, dy, dsT, snap, sa, s0, resets, reset_state,
                                     dr, dw, dk, dv, da, db, ds0, dreset_state, s);
    return WKV7_ERR_DTYPE;
}

int wkv7_cuda_num_chunks(int T) { return wkv7_num_chunks(T); }

const char* wkv7_cuda_error_string(int code) {
    if (code == WKV7_ERR_HEAD_SIZE) return "head size not compiled into the kernel (16, 32 or 64)";
    if (code == WKV7_ERR_DTYPE) return "dtype not supported by the kernel (bfloat16 or float32)";
    return cudaGetErrorString((cudaError_t)code);
}

}  // namespace rwkvslice
