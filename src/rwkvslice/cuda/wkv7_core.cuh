// WKV-7 per-head arithmetic and the order of its phases, written once and compiled twice:
//   * by nvcc into the CUDA kernels (wkv7_cuda.cu): one thread block per (batch, head), one thread per row;
//   * by the host C++ compiler into wkv7_host.cpp, which runs the "threads" of a block one after another,
//     phase by phase, so CPU-only CI checks the kernel's own arithmetic and barrier placement against the
//     fp64 reference. Both call the same drivers (wkv7_forward_block / wkv7_backward_block, at the end), with
//     the barrier as a policy: __syncthreads() on the GPU, the end of a loop over the threads on the host.
//
// Recurrence (per batch and head; S is N x N in the official [value i][key j] layout):
//   decay_t = exp(-exp(w_t))
//   sa_t    = S_{t-1} a_t
//   S_t     = S_{t-1} diag(decay_t) + sa_t b_t^T + v_t k_t^T
//   y_t     = S_t r_t
//
// Backward ("backstepping", the design of the official RWKV-LM wkv7 training kernel): the forward saves
// sa_t and an fp32 snapshot of the state at the end of every chunk of WKV7_CHUNK_LEN steps (the last,
// possibly partial, chunk ends at T-1, so its snapshot is the final state and any T works without padding).
// Going backwards in time, the state before step t is rebuilt from the state after it by inverting the update:
//   S_{t-1} = (S_t - v_t k_t^T - sa_t b_t^T) diag(1/decay_t)
// Each inversion multiplies the rounding error of S by 1/decay, and up to WKV7_CHUNK_LEN inversions happen
// after an exact snapshot (the last one yields S_{t-1} at the chunk's first step). LIMIT: this needs decay
// bounded away from 0. The RWKV-7 model soft-clamps w <= -0.5, i.e. decay >= exp(-exp(-0.5)) = 0.545, so
// the growth is at most 0.545^-16 ~ 1.6e4 times fp32 epsilon. Measured against an fp64 reference (host build,
// relative norm error of the gradients of r, w, a; the other gradients stay ~2e-7):
//   decay = 0.545 at every step (the clamp's floor)            ~2e-4
//   decays like the model's (w = -softplus(-x) - 0.5, x~N(0,1)) ~3e-6
//   decay = 0.37 everywhere (w = 0, outside the model's range) ~7e-2
// So decays near 0 (w >> 0) make the backward useless, and decay == 0 (w = +inf) divides by zero.
//
// Resets (packed sequences): where resets[b][t] is true, the state before step t is replaced by reset_state[b]
// (zeros when absent), so S_{t-1} above reads reset_state there. Its gradient is the sum, over the reset
// steps, of the gradient reaching the state entering them; the state carried into a reset gets none. The
// backward cannot backstep across a reset (the reset erased S_{t-1}), so at a reset inside a chunk it replays
// the chunk forward from the chunk's start (previous snapshot or s0) with the saved sa: at most
// WKV7_CHUNK_LEN - 1 extra steps per reset, no extra memory.
//
// Thread roles: in the forward, thread i owns row i of S (value index i). In the backward, thread i owns
// column i of S (key index i) for the rebuilt state, plus row i and column i of dS, so every sum the
// gradients need runs over a thread's own registers and no cross-thread reduction is needed.
//
// Tensor layouts (all contiguous, element index computed by the helpers below):
//   r, w, k, v, a, b, y, dy and all input gradients: (B, T, H, N), the same as the op's Python inputs;
//   sa: (B, T, H, N) fp32;
//   s0, sT, dsT, ds0, reset_state, dreset_state: (B, H, N, N) fp32, [value][key];
//   resets: (B, T) bool;
//   snapshots: (B, H, ceil(T / WKV7_CHUNK_LEN), N, N) fp32, stored TRANSPOSED as [key][value] so that the
//   forward's writes (thread = value row) are coalesced.
#pragma once

#include <cmath>  // std::exp for the host side (nvcc also compiles the host half of each function)
#if !defined(__CUDACC__)
#include <vector>  // Wkv7HostBlock
#endif

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#define WKV7_HD __host__ __device__ __forceinline__
#define WKV7_UNROLL _Pragma("unroll")
#else
#define WKV7_HD inline
#define WKV7_UNROLL
#endif

// Time steps between two state snapshots. ops/wkv7_cuda.py has CHUNK_LEN with the same value (a static
// test checks it); the host wrapper allocates the snapshot tensor from it.
#define WKV7_CHUNK_LEN 16

typedef long long wkv7_index;

// ---- element access ----------------------------------------------------------------------------------

WKV7_HD float wkv7_to_float(float x) { return x; }
WKV7_HD void wkv7_store(float* p, float x) { *p = x; }
#if defined(__CUDACC__)
WKV7_HD float wkv7_to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
WKV7_HD void wkv7_store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
#endif

WKV7_HD float wkv7_exp(float x) {
#if defined(__CUDA_ARCH__)
    return __expf(x);
#else
    return std::exp(x);
#endif
}

// (B, T, H, N) element of batch bb, step t, head h, channel i.
WKV7_HD wkv7_index wkv7_token_index(int T, int H, int N, int bb, int t, int h, int i) {
    return (((wkv7_index)bb * T + t) * H + h) * N + i;
}

// Start of the (N, N) matrix of batch bb, head h in a (B, H, N, N) state tensor.
WKV7_HD wkv7_index wkv7_state_base(int H, int N, int bb, int h) {
    return ((wkv7_index)bb * H + h) * N * N;
}

WKV7_HD int wkv7_num_chunks(int T) { return (T + WKV7_CHUNK_LEN - 1) / WKV7_CHUNK_LEN; }

// Start of snapshot c (the state after step min((c+1)*CHUNK, T) - 1) of batch bb, head h.
WKV7_HD wkv7_index wkv7_snapshot_base(int T, int H, int N, int bb, int h, int c) {
    return (((wkv7_index)bb * H + h) * wkv7_num_chunks(T) + c) * N * N;
}

// True when step t ends a chunk: the forward writes a snapshot after it, the backward reloads one.
WKV7_HD bool wkv7_is_chunk_end(int T, int t) { return (t + 1) % WKV7_CHUNK_LEN == 0 || t == T - 1; }

// ---- arguments ---------------------------------------------------------------------------------------

template <typename Tin>
struct Wkv7ForwardArgs {
    int B, T, H;
    const Tin *r, *w, *k, *v, *a, *b;
    const float* s0;           // (B, H, N, N) or nullptr for a zero initial state
    const bool* resets;        // (B, T) or nullptr: where true, the state before step t is reset_state
    const float* reset_state;  // (B, H, N, N) or nullptr for zeros
    Tin* y;
    float* sT;                 // final state (B, H, N, N)
    float* snap;               // snapshots, see the layout above; nullptr when no backward will run (not written)
    float* sa;                 // (B, T, H, N); nullptr together with snap
};

template <typename Tin>
struct Wkv7BackwardArgs {
    int B, T, H;
    const Tin *r, *w, *k, *v, *a, *b, *dy;
    const float* dsT;  // gradient of the final state, or nullptr for zero
    const float* snap;
    const float* sa;
    const float* s0;           // the forward's initial state (or nullptr): the replay after a reset starts there
    const bool* resets;        // as in the forward
    const float* reset_state;
    Tin *dr, *dw, *dk, *dv, *da, *db;
    float* ds0;           // gradient of the initial state (B, H, N, N)
    float* dreset_state;  // gradient of reset_state (B, H, N, N), or nullptr; not nullptr whenever resets is not
};

// The vectors of one time step, shared by the threads of a block (__shared__ on the GPU).
template <int N>
struct Wkv7ForwardStep {
    float r[N], decay[N], k[N], v[N], a[N], b[N];
};

template <int N>
struct Wkv7BackwardStep {
    float r[N], decay[N], k[N], v[N], a[N], b[N], dy[N], sa[N];
    float ddecay_dw[N];  // d decay / dw = -exp(w) decay, since decay = exp(-exp(w))
    float dsa[N];        // dL/d(sa_t), written in phase 1, read in phase 2
};

// resets[bb][t], false without resets. Every thread of a block reads the same flag, so branches on it are uniform.
WKV7_HD bool wkv7_is_reset(const bool* resets, int T, int bb, int t) {
    return resets != nullptr && resets[(wkv7_index)bb * T + t];
}

// ---- forward: per-thread bodies ----------------------------------------------------------------------

// Registers of forward thread i.
template <int N>
struct Wkv7ForwardThread {
    float state[N];  // state[j] = S[i][j]: row i of the state
};

// Thread i: load row i of the initial state.
template <int N, typename Tin>
WKV7_HD void wkv7_forward_begin(const Wkv7ForwardArgs<Tin>& p, int bb, int h, int i, Wkv7ForwardThread<N>& f) {
    const wkv7_index base = wkv7_state_base(p.H, N, bb, h) + (wkv7_index)i * N;
    WKV7_UNROLL
    for (int j = 0; j < N; j++) f.state[j] = p.s0 ? p.s0[base + j] : 0.0f;
}

// Thread i: load channel i of step t into the shared step vectors.
template <int N, typename Tin>
WKV7_HD void wkv7_forward_load(const Wkv7ForwardArgs<Tin>& p, int bb, int h, int t, int i,
                               Wkv7ForwardStep<N>& s) {
    const wkv7_index x = wkv7_token_index(p.T, p.H, N, bb, t, h, i);
    s.r[i] = wkv7_to_float(p.r[x]);
    s.decay[i] = wkv7_exp(-wkv7_exp(wkv7_to_float(p.w[x])));
    s.k[i] = wkv7_to_float(p.k[x]);
    s.v[i] = wkv7_to_float(p.v[x]);
    s.a[i] = wkv7_to_float(p.a[x]);
    s.b[i] = wkv7_to_float(p.b[x]);
}

// Thread i: advance row i of the state by step t (after replacing it by reset_state's row at a reset); write
// y, sa and, at a chunk end, the snapshot row (those two only when a backward will run).
template <int N, typename Tin>
WKV7_HD void wkv7_forward_step(const Wkv7ForwardArgs<Tin>& p, int bb, int h, int t, int i,
                               const Wkv7ForwardStep<N>& s, Wkv7ForwardThread<N>& f) {
    if (wkv7_is_reset(p.resets, p.T, bb, t)) {
        const wkv7_index base = wkv7_state_base(p.H, N, bb, h) + (wkv7_index)i * N;
        WKV7_UNROLL
        for (int j = 0; j < N; j++) f.state[j] = p.reset_state ? p.reset_state[base + j] : 0.0f;
    }
    float sa = 0.0f;
    WKV7_UNROLL
    for (int j = 0; j < N; j++) sa += f.state[j] * s.a[j];
    const float vi = s.v[i];
    float y = 0.0f;
    WKV7_UNROLL
    for (int j = 0; j < N; j++) {
        f.state[j] = f.state[j] * s.decay[j] + sa * s.b[j] + vi * s.k[j];
        y += f.state[j] * s.r[j];
    }
    const wkv7_index x = wkv7_token_index(p.T, p.H, N, bb, t, h, i);
    wkv7_store(p.y + x, y);
    if (p.sa) p.sa[x] = sa;
    if (p.snap && wkv7_is_chunk_end(p.T, t)) {
        const wkv7_index base = wkv7_snapshot_base(p.T, p.H, N, bb, h, t / WKV7_CHUNK_LEN) + i;
        WKV7_UNROLL
        for (int j = 0; j < N; j++) p.snap[base + (wkv7_index)j * N] = f.state[j];  // [key j][value i]
    }
}

// Thread i: write row i of the final state.
template <int N, typename Tin>
WKV7_HD void wkv7_forward_end(const Wkv7ForwardArgs<Tin>& p, int bb, int h, int i, const Wkv7ForwardThread<N>& f) {
    const wkv7_index base = wkv7_state_base(p.H, N, bb, h) + (wkv7_index)i * N;
    WKV7_UNROLL
    for (int j = 0; j < N; j++) p.sT[base + j] = f.state[j];
}

// ---- backward: per-thread bodies ---------------------------------------------------------------------

// Registers of backward thread i.
template <int N>
struct Wkv7BackwardThread {
    float stateT[N];   // stateT[j] = S[j][i]: column i of the state (after step t, then rebuilt before it)
    float dstate[N];   // dstate[j] = dS[i][j]: row i of the state gradient
    float dstateT[N];  // dstateT[j] = dS[j][i]: column i of the state gradient
};

// Thread i: start from the gradient of the final state; zero row i of reset_state's gradient.
template <int N, typename Tin>
WKV7_HD void wkv7_backward_begin(const Wkv7BackwardArgs<Tin>& p, int bb, int h, int i, Wkv7BackwardThread<N>& g) {
    const wkv7_index base = wkv7_state_base(p.H, N, bb, h);
    WKV7_UNROLL
    for (int j = 0; j < N; j++) {
        g.stateT[j] = 0.0f;
        g.dstate[j] = p.dsT ? p.dsT[base + (wkv7_index)i * N + j] : 0.0f;
        g.dstateT[j] = p.dsT ? p.dsT[base + (wkv7_index)j * N + i] : 0.0f;
    }
    if (p.dreset_state) {  // given with resets (even for T = 0, where no step runs)
        for (int j = 0; j < N; j++) p.dreset_state[base + (wkv7_index)i * N + j] = 0.0f;
    }
}

// Thread i: load channel i of step t into the shared step vectors.
template <int N, typename Tin>
WKV7_HD void wkv7_backward_load(const Wkv7BackwardArgs<Tin>& p, int bb, int h, int t, int i,
                                Wkv7BackwardStep<N>& s) {
    const wkv7_index x = wkv7_token_index(p.T, p.H, N, bb, t, h, i);
    const float exp_w = wkv7_exp(wkv7_to_float(p.w[x]));
    const float decay = wkv7_exp(-exp_w);
    s.r[i] = wkv7_to_float(p.r[x]);
    s.decay[i] = decay;
    s.ddecay_dw[i] = -exp_w * decay;
    s.k[i] = wkv7_to_float(p.k[x]);
    s.v[i] = wkv7_to_float(p.v[x]);
    s.a[i] = wkv7_to_float(p.a[x]);
    s.b[i] = wkv7_to_float(p.b[x]);
    s.dy[i] = wkv7_to_float(p.dy[x]);
    s.sa[i] = p.sa[x];
}

// Thread i, phase 1 of step t (dS holds dL/dS_t excluding y_t's contribution on entry):
// reload the exact state at a chunk end, add y_t's gradient, produce dr, dw, dk, dv, db, rebuild S_{t-1}
// and publish dsa_i = (dS b)_i for phase 2.
template <int N, typename Tin>
WKV7_HD void wkv7_backward_phase1(const Wkv7BackwardArgs<Tin>& p, int bb, int h, int t, int i,
                                  Wkv7BackwardStep<N>& s, Wkv7BackwardThread<N>& g) {
    if (wkv7_is_chunk_end(p.T, t)) {
        const wkv7_index base = wkv7_snapshot_base(p.T, p.H, N, bb, h, t / WKV7_CHUNK_LEN) + (wkv7_index)i * N;
        WKV7_UNROLL
        for (int j = 0; j < N; j++) g.stateT[j] = p.snap[base + j];
    }
    const float ri = s.r[i], dyi = s.dy[i], ki = s.k[i], bi = s.b[i], di = s.decay[i];

    // One pass over j (each shared value is read once):
    //   y_t = S_t r_t:              dr_i = sum_j S_t[j][i] dy_j,  dS_t += dy r^T;
    //   rebuild column i of S_{t-1} from S_t[j][i] = S_{t-1}[j][i] decay_i + sa_j b_i + v_j k_i;
    //   S_t = S_{t-1} diag(decay) + sa b^T + v k^T:
    //     d decay_i = sum_j dS[j][i] S_{t-1}[j][i],  dk_i = sum_j dS[j][i] v_j,  db_i = sum_j dS[j][i] sa_j,
    //     dv_i = sum_j dS[i][j] k_j,  dsa_i = sum_j dS[i][j] b_j.
    float dr = 0.0f, ddecay = 0.0f, dk = 0.0f, db = 0.0f, dv = 0.0f, dsa = 0.0f;
    WKV7_UNROLL
    for (int j = 0; j < N; j++) {
        const float dyj = s.dy[j], vj = s.v[j], saj = s.sa[j];
        dr += g.stateT[j] * dyj;
        g.dstate[j] += dyi * s.r[j];
        g.dstateT[j] += dyj * ri;
        g.stateT[j] = (g.stateT[j] - vj * ki - saj * bi) / di;
        ddecay += g.dstateT[j] * g.stateT[j];
        dk += g.dstateT[j] * vj;
        db += g.dstateT[j] * saj;
        dv += g.dstate[j] * s.k[j];
        dsa += g.dstate[j] * s.b[j];
    }
    s.dsa[i] = dsa;

    const wkv7_index x = wkv7_token_index(p.T, p.H, N, bb, t, h, i);
    wkv7_store(p.dr + x, dr);
    wkv7_store(p.dw + x, ddecay * s.ddecay_dw[i]);
    wkv7_store(p.dk + x, dk);
    wkv7_store(p.dv + x, dv);
    wkv7_store(p.db + x, db);
}

// Thread i, phase 2 of step t (after every thread's dsa is published): da through sa_t = S_{t-1} a_t, and
// dS_{t-1} = dS_t diag(decay) + dsa a^T.
template <int N, typename Tin>
WKV7_HD void wkv7_backward_phase2(const Wkv7BackwardArgs<Tin>& p, int bb, int h, int t, int i,
                                  const Wkv7BackwardStep<N>& s, Wkv7BackwardThread<N>& g) {
    const float ai = s.a[i], di = s.decay[i], dsai = s.dsa[i];
    float da = 0.0f;
    WKV7_UNROLL
    for (int j = 0; j < N; j++) {
        da += g.stateT[j] * s.dsa[j];  // sum_j S_{t-1}[j][i] dsa_j
        g.dstate[j] = g.dstate[j] * s.decay[j] + dsai * s.a[j];
        g.dstateT[j] = g.dstateT[j] * di + s.dsa[j] * ai;
    }
    wkv7_store(p.da + wkv7_token_index(p.T, p.H, N, bb, t, h, i), da);
}

// Thread i, after phase 2 of a step t with resets[bb][t] (a phase of its own, only at resets: merged into
// phase 2 it made ptxas spill more in the common path). The state entering step t was reset_state, so the
// gradient just computed (dS_{t-1}) is reset_state's, and the state carried out of step t - 1 gets none.
// Backstepping cannot rebuild that carried state (the reset erased it), so unless step t - 1 ends a chunk (then
// its snapshot is reloaded anyway) the driver replays the chunk forward from its start up to step t - 1:
// here, load the replay's start, column i of the state before the chunk (the previous snapshot, or s0).
template <int N, typename Tin>
WKV7_HD void wkv7_backward_reset(const Wkv7BackwardArgs<Tin>& p, int bb, int h, int t, int i,
                                 Wkv7BackwardThread<N>& g) {
    const wkv7_index row = wkv7_state_base(p.H, N, bb, h) + (wkv7_index)i * N;
    WKV7_UNROLL  // constant indices keep dstate in registers
    for (int j = 0; j < N; j++) p.dreset_state[row + j] += g.dstate[j];
    WKV7_UNROLL
    for (int j = 0; j < N; j++) g.dstate[j] = g.dstateT[j] = 0.0f;
    const int chunk = t / WKV7_CHUNK_LEN;
    if (t % WKV7_CHUNK_LEN == 0) return;  // step t - 1 (if any) ends a chunk: nothing to replay
    if (chunk > 0) {
        const wkv7_index base = wkv7_snapshot_base(p.T, p.H, N, bb, h, chunk - 1) + (wkv7_index)i * N;
        WKV7_UNROLL
        for (int j = 0; j < N; j++) g.stateT[j] = p.snap[base + j];
    } else {
        const wkv7_index base = wkv7_state_base(p.H, N, bb, h) + i;
        WKV7_UNROLL
        for (int j = 0; j < N; j++) g.stateT[j] = p.s0 ? p.s0[base + (wkv7_index)j * N] : 0.0f;
    }
}

// Thread i: replay step u forward on column i of the state (its step vectors loaded), with the sa the forward
// saved, so no reduction across threads is needed: S_u[j][i] = S_{u-1}[j][i] decay_i + sa_j b_i + v_j k_i.
template <int N, typename Tin>
WKV7_HD void wkv7_backward_replay(const Wkv7BackwardArgs<Tin>& p, int bb, int h, int u, int i,
                                  const Wkv7BackwardStep<N>& s, Wkv7BackwardThread<N>& g) {
    if (wkv7_is_reset(p.resets, p.T, bb, u)) {
        const wkv7_index base = wkv7_state_base(p.H, N, bb, h) + i;
        WKV7_UNROLL
        for (int j = 0; j < N; j++) g.stateT[j] = p.reset_state ? p.reset_state[base + (wkv7_index)j * N] : 0.0f;
    }
    const float di = s.decay[i], bi = s.b[i], ki = s.k[i];
    WKV7_UNROLL
    for (int j = 0; j < N; j++) g.stateT[j] = g.stateT[j] * di + s.sa[j] * bi + s.v[j] * ki;
}

// Thread i: write row i of the initial state's gradient.
template <int N, typename Tin>
WKV7_HD void wkv7_backward_end(const Wkv7BackwardArgs<Tin>& p, int bb, int h, int i, const Wkv7BackwardThread<N>& g) {
    const wkv7_index base = wkv7_state_base(p.H, N, bb, h) + (wkv7_index)i * N;
    WKV7_UNROLL
    for (int j = 0; j < N; j++) p.ds0[base + j] = g.dstate[j];
}

// ---- the drivers: one block's phases, shared by the GPU kernels and the host build -----------------------
//
// A block runs a sequence of phases. `blk.phase(body)` runs body(i) for every thread i of the block, then
// a barrier: on the GPU (Wkv7DeviceBlock) thread i is threadIdx.x and the barrier is __syncthreads(); on the
// host (Wkv7HostBlock) the N bodies run one after another, so the phase's end is the barrier. A body may
// read what other threads wrote to `step` (shared memory on the GPU) only in an EARLIER phase: two phases
// merged into one would race on the GPU and, on the host, hand thread i a mix of old and new values, which the
// CPU tests catch (tests/runtime/test_wkv7_host.py merges each pair of adjacent phases below and checks that).
// `typename Block::template PerThread<T>` is one T per thread: registers on the GPU, an array on the host.

template <int N, typename Tin, typename Block>
WKV7_HD void wkv7_forward_block(Block& blk, const Wkv7ForwardArgs<Tin>& p, int bb, int h,
                                Wkv7ForwardStep<N>& step) {
    typename Block::template PerThread<Wkv7ForwardThread<N>> th;
    blk.phase([&](int i) { wkv7_forward_begin<N>(p, bb, h, i, th[i]); });
    for (int t = 0; t < p.T; t++) {
        blk.phase([&](int i) { wkv7_forward_load<N>(p, bb, h, t, i, step); });
        blk.phase([&](int i) { wkv7_forward_step<N>(p, bb, h, t, i, step, th[i]); });
    }
    blk.phase([&](int i) { wkv7_forward_end<N>(p, bb, h, i, th[i]); });
}

template <int N, typename Tin, typename Block>
WKV7_HD void wkv7_backward_block(Block& blk, const Wkv7BackwardArgs<Tin>& p, int bb, int h,
                                 Wkv7BackwardStep<N>& step) {
    typename Block::template PerThread<Wkv7BackwardThread<N>> th;
    blk.phase([&](int i) { wkv7_backward_begin<N>(p, bb, h, i, th[i]); });
    for (int t = p.T - 1; t >= 0; t--) {
        const bool reset = wkv7_is_reset(p.resets, p.T, bb, t);
        blk.phase([&](int i) { wkv7_backward_load<N>(p, bb, h, t, i, step); });
        blk.phase([&](int i) { wkv7_backward_phase1<N>(p, bb, h, t, i, step, th[i]); });
        blk.phase([&](int i) { wkv7_backward_phase2<N>(p, bb, h, t, i, step, th[i]); });
        if (reset) {  // then replay the chunk from its start up to step t - 1 (no steps when t starts a chunk)
            blk.phase([&](int i) { wkv7_backward_reset<N>(p, bb, h, t, i, th[i]); });
            for (int u = t - t % WKV7_CHUNK_LEN; u < t; u++) {
                blk.phase([&](int i) { wkv7_backward_load<N>(p, bb, h, u, i, step); });
                blk.phase([&](int i) { wkv7_backward_replay<N>(p, bb, h, u, i, step, th[i]); });
            }
        }
    }
    blk.phase([&](int i) { wkv7_backward_end<N>(p, bb, h, i, th[i]); });
}

// ---- the two block policies --------------------------------------------------------------------------

#if defined(__CUDACC__)
// One CUDA block of N threads (blockDim.x == N).
struct Wkv7DeviceBlock {
    template <typename T>
    struct PerThread {
        T value;  // this thread's own copy, kept in registers once the phases are inlined
        __device__ __forceinline__ T& operator[](int) { return value; }
    };
    template <typename Body>
    __device__ __forceinline__ void phase(const Body& body) {
        body((int)threadIdx.x);
        __syncthreads();
    }
};
#endif

#if !defined(__CUDACC__)
// The N "threads" of a block run one after another inside each phase (their registers on the heap: 3 N^2
// floats in the backward would crowd a thread's stack at N = 128).
template <int N>
struct Wkv7HostBlock {
    template <typename T>
    struct PerThread {
        std::vector<T> values = std::vector<T>(N);
        T& operator[](int i) { return values[i]; }
    };
    template <typename Body>
    void phase(const Body& body) {
        for (int i = 0; i < N; i++) body(i);
    }
};
#endif
