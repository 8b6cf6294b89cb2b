// The torch operators over elementwise.cuh's kernels (torch.ops.orinfer.*), registered for CUDA
// tensors of float32, float16 and bfloat16. orinfer/extension.py builds this file with torch's
// extension builder and loads it; orinfer/kernels.py calls the operators.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <utility>

#include "dispatch.h"
#include "elementwise.cuh"

namespace orinfer {
namespace {

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

}  // namespace
}  // namespace orinfer

TORCH_LIBRARY(orinfer, m) {
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor residual, Tensor weight, float eps) -> (Tensor, Tensor)");
  m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor");
  m.def("silu_mul(Tensor gate, Tensor up) -> Tensor");
}

TORCH_LIBRARY_IMPL(orinfer, CUDA, m) {
  m.impl("rms_norm", &orinfer::rms_norm);
  m.impl("add_rms_norm", &orinfer::add_rms_norm);
  m.impl("rope", &orinfer::rope);
  m.impl("silu_mul", &orinfer::silu_mul);
}
