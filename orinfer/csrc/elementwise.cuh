// orinfer's CUDA kernels, for GPUs whose torch has no Triton (NVIDIA's JetPack wheels). The fused
// elementwise ones: the residual add with RMSNorm, RMSNorm, RoPE and the SiLU gate, one kernel
// each, every intermediate rounded to the tensors' dtype where eager PyTorch stores it
// (orinfer/kernels.py holds the eager reference; the order and dtypes are transformers' Phi-3,
// Apache-2.0); and attention that reads the paged KV cache in place (below). Device code only:
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

// Attention that reads the paged KV cache where it lies: one block a (token, KV head), its query
// heads (G of them) together, so each key and value is read once for all of them. Token t sees the
// keys of its sequence (row token_seq[t] of `tables`, blocks of block_size rows of the flat cache)
// at positions lo..positions[t], lo = 0 or, with a sliding window, positions[t] - window + 1. The
// block's warps take every WARPSth chunk of 32 keys (a key a lane for the scores; a value row
// across the lanes for the sum), each with its own running maximum and sum in float32 (the online
// softmax of FlashAttention, https://arxiv.org/abs/2205.14135), merged at the end. Query heads
// per KV head at most MAXG, head size at most 32 * MAXP and a multiple of N.
constexpr int WARPS = 4, MAXG = 8, MAXP = 4;

// -infinity without math.h's INFINITY, which NVRTC does not define
__device__ __forceinline__ float minus_infinity() { return __int_as_float(0xff800000); }

template <typename T, int N>
__global__ void __launch_bounds__(WARPS * 32)
    paged_attention_kernel(const T* __restrict__ q, long long q_stride, const T* __restrict__ k,
                           const T* __restrict__ v, const long long* __restrict__ tables,
                           long long table_stride, const long long* __restrict__ token_seq,
                           const long long* __restrict__ positions, T* __restrict__ out,
                           int heads, int kv_heads, int dim, int block_size, int window,
                           float scale) {
  using P = Pack<T, N>;
  extern __shared__ float shared[];
  const int token = blockIdx.x, kv = blockIdx.y, groups = heads / kv_heads;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  float* qs = shared;                      // [groups][dim], scaled
  float* merged = qs + MAXG * dim;         // [WARPS][groups][dim]
  float* stats = merged + WARPS * MAXG * dim;  // [WARPS][groups][2]: maximum, sum
  for (int i = threadIdx.x; i < groups * dim; i += blockDim.x)
    qs[i] = Num<T>::in(q[token * q_stride + (kv * groups + i / dim) * dim + i % dim]) * scale;
  __syncthreads();
  const long long position = positions[token];
  const long long lo = window > 0 && position - window + 1 > 0 ? position - window + 1 : 0;
  const long long* table = tables + token_seq[token] * table_stride;
  const long long row_stride = static_cast<long long>(kv_heads) * dim;
  float top[MAXG], total[MAXG], acc[MAXG][MAXP];
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    top[g] = minus_infinity();
    total[g] = 0.f;
#pragma unroll
    for (int p = 0; p < MAXP; ++p) acc[g][p] = 0.f;
  }
  for (long long first = lo + warp * 32; first <= position; first += WARPS * 32) {
    const long long key = first + lane;
    const bool valid = key <= position;
    long long slot = 0;
    float score[MAXG];
#pragma unroll
    for (int g = 0; g < MAXG; ++g) score[g] = 0.f;
    if (valid) {
      slot = table[key / block_size] * block_size + key % block_size;
      const T* krow = k + slot * row_stride + kv * dim;
      for (int d = 0; d < dim; d += N) {
        const P kp = *reinterpret_cast<const P*>(krow + d);
#pragma unroll
        for (int j = 0; j < N; ++j) {
          const float kf = Num<T>::in(kp.v[j]);
#pragma unroll
          for (int g = 0; g < MAXG; ++g)
            if (g < groups) score[g] = fmaf(qs[g * dim + d + j], kf, score[g]);
        }
      }
    }
    float weight[MAXG];
#pragma unroll
    for (int g = 0; g < MAXG; ++g) {
      if (g >= groups) continue;
      float chunk_top = valid ? score[g] : minus_infinity();
      for (int o = 16; o > 0; o >>= 1)
        chunk_top = fmaxf(chunk_top, __shfl_xor_sync(0xffffffffu, chunk_top, o));
      const float new_top = fmaxf(top[g], chunk_top);
      const float rescale = expf(top[g] - new_top);  // top[g] = -inf at first: 0
      weight[g] = valid ? expf(score[g] - new_top) : 0.f;
      float chunk_total = weight[g];
      for (int o = 16; o > 0; o >>= 1)
        chunk_total += __shfl_xor_sync(0xffffffffu, chunk_total, o);
      total[g] = total[g] * rescale + chunk_total;
      top[g] = new_top;
#pragma unroll
      for (int p = 0; p < MAXP; ++p) acc[g][p] *= rescale;
    }
    const int keys = position - first + 1 < 32 ? static_cast<int>(position - first + 1) : 32;
    for (int i = 0; i < keys; ++i) {
      const long long key_slot = __shfl_sync(0xffffffffu, slot, i);
      const T* vrow = v + key_slot * row_stride + kv * dim;
      float vf[MAXP];
#pragma unroll
      for (int p = 0; p < MAXP; ++p) {
        const int d = lane + 32 * p;
        vf[p] = d < dim ? Num<T>::in(vrow[d]) : 0.f;
      }
#pragma unroll
      for (int g = 0; g < MAXG; ++g) {
        if (g >= groups) continue;
        const float w = __shfl_sync(0xffffffffu, weight[g], i);
#pragma unroll
        for (int p = 0; p < MAXP; ++p) acc[g][p] = fmaf(w, vf[p], acc[g][p]);
      }
    }
  }
#pragma unroll
  for (int g = 0; g < MAXG; ++g) {
    if (g >= groups) continue;
#pragma unroll
    for (int p = 0; p < MAXP; ++p)
      if (lane + 32 * p < dim) merged[(warp * MAXG + g) * dim + lane + 32 * p] = acc[g][p];
    if (lane == 0) {
      stats[(warp * MAXG + g) * 2] = top[g];
      stats[(warp * MAXG + g) * 2 + 1] = total[g];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < groups * dim; i += blockDim.x) {
    const int g = i / dim, d = i % dim;
    float best = minus_infinity();
    for (int w = 0; w < WARPS; ++w) best = fmaxf(best, stats[(w * MAXG + g) * 2]);
    float sum = 0.f, value = 0.f;
    for (int w = 0; w < WARPS; ++w) {
      const float m = stats[(w * MAXG + g) * 2];
      const float factor = m == minus_infinity() ? 0.f : expf(m - best);  // a warp that saw no key
      sum = fmaf(stats[(w * MAXG + g) * 2 + 1], factor, sum);
      value = fmaf(merged[(w * MAXG + g) * dim + d], factor, value);
    }
    const long long row = static_cast<long long>(token) * heads + kv * groups + g;
    out[row * dim + d] = Num<T>::out(value / sum);
  }
}

}  // namespace orinfer
