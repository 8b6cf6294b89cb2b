// The torch operators over elementwise.cuh's kernels (torch.ops.orinfer.*), registered for CUDA
// tensors of float32, float16 and bfloat16: the fused elementwise ones, and attention that reads
// the paged KV cache in place. orinfer/extension.py builds this file with torch's
// extension builder and loads it; orinfer/kernels.py calls the operators.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "elementwise.cuh"

namespace orinfer {
namespace {

// T: the CUDA type of the tensors' dtype, given to `launch`.
template <typename F>
void by_dtype(const at::Tensor& t, F launch) {
  switch (t.scalar_type()) {
    case at::kFloat: return launch(float{});
    case at::kHalf: return launch(__half{});
    case at::kBFloat16: return launch(__nv_bfloat16{});
    default:
      TORCH_CHECK(false, "orinfer's kernels take float32, float16 or bfloat16, not ",
                  t.scalar_type());
  }
}

// Rows of `t` (2-D, the last dimension dense) and its dtype and device as `like`'s.
void check_rows(const at::Tensor& t, const at::Tensor& like, const char* what) {
  TORCH_CHECK(t.is_cuda() && t.dim() == 2 && t.stride(1) == 1, what,
              ": a 2-D CUDA tensor whose last dimension is dense");
  TORCH_CHECK(t.scalar_type() == like.scalar_type() && t.device() == like.device(), what,
              ": the dtype and device of the others");
}

// 16-byte packs where `features` fills whole packs and every row of each tensor starts 16-byte
// aligned (`rows`: its row stride, in elements; 0 for a single row), else one element at a time.
bool packs16(std::initializer_list<std::pair<const at::Tensor*, int64_t>> rows, int64_t features) {
  const int64_t n = 16 / rows.begin()->first->element_size();
  bool ok = features % n == 0;
  for (const auto& [t, stride] : rows)
    ok = ok && reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0 && stride % n == 0;
  return ok;
}

// int64 tensors as the kernels' 64-bit integers (int64_t is long on Linux, the kernels take long
// long)
const long long* as_longs(const at::Tensor& t) {
  return reinterpret_cast<const long long*>(t.data_ptr());
}

void launch_rms_norm(const at::Tensor& x, const at::Tensor* residual, at::Tensor* sum,
                     at::Tensor& out, const at::Tensor& weight, double eps) {
  const int64_t hidden = x.size(1), rows = x.size(0);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == hidden && weight.is_contiguous(),
              "rms_norm: weight of the rows' size");
  if (rows == 0) return;
  const at::Tensor& r = residual ? *residual : x;
  const at::Tensor& s = sum ? *sum : out;
  const bool wide = packs16({{&x, x.stride(0)}, {&r, r.stride(0)}, {&s, s.stride(0)},
                             {&out, out.stride(0)}, {&weight, 0}},
                            hidden);
  const int threads = 256;
  const float inv_hidden = 1.0f / static_cast<float>(hidden);
  auto stream = c10::cuda::getCurrentCUDAStream();
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    const T* xp = reinterpret_cast<const T*>(x.data_ptr());
    const T* rp = reinterpret_cast<const T*>(r.data_ptr());
    T* sp = reinterpret_cast<T*>(sum ? sum->data_ptr() : out.data_ptr());
    T* op = reinterpret_cast<T*>(out.data_ptr());
    const T* wp = reinterpret_cast<const T*>(weight.data_ptr());
    constexpr int N = 16 / sizeof(T);
    auto go = [&](auto kernel) {
      kernel<<<rows, threads, 0, stream>>>(xp, x.stride(0), rp, r.stride(0), sp, op, wp, hidden,
                                           inv_hidden, static_cast<float>(eps));
    };
    if (residual)
      wide ? go(rms_norm_kernel<T, N, true>) : go(rms_norm_kernel<T, 1, true>);
    else
      wide ? go(rms_norm_kernel<T, N, false>) : go(rms_norm_kernel<T, 1, false>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  check_rows(x, x, "rms_norm: x");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), x.size(1)}, x.options());
  launch_rms_norm(x, nullptr, nullptr, out, weight, eps);
  return out;
}

std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  check_rows(x, x, "add_rms_norm: x");
  check_rows(residual, x, "add_rms_norm: residual");
  TORCH_CHECK(residual.sizes() == x.sizes(), "add_rms_norm: residual of x's shape");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor sum = at::empty({x.size(0), x.size(1)}, x.options());
  at::Tensor out = at::empty_like(sum);
  launch_rms_norm(x, &residual, &sum, out, weight, eps);
  return {sum, out};
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.is_cuda() && x.dim() == 3 && x.stride(2) == 1 && x.size(2) % 2 == 0,
              "rope: x [tokens, heads, dim], the last dimension dense and even");
  const int64_t tokens = x.size(0), heads = x.size(1), dim = x.size(2);
  for (const at::Tensor* a : {&cos, &sin}) {
    TORCH_CHECK(a->scalar_type() == x.scalar_type() && a->device() == x.device() &&
                    a->size(0) == tokens && a->size(-1) == dim && a->numel() == tokens * dim &&
                    a->stride(-1) == 1,
                "rope: cos and sin [tokens, 1, dim] of x's dtype and device");
  }
  TORCH_CHECK(cos.stride(0) == sin.stride(0), "rope: cos and sin laid out alike");
  c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({tokens, heads, dim}, x.options());
  const int64_t half = dim / 2;
  const bool wide = packs16({{&x, x.stride(0)}, {&x, x.stride(1)}, {&cos, cos.stride(0)},
                             {&sin, sin.stride(0)}, {&out, half}},
                            half);
  const int64_t n = wide ? 16 / x.element_size() : 1, packs = tokens * heads * (half / n);
  TORCH_CHECK(packs < (int64_t{1} << 31), "rope: too many tokens for one launch");
  if (packs == 0) return out;
  const int threads = 256;
  const unsigned int blocks = static_cast<unsigned int>((packs + threads - 1) / threads);
  auto stream = c10::cuda::getCurrentCUDAStream();
  by_dtype(x, [&](auto zero) {
    using T = decltype(zero);
    auto go = [&](auto kernel) {
      kernel<<<blocks, threads, 0, stream>>>(
          reinterpret_cast<const T*>(x.data_ptr()), x.stride(0), x.stride(1),
          reinterpret_cast<const T*>(cos.data_ptr()), reinterpret_cast<const T*>(sin.data_ptr()),
          cos.stride(0), reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(heads),
          static_cast<int>(half), static_cast<unsigned int>(packs));
    };
    wide ? go(rope_kernel<T, 16 / sizeof(T)>) : go(rope_kernel<T, 1>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor silu_mul(const at::Tensor& gate, const at::Tensor& up) {
  check_rows(gate, gate, "silu_mul: gate");
  check_rows(up, gate, "silu_mul: up");
  TORCH_CHECK(gate.sizes() == up.sizes(), "silu_mul: gate and up of one shape");
  c10::cuda::CUDAGuard guard(gate.device());
  const int64_t rows = gate.size(0), features = gate.size(1);
  at::Tensor out = at::empty({rows, features}, gate.options());
  if (rows == 0 || features == 0) return out;
  const bool wide =
      packs16({{&gate, gate.stride(0)}, {&up, up.stride(0)}, {&out, out.stride(0)}}, features);
  const int threads = 256;
  auto stream = c10::cuda::getCurrentCUDAStream();
  by_dtype(gate, [&](auto zero) {
    using T = decltype(zero);
    const int n = wide ? 16 / sizeof(T) : 1;
    const dim3 grid(static_cast<unsigned int>((features / n + threads - 1) / threads),
                    static_cast<unsigned int>(std::min<int64_t>(rows, 65535)));
    auto go = [&](auto kernel) {
      kernel<<<grid, threads, 0, stream>>>(
          reinterpret_cast<const T*>(gate.data_ptr()), gate.stride(0),
          reinterpret_cast<const T*>(up.data_ptr()), up.stride(0),
          reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(rows),
          static_cast<int>(features));
    };
    wide ? go(silu_mul_kernel<T, 16 / sizeof(T)>) : go(silu_mul_kernel<T, 1>);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor paged_attention(const at::Tensor& q, const at::Tensor& k_rows, const at::Tensor& v_rows,
                           const at::Tensor& tables, const at::Tensor& token_seq,
                           const at::Tensor& positions, int64_t block_size, int64_t window,
                           double scale) {
  TORCH_CHECK(q.is_cuda() && q.dim() == 3 && q.stride(2) == 1 && q.stride(1) == q.size(2),
              "paged_attention: q [tokens, heads, dim], its heads dense");
  const int64_t tokens = q.size(0), heads = q.size(1), dim = q.size(2);
  for (const at::Tensor* rows : {&k_rows, &v_rows})
    TORCH_CHECK(rows->dim() == 3 && rows->is_contiguous() && rows->size(2) == dim &&
                    rows->scalar_type() == q.scalar_type() && rows->device() == q.device() &&
                    reinterpret_cast<uintptr_t>(rows->data_ptr()) % 16 == 0,
                "paged_attention: the caches as rows [slots, kv_heads, dim] of q's dtype");
  const int64_t kv_heads = k_rows.size(1), n = 16 / q.element_size();
  TORCH_CHECK(heads % kv_heads == 0 && heads / kv_heads <= MAXG && dim <= 32 * MAXP &&
                  dim % n == 0,
              "paged_attention: at most ", MAXG, " query heads a KV head, dim at most ", 32 * MAXP,
              " and a multiple of ", n);
  TORCH_CHECK(tables.dim() == 2 && tables.stride(1) == 1 && tables.scalar_type() == at::kLong,
              "paged_attention: tables [sequences, blocks] int64");
  for (const at::Tensor* t : {&token_seq, &positions})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == tokens && t->is_contiguous() &&
                    t->scalar_type() == at::kLong,
                "paged_attention: token_seq and positions [tokens] int64");
  c10::cuda::CUDAGuard guard(q.device());
  at::Tensor out = at::empty({tokens, heads, dim}, q.options());
  if (tokens == 0) return out;
  const size_t smem = (MAXG * dim * (1 + WARPS) + WARPS * MAXG * 2) * sizeof(float);
  auto stream = c10::cuda::getCurrentCUDAStream();
  by_dtype(q, [&](auto zero) {
    using T = decltype(zero);
    paged_attention_kernel<T, 16 / sizeof(T)>
        <<<dim3(static_cast<unsigned int>(tokens), static_cast<unsigned int>(kv_heads)),
           WARPS * 32, smem, stream>>>(
            reinterpret_cast<const T*>(q.data_ptr()), q.stride(0),
            reinterpret_cast<const T*>(k_rows.data_ptr()),
            reinterpret_cast<const T*>(v_rows.data_ptr()), as_longs(tables), tables.stride(0),
            as_longs(token_seq), as_longs(positions),
            reinterpret_cast<T*>(out.data_ptr()), static_cast<int>(heads),
            static_cast<int>(kv_heads), static_cast<int>(dim), static_cast<int>(block_size),
            static_cast<int>(window), static_cast<float>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace
}  // namespace orinfer

TORCH_LIBRARY(orinfer, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
  m.def(
      "paged_attention(Tensor q, Tensor k_rows, Tensor v_rows, Tensor tables, Tensor token_seq, "
      "Tensor positions, int block_size, int window, float scale) -> Tensor");
}

TORCH_LIBRARY_IMPL(orinfer, CUDA, m) {
  m.impl("rms_norm", &orinfer::rms_norm);
  m.impl("add_rms_norm", &orinfer::add_rms_norm);
  m.impl("rope", &orinfer::rope);
  m.impl("silu_mul", &orinfer::silu_mul);
  m.impl("paged_attention", &orinfer::paged_attention);
}
