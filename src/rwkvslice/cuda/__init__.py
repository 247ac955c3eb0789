"""WKV-7 kernel sources and their JIT build.

wkv7_core.cuh   the per-head arithmetic as __host__ __device__ functions (forward, backstepping backward)
wkv7_cuda.cu    CUDA kernels + launchers (no torch headers; `nvcc -c` compiles it alone)
wkv7_launch.h   launcher declarations shared by the .cu and the torch binding
wkv7_op.cpp     torch binding: TORCH_LIBRARY_FRAGMENT(rwkvslice) ops wkv7_forward / wkv7_backward
wkv7_host.cpp   the same arithmetic built for the CPU with the C++ compiler (extern "C", loaded by ctypes)
build.py        lazy, cached, process-safe builds of both

The Python side (autograd, dispatch) is rwkvslice.ops.wkv7_cuda.
"""
