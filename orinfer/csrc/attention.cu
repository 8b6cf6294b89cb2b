// The torch operator over attention.cuh's kernel: torch.ops.orinfer.paged_attention, for CUDA
// tensors of float32, float16 and bfloat16 on sm_80 and newer. orinfer/extension.py builds this
// file with elementwise.cu; orinfer/attention/paged.py lays out its tiles and calls it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <climits>
#include <type_traits>

#include "attention.cuh"
#include "dispatch.h"

namespace orinfer {
namespace {

// D: the head dimension as a type, for each one the kernel is built for.
template <typename F>
void by_head_dim(int64_t dim, F launch) {
  switch (dim) {
    case 16: return launch(std::integral_constant<int, 16>{});
    case 32: return launch(std::integral_constant<int, 32>{});
    case 64: return launch(std::integral_constant<int, 64>{});
    case 96: return launch(std::integral_constant<int, 96>{});
    case 128: return launch(std::integral_constant<int, 128>{});
    default: TORCH_CHECK(false, "paged_attention: head dimension 16, 32, 64, 96 or 128, not ", dim);
  }
}

template <typename T, int D>
void launch(const at::Tensor& q, const at::Tensor& k_rows, const at::Tensor& v_rows,
            const at::Tensor& tiles, const at::Tensor& tables, at::Tensor& out, int block_size,
            int window, float scale) {
  const int kv_heads = static_cast<int>(k_rows.size(1));
  const int groups = static_cast<int>(q.size(1)) / kv_heads;
  const int bytes = attention_shared_bytes<T, D>(groups);
  auto kernel = paged_attention_kernel<T, D>;
  if (bytes > 48 * 1024) {
    int device = 0, most = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    TORCH_CHECK(bytes <= most, "paged_attention: ", bytes,
                " bytes of shared memory a block; this GPU has ", most);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  }
  const dim3 grid(static_cast<unsigned>(tiles.size(0)), static_cast<unsigned>(kv_heads));
  kernel<<<grid, 32 * groups, bytes, c10::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const T*>(q.data_ptr()), q.stride(0),
      reinterpret_cast<const T*>(k_rows.data_ptr()), reinterpret_cast<const T*>(v_rows.data_ptr()),
      reinterpret_cast<const long long*>(tiles.data_ptr()),
      reinterpret_cast<const long long*>(tables.data_ptr()), tables.stride(0),
      reinterpret_cast<T*>(out.data_ptr()), kv_heads, block_size, window, scale);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// q [tokens, heads, D] (its heads D apart, rows 16-byte aligned); k_rows and v_rows the caches as
// dense rows [slots, kv_heads, D]; tiles [n, 4] and tables [sequences, blocks] int64 (see
// attention.cuh). window <= 0: none. Returns [tokens, heads * D].
at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_rows, const at::Tensor& v_rows,
                           const at::Tensor& tiles, const at::Tensor& tables, int64_t block_size,
                           int64_t window, double scale) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "paged_attention: q [tokens, heads, dim] on a CUDA device, its heads dense");
  const int64_t dim = q.size(2), heads = q.size(1), per16 = 16 / q.element_size();
  TORCH_CHECK(reinterpret_cast<uintptr_t>(q.data_ptr()) % 16 == 0 && q.stride(0) % per16 == 0,
              "paged_attention: q's rows 16-byte aligned");
  for (const at::Tensor* c : {&k_rows, &v_rows}) {
    TORCH_CHECK(c->is_contiguous() && c->dim() == 3 && c->size(2) == dim &&
                    c->sizes() == k_rows.sizes() && c->scalar_type() == q.scalar_type() &&
                    c->device() == q.device() &&
                    reinterpret_cast<uintptr_t>(c->data_ptr()) % 16 == 0,
                "paged_attention: k_rows and v_rows dense [slots, kv_heads, dim] of q's dtype");
  }
  const int64_t kv_heads = k_rows.size(1);
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= 8,
              "paged_attention: at most 8 query heads a KV head");
  for (const at::Tensor* t : {&tiles, &tables}) {
    TORCH_CHECK(t->scalar_type() == at::kLong && t->device() == q.device() && t->dim() == 2 &&
                    t->stride(1) == 1,
                "paged_attention: tiles and tables int64 rows on q's device");
  }
  TORCH_CHECK(tiles.size(1) == 4 && tiles.is_contiguous(), "paged_attention: tiles [n, 4]");
  TORCH_CHECK(tiles.size(0) < (int64_t{1} << 31) && block_size > 0 && block_size < INT_MAX,
              "paged_attention: too many tiles, or no block size");
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({q.size(0), heads * dim}, q.options());
  if (tiles.size(0) == 0) return out;
  const int bound = window <= 0 || window > INT_MAX ? INT_MAX : static_cast<int>(window);
  by_head_dim(dim, [&](auto d) {
    by_dtype(q, [&](auto zero) {
      launch<decltype(zero), decltype(d)::value>(q, k_rows, v_rows, tiles, tables, out,
                                                 block_size, bound, scale);
    });
  });
  return out;
}

}  // namespace
}  // namespace orinfer

TORCH_LIBRARY_FRAGMENT(orinfer, m) {
  m.def("paged_attention(Tensor q, Tensor k_rows, Tensor v_rows, Tensor tiles, Tensor tables, "
        "int block_size, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(orinfer, CUDA, m) { m.impl("paged_attention", &orinfer::paged_attention); }
