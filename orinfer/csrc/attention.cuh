// Attention that reads the paged KV cache where it lies (the padded layout gathers every layer's
// keys and values into a grid first). Device code only: NVRTC compiles this file alone for sm_87
// (tests/test_extension.py), attention.cu launches it, orinfer/attention/paged.py lays out its
// tiles. A block is one tile (up to 16 consecutive new tokens of one sequence) and one KV head; a
// warp is one query head of that KV head, so the keys a block stages in shared memory serve every
// query head that reads them. Keys go through the sequence's block table in chunks of kKeyChunk,
// the next chunk copied (cp.async) while this one is used; the softmax is online (a running
// maximum and sum per row, the output rescaled when the maximum grows), so each key is read once.
// These are FlashAttention-2's ideas (Tri Dao, https://arxiv.org/abs/2307.08691; the register
// layout that lets a product's scores feed the next product is its code's too,
// https://github.com/Dao-AILab/flash-attention, BSD-3-Clause); no code is taken from it. The
// fragment layouts are PTX's for mma.m16n8k16 (NVIDIA's PTX ISA, "Matrix Fragments for mma.m16n8k16").
// float32 runs the same tiles with CUDA-core arithmetic: the exactness tier runs this kernel.
#pragma once
#include "elementwise.cuh"  // Num<T>

namespace orinfer {

constexpr int kTileRows = 16;  // a tile's new tokens: the rows of one mma
constexpr int kKeyChunk = 32;  // keys staged in shared memory at a time
constexpr unsigned kAllLanes = 0xffffffffu;

// A row of K or V in shared memory, padded by 16 bytes so that the 8 rows one fragment load reads
// fall in distinct banks.
template <typename T, int D>
constexpr int kRowStride = D + 16 / sizeof(T);

// Shared memory of one block: two stages of K and V chunks, and (float32) the warps' queries.
template <typename T, int D>
__host__ __device__ constexpr int attention_shared_bytes(int warps) {
  return (4 * kKeyChunk + (sizeof(T) == 4 ? warps * kTileRows : 0)) * kRowStride<T, D> * sizeof(T);
}

__device__ __forceinline__ void copy16_async(void* smem, const void* global, bool real) {
  // zero-filled where `real` is false: rows past a sequence's last key may hold NaN patterns
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(global),
               "r"(real ? 16 : 0));
}
__device__ __forceinline__ void copies_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int Pending>
__device__ __forceinline__ void copies_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending));
}

// Two floats as one register of two 16-bit values (the low half first, as PTX's fragments hold).
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);
template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}
template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<unsigned*>(&h);
}

// c += a b for one m16n8k16 product, float accumulators.
template <typename T>
struct Mma;
template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                             unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};
template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                             unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ float minus_infinity() { return __int_as_float(0xff800000); }

// One warp's rows: a query head's tile of tokens, the scores of a chunk and the running output.
// Lane (g, t) = (lane / 4, lane % 4) holds, as PTX's accumulator fragments do, rows g and g + 8
// and in every 8 columns the columns 2t and 2t + 1: s[j][e] is row g + 8 * (e / 2), column
// 8 j + 2 t + e % 2.
template <typename T, int D>
struct WarpRows {
  static constexpr int kLd = kRowStride<T, D>;
  unsigned qa[D / 16][4];          // the queries as A fragments (16-bit types)
  float s[kKeyChunk / 8][4];       // this chunk's scores, then its probabilities
  float o[D / 8][4];               // the output so far, unnormalised
  float m[2], l[2];                // per row: the running maximum (scaled) and sum
  const T* qs;                     // the warp's queries in shared memory (float32)

  __device__ void start(const T* q, long long token_stride, int tokens, T* q_shared, int lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 2; ++r) m[r] = minus_infinity(), l[r] = 0.f;
    for (int j = 0; j < D / 8; ++j)
      for (int e = 0; e < 4; ++e) o[j][e] = 0.f;
    if constexpr (sizeof(T) == 2) {
      for (int kt = 0; kt < D / 16; ++kt)
        for (int i = 0; i < 4; ++i) {
          const int row = g + 8 * (i & 1), col = kt * 16 + 8 * (i >> 1) + 2 * t;
          qa[kt][i] = row < tokens
                          ? *reinterpret_cast<const unsigned*>(q + row * token_stride + col)
                          : 0u;
        }
    } else {
      for (int i = lane; i < kTileRows * D; i += 32) {
        const int row = i / D, col = i % D;
        q_shared[row * kLd + col] = row < tokens ? q[row * token_stride + col] : T(0);
      }
      qs = q_shared;
      __syncwarp();
    }
  }

  // s = q k^T over the chunk's keys (rows of `ks`).
  __device__ void scores(const T* ks, int lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int j = 0; j < kKeyChunk / 8; ++j)
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    if constexpr (sizeof(T) == 2) {
      for (int j = 0; j < kKeyChunk / 8; ++j) {
        const T* key = ks + (8 * j + g) * kLd + 2 * t;
        for (int kt = 0; kt < D / 16; ++kt)
          Mma<T>::run(s[j], qa[kt], *reinterpret_cast<const unsigned*>(key + 16 * kt),
                      *reinterpret_cast<const unsigned*>(key + 16 * kt + 8));
      }
    } else {
      for (int j = 0; j < kKeyChunk / 8; ++j)
        for (int e = 0; e < 4; ++e) {
          const float* qrow = qs + (g + 8 * (e >> 1)) * kLd;
          const float* key = ks + (8 * j + 2 * t + (e & 1)) * kLd;
          float acc = 0.f;
          for (int d = 0; d < D; ++d) acc = fmaf(qrow[d], key[d], acc);
          s[j][e] = acc;
        }
    }
  }

  // The chunk's scores become probabilities under each row's running maximum (masked: 0), and
  // what came before is rescaled to the new maximum. `first_key`: the chunk's first key's position.
  __device__ void softmax(int first_key, int first_position, int tokens, int window, float scale,
                          int lane) {
    const int g = lane >> 2, t = lane & 3;
    float top[2] = {minus_infinity(), minus_infinity()};
    for (int j = 0; j < kKeyChunk / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const int row = g + 8 * (e >> 1), key = first_key + 8 * j + 2 * t + (e & 1);
        const int position = first_position + row;
        const bool seen = row < tokens && key <= position && key > position - window;
        s[j][e] = seen ? s[j][e] * scale : minus_infinity();
        top[e >> 1] = fmaxf(top[e >> 1], s[j][e]);
      }
    float alpha[2];
    for (int r = 0; r < 2; ++r) {
      top[r] = fmaxf(top[r], __shfl_xor_sync(kAllLanes, top[r], 1));
      top[r] = fmaxf(top[r], __shfl_xor_sync(kAllLanes, top[r], 2));
      const float grown = fmaxf(m[r], top[r]);
      // nothing seen yet: nothing to rescale (and -inf - -inf would be NaN)
      alpha[r] = grown == minus_infinity() ? 1.f : expf(m[r] - grown);
      m[r] = grown;
      l[r] *= alpha[r];
    }
    for (int j = 0; j < D / 8; ++j)
      for (int e = 0; e < 4; ++e) o[j][e] *= alpha[e >> 1];
    for (int j = 0; j < kKeyChunk / 8; ++j)
      for (int e = 0; e < 4; ++e) {
        const float p = s[j][e] == minus_infinity() ? 0.f : expf(s[j][e] - m[e >> 1]);
        l[e >> 1] += p;
        s[j][e] = p;
      }
  }

  // o += p v over the chunk's values (rows of `vs`). 16-bit types: p rounded to T, as
  // FlashAttention rounds it; the score fragments of keys 16 kk .. 16 kk + 15 are an A fragment.
  __device__ void accumulate(const T* vs, int lane) {
    if constexpr (sizeof(T) == 2) {
      for (int kk = 0; kk < kKeyChunk / 16; ++kk) {
        const unsigned a[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]),
                               pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                               pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                               pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
        for (int jd = 0; jd < D / 8; jd += 2) {
          // four 8x8 matrices transposed: keys 0-7 and 8-15 of columns jd, then of jd + 1
          const int key = 16 * kk + 8 * ((lane >> 3) & 1) + (lane & 7);
          const T* row = vs + key * kLd + 8 * (jd + (lane >> 4));
          const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
          unsigned b[4];
          asm volatile(
              "ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
              : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3])
              : "r"(addr));
          Mma<T>::run(o[jd], a, b[0], b[1]);
          Mma<T>::run(o[jd + 1], a, b[2], b[3]);
        }
      }
    } else {
      const int group = lane & ~3, t = lane & 3;
#pragma unroll
      for (int c = 0; c < kKeyChunk; ++c) {
        const int from = group | ((c & 7) >> 1);
        const float low = __shfl_sync(kAllLanes, s[c >> 3][c & 1], from);
        const float high = __shfl_sync(kAllLanes, s[c >> 3][2 + (c & 1)], from);
        const float* value = vs + c * kLd + 2 * t;
        for (int j = 0; j < D / 8; ++j)
          for (int e = 0; e < 2; ++e) {
            o[j][e] = fmaf(low, value[8 * j + e], o[j][e]);
            o[j][2 + e] = fmaf(high, value[8 * j + e], o[j][2 + e]);
          }
      }
    }
  }

  // Each real row's output divided by its sum, into `out` (rows `token_stride` apart).
  __device__ void finish(T* out, long long token_stride, int tokens, int lane) {
    const int g = lane >> 2, t = lane & 3;
    for (int r = 0; r < 2; ++r) {
      l[r] += __shfl_xor_sync(kAllLanes, l[r], 1);
      l[r] += __shfl_xor_sync(kAllLanes, l[r], 2);
    }
    for (int r = 0; r < 2; ++r) {
      const int row = g + 8 * r;
      if (row >= tokens) continue;
      T* dst = out + row * token_stride + 2 * t;
      for (int j = 0; j < D / 8; ++j)
        for (int e = 0; e < 2; ++e) dst[8 * j + e] = Num<T>::out(o[j][2 * r + e] / l[r]);
    }
  }

};

// One chunk of keys [first_key, first_key + kKeyChunk) of a KV head into shared memory: K and V
// rows through the block table, 16 bytes a copy, the block's threads together; keys past
// `last_key` are zeros.
template <typename T, int D>
__device__ __forceinline__ void stage_chunk(T* ks, T* vs, const T* k, const T* v,
                                            const long long* table, int block_size, int kv_heads,
                                            int kv_head, int first_key, int last_key) {
  constexpr int kPer = 16 / sizeof(T), kRowCopies = D / kPer, kLd = kRowStride<T, D>;
  for (int i = threadIdx.x; i < kKeyChunk * kRowCopies; i += blockDim.x) {
    const int row = i / kRowCopies, col = (i % kRowCopies) * kPer, key = first_key + row;
    const bool real = key <= last_key;
    const long long slot = real ? table[key / block_size] * block_size + key % block_size : 0;
    const long long at = (slot * kv_heads + kv_head) * D + col;
    copy16_async(ks + row * kLd + col, k + at, real);
    copy16_async(vs + row * kLd + col, v + at, real);
  }
  copies_commit();
}

// tiles[i] = (first flat token, tokens, position of the first, sequence's row of `tables`);
// blockIdx = (tile, KV head); q and out [tokens, heads, D] (q's rows `q_stride` apart, its heads
// D apart; out dense); k and v the caches' rows [slots, kv_heads, D]; `window`: a query at position
// p sees keys p - window < j <= p.
template <typename T, int D>
__global__ void paged_attention_kernel(const T* __restrict__ q, long long q_stride,
                                       const T* __restrict__ k, const T* __restrict__ v,
                                       const long long* __restrict__ tiles,
                                       const long long* __restrict__ tables, long long table_stride,
                                       T* __restrict__ out, int kv_heads, int block_size,
                                       int window, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  extern __shared__ __align__(16) unsigned char shared[];
  constexpr int kLd = kRowStride<T, D>, kStage = kKeyChunk * kLd;
  T* staged = reinterpret_cast<T*>(shared);  // K stage 0, K stage 1, V stage 0, V stage 1
  const long long* tile = tiles + 4 * blockIdx.x;
  const int first_token = static_cast<int>(tile[0]), tokens = static_cast<int>(tile[1]);
  const int first_position = static_cast<int>(tile[2]);
  const long long* table = tables + tile[3] * table_stride;
  const int kv_head = blockIdx.y, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int groups = blockDim.x >> 5, head = kv_head * groups + warp, heads = kv_heads * groups;
  const int last_key = first_position + tokens - 1;
  const int first_key = max(0, first_position - window + 1);
  const int chunks = (last_key - first_key) / kKeyChunk + 1;

  WarpRows<T, D> rows;
  rows.start(q + first_token * q_stride + head * D, q_stride, tokens,
             staged + 4 * kStage + warp * kTileRows * kLd, lane);
  stage_chunk<T, D>(staged, staged + 2 * kStage, k, v, table, block_size, kv_heads, kv_head,
                    first_key, last_key);
  for (int c = 0; c < chunks; ++c) {
    const int stage = c & 1;
    if (c + 1 < chunks) {
      stage_chunk<T, D>(staged + (stage ^ 1) * kStage, staged + (2 + (stage ^ 1)) * kStage, k, v,
                        table, block_size, kv_heads, kv_head, first_key + (c + 1) * kKeyChunk,
                        last_key);
      copies_wait<1>();
    } else {
      copies_wait<0>();
    }
    __syncthreads();
    rows.scores(staged + stage * kStage, lane);
    rows.softmax(first_key + c * kKeyChunk, first_position, tokens, window, scale, lane);
    rows.accumulate(staged + (2 + stage) * kStage, lane);
    __syncthreads();  // the next copy overwrites this stage
  }
  rows.finish(out + (static_cast<long long>(first_token) * heads + head) * D,
              static_cast<long long>(heads) * D, tokens, lane);
#else
  __trap();  // mma.sync and cp.async need sm_80; attention/paged.py never launches it below
#endif
}

}  // namespace orinfer
