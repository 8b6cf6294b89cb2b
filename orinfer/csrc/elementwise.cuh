// orinfer's fused elementwise kernels, for CUDA GPUs whose torch has no Triton (NVIDIA's JetPack
// wheels): the residual add with RMSNorm, RMSNorm, RoPE and the SiLU gate, one kernel each, every
// intermediate rounded to the tensors' dtype where eager PyTorch stores it (orinfer/kernels.py
// holds the eager reference; the order and dtypes are transformers' Phi-3, Apache-2.0). Device
// code only:
// NVRTC compiles this file alone for sm_87 (tests/test_extension.py), elementwise.cu launches it.
// The __f*_rn intrinsics keep the compiler from contracting a product and a sum into one rounding,
// which eager's separate kernels never do. Fusing the residual add into RMSNorm is vLLM's idea
// (fused_add_rms_norm in https://github.com/vllm-project/vllm csrc/layernorm_kernels.cu,
// Apache-2.0); no code is taken from it.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace orinfer {

template <typename T>
struct Num;
template <>
struct Num<float> {
  static __device__ __forceinline__ float in(float v) { return v; }
  static __device__ __forceinline__ float out(float v) { return v; }
};
template <>
struct Num<__half> {
  static __device__ __forceinline__ float in(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half out(float v) { return __float2half_rn(v); }
};
template <>
struct Num<__nv_bfloat16> {
  static __device__ __forceinline__ float in(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 out(float v) { return __float2bfloat16_rn(v); }
};

// v stored as T and read back: what an eager kernel's output holds
template <typename T>
__device__ __forceinline__ float rounded(float v) {
  return Num<T>::in(Num<T>::out(v));
}

// N elements moved as one load or store (16 bytes where the rows allow, else one element)
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

// The block's total of v, given to every thread (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  __shared__ float total;
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = v;
  __syncthreads();
  if (threadIdx.x < 32) {
    v = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) total = v;
  }
  __syncthreads();
  return total;
}

// One block a row. ADD: sum = residual + x (rounded), then the norm of sum; else the norm of x.
// out = weight * T(x * rsqrt(mean(x * x) + eps)), the mean and rsqrt in float32 as eager's.
template <typename T, int N, bool ADD>
__global__ void rms_norm_kernel(const T* __restrict__ x, long long x_stride,
                                const T* __restrict__ residual, long long residual_stride,
                                T* __restrict__ sum, T* __restrict__ out,
                                const T* __restrict__ weight, int hidden, float inv_hidden,
                                float eps) {
  using P = Pack<T, N>;
  const long long row = blockIdx.x;
  const P* xs = reinterpret_cast<const P*>(x + row * x_stride);
  const P* rs = reinterpret_cast<const P*>(residual + row * residual_stride);
  P* ss = reinterpret_cast<P*>(sum + row * hidden);
  P* os = reinterpret_cast<P*>(out + row * hidden);
  const P* ws = reinterpret_cast<const P*>(weight);
  const int packs = hidden / N;
  float squares = 0.f;
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    P p = xs[i];
    if (ADD) {
      const P r = rs[i];
#pragma unroll
      for (int j = 0; j < N; ++j)
        p.v[j] = Num<T>::out(__fadd_rn(Num<T>::in(r.v[j]), Num<T>::in(p.v[j])));
      ss[i] = p;
    }
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float f = Num<T>::in(p.v[j]);
      squares = __fadd_rn(squares, __fmul_rn(f, f));
    }
  }
  const float scale = rsqrtf(__fadd_rn(__fmul_rn(block_sum(squares), inv_hidden), eps));
  for (int i = threadIdx.x; i < packs; i += blockDim.x) {
    P p = ADD ? ss[i] : xs[i];
    const P w = ws[i];
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float normed = rounded<T>(__fmul_rn(Num<T>::in(p.v[j]), scale));
      p.v[j] = Num<T>::out(__fmul_rn(Num<T>::in(w.v[j]), normed));
    }
    os[i] = p;
  }
}

// x [tokens, heads, 2 * half] (rows and heads strided, the last dimension dense), cos and sin
// [tokens, 2 * half]; out dense. One thread a pack of N pairs (i, i + half), i a multiple of N:
// out1 = x1 * cos1 - x2 * sin1, out2 = x2 * cos2 + x1 * sin2, each product rounded, as eager's.
template <typename T, int N>
__global__ void rope_kernel(const T* __restrict__ x, long long token_stride, long long head_stride,
                            const T* __restrict__ cos, const T* __restrict__ sin,
                            long long angle_stride, T* __restrict__ out, int heads, int half,
                            unsigned int packs) {
  using P = Pack<T, N>;
  const unsigned int at = blockIdx.x * blockDim.x + threadIdx.x;
  if (at >= packs) return;
  const unsigned int per_head = half / N;
  const unsigned int i = at % per_head * N, token_head = at / per_head;
  const unsigned int head = token_head % heads, token = token_head / heads;
  const T* xs = x + token * token_stride + head * head_stride;
  const T* angles = cos + token * angle_stride;
  const T* sines = sin + token * angle_stride;
  const P x1 = *reinterpret_cast<const P*>(xs + i), x2 = *reinterpret_cast<const P*>(xs + i + half);
  const P c1 = *reinterpret_cast<const P*>(angles + i);
  const P c2 = *reinterpret_cast<const P*>(angles + i + half);
  const P s1 = *reinterpret_cast<const P*>(sines + i);
  const P s2 = *reinterpret_cast<const P*>(sines + i + half);
  P o1, o2;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    const float a = Num<T>::in(x1.v[j]), b = Num<T>::in(x2.v[j]);
    o1.v[j] = Num<T>::out(__fsub_rn(rounded<T>(__fmul_rn(a, Num<T>::in(c1.v[j]))),
                                    rounded<T>(__fmul_rn(b, Num<T>::in(s1.v[j])))));
    o2.v[j] = Num<T>::out(__fadd_rn(rounded<T>(__fmul_rn(b, Num<T>::in(c2.v[j]))),
                                    rounded<T>(__fmul_rn(a, Num<T>::in(s2.v[j])))));
  }
  T* o = out + static_cast<long long>(token_head) * 2 * half;
  *reinterpret_cast<P*>(o + i) = o1;
  *reinterpret_cast<P*>(o + i + half) = o2;
}

// out = up * T(silu(gate)), silu(g) = g / (1 + exp(-g)) in float32 as torch's CUDA kernel computes
// it. gate and up [rows, features] with strided rows (the halves of one gate_up product); out
// dense. blockIdx.y strides over the rows, blockIdx.x over packs of a row.
template <typename T, int N>
__global__ void silu_mul_kernel(const T* __restrict__ gate, long long gate_stride,
                                const T* __restrict__ up, long long up_stride, T* __restrict__ out,
                                int rows, int features) {
  using P = Pack<T, N>;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= features / N) return;
  for (long long row = blockIdx.y; row < rows; row += gridDim.y) {
    const P g = reinterpret_cast<const P*>(gate + row * gate_stride)[i];
    const P u = reinterpret_cast<const P*>(up + row * up_stride)[i];
    P o;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float f = Num<T>::in(g.v[j]);
      const float silu = rounded<T>(__fdiv_rn(f, __fadd_rn(1.f, expf(-f))));
      o.v[j] = Num<T>::out(__fmul_rn(Num<T>::in(u.v[j]), silu));
    }
    reinterpret_cast<P*>(out + row * features)[i] = o;
  }
}

}  // namespace orinfer
