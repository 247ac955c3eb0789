// Torch binding of the WKV-7 CUDA kernels: registers torch.ops.rwkvslice.wkv7_forward / wkv7_backward.
// Allocation and checks live here; the kernels (wkv7_cuda.cu) see only raw pointers.
// The Python caller is rwkvslice/ops/wkv7_cuda.py; a static test checks that its calls match these schemas.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "wkv7_launch.h"

namespace {

int dtype_code(const at::Tensor& x) {
    if (x.scalar_type() == at::kBFloat16) return WKV7_DTYPE_BFLOAT16;
    if (x.scalar_type() == at::kFloat) return WKV7_DTYPE_FLOAT32;
    TORCH_CHECK(false, "rwkvslice wkv7: inputs must be bfloat16 or float32, got ", x.scalar_type());
    return -1;
}

// r, w, k, v, a, b (and dy): same (B, T, H, N) shape, dtype and CUDA device, contiguous.
void check_sequence(const char* name, const at::Tensor& x, const at::Tensor& like) {
    TORCH_CHECK(x.is_cuda(), "rwkvslice wkv7: ", name, " must be a CUDA tensor");
    TORCH_CHECK(x.device() == like.device(), "rwkvslice wkv7: ", name, " is on ", x.device(), ", r on ",
                like.device());
    TORCH_CHECK(x.dim() == 4 && x.sizes() == like.sizes(), "rwkvslice wkv7: ", name, " has shape ", x.sizes(),
                ", expected ", like.sizes());
    TORCH_CHECK(x.scalar_type() == like.scalar_type(), "rwkvslice wkv7: ", name, " is ", x.scalar_type(),
                ", r is ", like.scalar_type());
    TORCH_CHECK(x.is_contiguous(), "rwkvslice wkv7: ", name, " must be contiguous");
}

// fp32 tensors of an exact shape on r's device (states, snapshots, sa).
void check_fp32(const char* name, const at::Tensor& x, at::IntArrayRef shape, const at::Tensor& like) {
    TORCH_CHECK(x.device() == like.device(), "rwkvslice wkv7: ", name, " is on ", x.device(), ", r on ",
                like.device());
    TORCH_CHECK(x.scalar_type() == at::kFloat, "rwkvslice wkv7: ", name, " must be float32, got ",
                x.scalar_type());
    TORCH_CHECK(x.sizes() == shape, "rwkvslice wkv7: ", name, " has shape ", x.sizes(), ", expected ", shape);
    TORCH_CHECK(x.is_contiguous(), "rwkvslice wkv7: ", name, " must be contiguous");
}

// Data pointer of an fp32 buffer, or nullptr for an empty one: an output the kernel skips (the snapshots and sa
// of a forward that no backward will follow; reset_state's gradient without resets).
float* data_or_null(const at::Tensor& x) { return x.numel() ? x.data_ptr<float>() : nullptr; }

// Data pointer of an optional input, nullptr when absent (no resets; zero reset state).
template <typename T>
const T* data_or_null(const std::optional<at::Tensor>& x) {
    return x.has_value() ? x->data_ptr<T>() : nullptr;
}

// resets: (B, T) bool on r's device; reset_state: (B, H, N, N) fp32, used only together with resets.
void check_resets(const std::optional<at::Tensor>& resets, const std::optional<at::Tensor>& reset_state,
                  const at::Tensor& r) {
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    if (resets.has_value()) {
        TORCH_CHECK(resets->device() == r.device(), "rwkvslice wkv7: resets is on ", resets->device(), ", r on ",
                    r.device());
        TORCH_CHECK(resets->scalar_type() == at::kBool, "rwkvslice wkv7: resets must be bool, got ",
                    resets->scalar_type());
        TORCH_CHECK(resets->sizes() == at::IntArrayRef({B, T}), "rwkvslice wkv7: resets has shape ",
                    resets->sizes(), ", expected ", at::IntArrayRef({B, T}));
        TORCH_CHECK(resets->is_contiguous(), "rwkvslice wkv7: resets must be contiguous");
    }
    if (reset_state.has_value()) {
        TORCH_CHECK(resets.has_value(), "rwkvslice wkv7: reset_state given without resets");
        check_fp32("reset_state", *reset_state, {B, H, N, N}, r);
    }
}

void check_launch(const char* op, int rc) {
    TORCH_CHECK(rc == 0, "rwkvslice ", op, ": ", rwkvslice::wkv7_cuda_error_string(rc));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> wkv7_forward(
    const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v, const at::Tensor& a,
    const at::Tensor& b, const at::Tensor& s0, const std::optional<at::Tensor>& resets,
    const std::optional<at::Tensor>& reset_state, bool need_backward) {
    check_sequence("r", r, r);
    check_sequence("w", w, r);
    check_sequence("k", k, r);
    check_sequence("v", v, r);
    check_sequence("a", a, r);
    check_sequence("b", b, r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_fp32("s0", s0, {B, H, N, N}, r);
    check_resets(resets, reset_state, r);
    const c10::cuda::CUDAGuard guard(r.device());
    const auto f32 = r.options().dtype(at::kFloat);
    at::Tensor y = at::empty_like(r);
    at::Tensor sT = at::empty({B, H, N, N}, f32);
    // The backward's buffers (snapshots ~ T/16 states, sa ~ y): empty when nothing requires grad.
    at::Tensor snap = need_backward ? at::empty({B, H, rwkvslice::wkv7_cuda_num_chunks((int)T), N, N}, f32)
                                    : at::empty({0}, f32);
    at::Tensor sa = need_backward ? at::empty({B, T, H, N}, f32) : at::empty({0}, f32);
    check_launch("wkv7_forward",
                 rwkvslice::wkv7_cuda_forward(dtype_code(r), (int)B, (int)T, (int)H, (int)N, r.data_ptr(),
                                              w.data_ptr(), k.data_ptr(), v.data_ptr(), a.data_ptr(), b.data_ptr(),
                                              s0.data_ptr<float>(), data_or_null<bool>(resets),
                                              data_or_null<float>(reset_state), y.data_ptr(), sT.data_ptr<float>(),
                                              data_or_null(snap), data_or_null(sa),
                                              c10::cuda::getCurrentCUDAStream().stream()));
    return {y, sT, snap, sa};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
wkv7_backward(const at::Tensor& r, const at::Tensor& w, const at::Tensor& k, const at::Tensor& v,
              const at::Tensor& a, const at::Tensor& b, const at::Tensor& dy, const at::Tensor& dsT,
              const at::Tensor& snap, const at::Tensor& sa, const at::Tensor& s0,
              const std::optional<at::Tensor>& resets, const std::optional<at::Tensor>& reset_state) {
    check_sequence("r", r, r);
    check_sequence("w", w, r);
    check_sequence("k", k, r);
    check_sequence("v", v, r);
    check_sequence("a", a, r);
    check_sequence("b", b, r);
    check_sequence("dy", dy, r);
    const int64_t B = r.size(0), T = r.size(1), H = r.size(2), N = r.size(3);
    check_fp32("dsT", dsT, {B, H, N, N}, r);
    check_fp32("snap", snap, {B, H, rwkvslice::wkv7_cuda_num_chunks((int)T), N, N}, r);
    check_fp32("sa", sa, {B, T, H, N}, r);
    check_fp32("s0", s0, {B, H, N, N}, r);
    check_resets(resets, reset_state, r);
    const c10::cuda::CUDAGuard guard(r.device());
    const auto f32 = r.options().dtype(at::kFloat);
    at::Tensor dr = at::empty_like(r), dw = at::empty_like(r), dk = at::empty_like(r), dv = at::empty_like(r);
    at::Tensor da = at::empty_like(r), db = at::empty_like(r);
    at::Tensor ds0 = at::empty({B, H, N, N}, f32);
    // Zeroed and accumulated by the kernel at the reset steps; empty without resets.
    at::Tensor dreset_state = resets.has_value() ? at::empty({B, H, N, N}, f32) : at::empty({0}, f32);
    check_launch("wkv7_backward",
                 rwkvslice::wkv7_cuda_backward(
                     dtype_code(r), (int)B, (int)T, (int)H, (int)N, r.data_ptr(), w.data_ptr(), k.data_ptr(),
                     v.data_ptr(), a.data_ptr(), b.data_ptr(), dy.data_ptr(), dsT.data_ptr<float>(),
                     snap.data_ptr<float>(), sa.data_ptr<float>(), s0.data_ptr<float>(),
                     data_or_null<bool>(resets), data_or_null<float>(reset_state), dr.data_ptr(), dw.data_ptr(),
                     dk.data_ptr(), dv.data_ptr(), da.data_ptr(), db.data_ptr(), ds0.data_ptr<float>(),
                     data_or_null(dreset_state), c10::cuda::getCurrentCUDAStream().stream()));
    return {dr, dw, dk, dv, da, db, ds0, dreset_state};
}

}  // namespace

// A fragment, so another rwkvslice extension may add ops to the same namespace.
TORCH_LIBRARY_FRAGMENT(rwkvslice, m) {
    m.def("wkv7_forward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor s0, Tensor? resets,"
          " Tensor? reset_state, bool need_backward) -> (Tensor y, Tensor sT, Tensor snap, Tensor sa)");
    m.def("wkv7_backward(Tensor r, Tensor w, Tensor k, Tensor v, Tensor a, Tensor b, Tensor dy, Tensor dsT,"
          " Tensor snap, Tensor sa, Tensor s0, Tensor? resets, Tensor? reset_state) -> (Tensor dr, Tensor dw,"
          " Tensor dk, Tensor dv, Tensor da, Tensor db, Tensor ds0, Tensor dreset_state)");
}

TORCH_LIBRARY_IMPL(rwkvslice, CUDA, m) {
    m.impl("wkv7_forward", &wkv7_forward);
    m.impl("wkv7_backward", &wkv7_backward);
}
