// The native ops' entry points, shared by the binding file and the CPU and CUDA implementations.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <vector>

#include "l2l_math.h"

namespace l2l {

// Shape of the net from the op's arguments, checked (raises a Python ValueError/RuntimeError on bad input).
NetShape make_shape(int64_t layers, int64_t hidden, int64_t features, std::optional<double> preprocess_p,
                    double output_scale);

// θ_out = θ_in + Δ and the next state for every row (θ_in, θ_out, ∇, h_in, h_out, c_in, c_out); outputs may
// alias inputs. All rows share the packed weights and the state dtype. With `skipped` (an int64 on the weights'
// device) this is the optimizer's in-place step: a coordinate whose ∇ is NaN or ±inf is not written at all,
// and counted there; one whose ∇ is zero keeps its state and gets no learned update; and θ_out =
// θ_in·(1 − lr·wd) + lr·Δ with `u`'s options (which must be the defaults without `skipped`).
using Row = std::vector<at::Tensor>;
void check_rows(const std::vector<Row>& rows, const at::Tensor& weights, const NetShape& s);
void forward_cpu(const std::vector<Row>& rows, const at::Tensor& weights, const NetShape& s, int64_t* skipped,
                 const Update& u);
// (dh, dc, d_weights packed) of one flat tensor's step.
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& h,
                                                           const at::Tensor& c, const at::Tensor& dtheta,
                                                           const at::Tensor& dh_next, const at::Tensor& dc_next,
                                                           const at::Tensor& weights, const NetShape& s);
#ifdef L2L_WITH_CUDA
void forward_cuda(const std::vector<Row>& rows, const at::Tensor& weights, const NetShape& s, int64_t* skipped,
                  const Update& u);
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& h,
                                                            const at::Tensor& c, const at::Tensor& dtheta,
                                                            const at::Tensor& dh_next, const at::Tensor& dc_next,
                                                            const at::Tensor& weights, const NetShape& s);
#endif

}  // namespace l2l
