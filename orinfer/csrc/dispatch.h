// Host code shared by the operator files (elementwise.cu, attention.cu): a tensor's dtype as the
// CUDA type its kernels are instantiated for.
#pragma once
#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace orinfer {

// T: the CUDA type of the tensor's dtype, given to `launch`.
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

}  // namespace orinfer
