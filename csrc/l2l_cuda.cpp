// Tensors to CUDA launches: the launch tables, the stream, the partial-sum buffer.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include "l2l_cuda_kernels.h"
#include "l2l_ops.h"

namespace l2l {

namespace {
int dtype_code(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kCodeFloat32;
    case at::kBFloat16: return kCodeBfloat16;
    case at::kHalf: return kCodeFloat16;
    default: return kCodeFloat64;  // check_rows allows no other
  }
}
}  // namespace

void forward_cuda(const std::vector<Row>& rows, const at::Tensor& weights, const NetShape& s, int64_t* skipped,
                  const Update& u) {
  const c10::cuda::CUDAGuard guard(weights.device());
  const bool bf16_state = rows.front()[3].scalar_type() == at::kBFloat16;
  const auto stream = c10::cuda::getCurrentCUDAStream();
  LaunchTable table;
  table.count = 0;
  int64_t blocks = 0;
  auto launch = [&] {
    C10_CUDA_CHECK(launch_forward(table, blocks, weights.const_data_ptr<float>(), s, bf16_state, skipped, u, stream));
    table.count = 0;
    blocks = 0;
  };
  for (const Row& row : rows) {
    int64_t* t = table.rows[table.count++];
    for (int i = kColThetaIn; i <= kColCOut; ++i) t[i] = reinterpret_cast<int64_t>(row[i].data_ptr());
    t[kColNumel] = row[0].numel();
    t[kColDtype] = dtype_code(row[0].scalar_type());
    t[kColFirstBlock] = blocks;
    blocks += (t[kColNumel] + kForwardBlock - 1) / kForwardBlock;
    if (table.count == kRowsPerLaunch) launch();
  }
  if (table.count > 0) launch();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& h,
                                                            const at::Tensor& c, const at::Tensor& dtheta,
                                                            const at::Tensor& dh_next, const at::Tensor& dc_next,
                                                            const at::Tensor& weights, const NetShape& s) {
  const c10::cuda::CUDAGuard guard(weights.device());
  const int64_t n = grad.numel();
  auto dh = at::empty_like(dh_next), dc = at::empty_like(dc_next);
  auto partial = at::zeros({backward_blocks(n), packed_size(s)}, weights.options());
  C10_CUDA_CHECK(launch_backward(grad.const_data_ptr<float>(), h.const_data_ptr(), c.const_data_ptr(),
                                 dtheta.const_data_ptr<float>(), dh_next.const_data_ptr<float>(),
                                 dc_next.const_data_ptr<float>(), dh.data_ptr<float>(), dc.data_ptr<float>(),
                                 partial.data_ptr<float>(), weights.const_data_ptr<float>(), n, s,
                                 h.scalar_type() == at::kBFloat16, c10::cuda::getCurrentCUDAStream()));
  return {dh, dc, partial.sum(0)};  // the second, deterministic, stage of the reduction
}

}  // namespace l2l
