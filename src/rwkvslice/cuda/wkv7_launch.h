// Launchers of the WKV-7 CUDA kernels (defined in wkv7_cuda.cu). Plain C++: the torch binding
// (wkv7_op.cpp) includes this without any CUDA header, and wkv7_cuda.cu includes it without any torch header.
//
// Pointers are raw device pointers to contiguous tensors in the layouts described in wkv7_core.cuh.
// s0, dsT and reset_state may be null (zero state); resets null means no resets (then dreset_state is not
// written); snap and sa are null in a forward that no backward will follow.
// `stream` is a cudaStream_t passed as void*.
// Return value: 0 on success, WKV7_ERR_* below, or a cudaError_t code from the launch.
#pragma once

#define WKV7_ERR_HEAD_SIZE (-1)  // head size not compiled (see wkv7_cuda.cu for the list)
#define WKV7_ERR_DTYPE (-2)      // dtype code not supported

#define WKV7_DTYPE_FLOAT32 0
#define WKV7_DTYPE_BFLOAT16 1

namespace rwkvslice {

int wkv7_cuda_forward(int dtype, int B, int T, int H, int N, const void* r, const void* w, const void* k,
                      const void* v, const void* a, const void* b, const float* s0, const bool* resets,
                      const float* reset_state, void* y, float* sT, float* snap, float* sa, void* stream);

int wkv7_cuda_backward(int dtype, int B, int T, int H, int N, const void* r, const void* w, const void* k,
                       const void* v, const void* a, const void* b, const void* dy, const float* dsT,
                       const float* snap, const float* sa, const float* s0, const bool* resets,
                       const float* reset_state, void* dr, void* dw, void* dk, void* dv, void* da, void* db,
                       float* ds0, float* dreset_state, void* stream);

// Number of state snapshots the forward writes for T steps (ceil(T / WKV7_CHUNK_LEN)).
int wkv7_cuda_num_chunks(int T);

// A one-line description of a return code of the launchers above.
const char* wkv7_cuda_error_string(int code);

}  // namespace rwkvslice
