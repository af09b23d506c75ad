// The one binding file: the ops' schemas (torch.ops.l2l_fused.native_*), their input checks, and their CPU
// and CUDA implementations; fake (meta) implementations are registered from Python (l2l_fused/ops/native.py).
// Loading this module (`import l2l_fused._C`) registers the ops.
#include <Python.h>
#include <torch/library.h>

#include <cmath>

#include "l2l_ops.h"

namespace l2l {

NetShape make_shape(int64_t layers, int64_t hidden, int64_t features, std::optional<double> preprocess_p,
                    double output_scale) {
  TORCH_CHECK_VALUE(layers >= 1 && layers <= kMaxLayers, "native kernels run 1 to ", kMaxLayers, " layers, not ", layers);
  TORCH_CHECK_VALUE(hidden >= 1 && hidden <= kMaxHidden, "native kernels run hidden_size up to ", kMaxHidden, ", not ", hidden);
  TORCH_CHECK_VALUE(features == (preprocess_p ? 2 : 1), "features must be 2 with preprocessing, 1 without, not ", features);
  TORCH_CHECK_VALUE(!preprocess_p || *preprocess_p > 0, "preprocess_p must be > 0");
  const double p = preprocess_p.value_or(1.0);
  // exp(-p) rounded to float: the reference compares |∇| with it in float32.
  return NetShape{static_cast<int>(layers), static_cast<int>(hidden), static_cast<int>(features),
                  preprocess_p.has_value(), static_cast<float>(1.0 / p), static_cast<float>(std::exp(-p)),
                  static_cast<float>(std::exp(p)), static_cast<float>(output_scale)};
}

void check_rows(const std::vector<Row>& rows, const at::Tensor& weights, const NetShape& s) {
  TORCH_CHECK_VALUE(weights.dim() == 1 && weights.numel() == packed_size(s) && weights.scalar_type() == at::kFloat &&
                        weights.is_contiguous(),
                    "weights must be the packed float32 net of ", packed_size(s), " values, got ", weights.sizes(),
                    " ", weights.scalar_type());
  const auto device = weights.device();
  TORCH_CHECK_VALUE(device.is_cpu() || device.is_cuda(), "native kernels run on CPU or CUDA, not ", device);
  const auto state_type = rows.front()[3].scalar_type();
  TORCH_CHECK_VALUE(state_type == at::kFloat || state_type == at::kBFloat16, "state must be float32 or bfloat16, not ", state_type);
  for (const Row& row : rows) {
    const int64_t n = row[0].numel();
    const auto t = row[0].scalar_type();
    TORCH_CHECK_VALUE(t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble,
                      "parameters must be float32, bfloat16, float16 or float64, not ", t);
    TORCH_CHECK_VALUE(row[1].scalar_type() == t && row[2].scalar_type() == t, "θ and ∇ must share a dtype");
    TORCH_CHECK_VALUE(row[1].numel() == n && row[2].numel() == n, "θ in, θ out and ∇ must have ", n, " elements");
    for (int i = 3; i < 7; ++i) {
      TORCH_CHECK_VALUE(row[i].dim() == 3 && row[i].size(0) == s.layers && row[i].size(1) == n && row[i].size(2) == s.hidden &&
                            row[i].scalar_type() == state_type,
                        "state must be ", state_type, " [", s.layers, ", ", n, ", ", s.hidden, "], got ", row[i].scalar_type(),
                        " ", row[i].sizes());
    }
    for (const auto& tensor : row) {
      TORCH_CHECK_VALUE(tensor.device() == device, "every tensor must be on ", device, ", one is on ", tensor.device());
      TORCH_CHECK_VALUE(tensor.is_contiguous(), "every tensor must be contiguous");
    }
  }
}

namespace {

void run_forward(const std::vector<Row>& rows, const at::Tensor& weights, const NetShape& s, int64_t* skipped,
                 const Update& u) {
  check_rows(rows, weights, s);
  if (weights.device().is_cpu()) return forward_cpu(rows, weights, s, skipped, u);
#ifdef L2L_WITH_CUDA
  return forward_cuda(rows, weights, s, skipped, u);
#else
  TORCH_CHECK(false, "l2l_fused._C was built without CUDA");
#endif
}

void group_step(at::TensorList params, at::TensorList grads, at::TensorList h, at::TensorList c,
                const at::Tensor& weights, const at::Tensor& skipped, int64_t layers, int64_t hidden,
                int64_t features, std::optional<double> preprocess_p, double output_scale,
                const std::optional<at::Tensor>& lr_tensor, double lr, double weight_decay, bool maximize) {
  const NetShape s = make_shape(layers, hidden, features, preprocess_p, output_scale);
  TORCH_CHECK_VALUE(skipped.scalar_type() == at::kLong && skipped.numel() == 1 && skipped.is_contiguous() &&
                        skipped.device() == weights.device(),
                    "skipped must be one int64 on ", weights.device());
  TORCH_CHECK_VALUE(lr >= 0 && std::isfinite(lr), "lr must be a finite float >= 0, not ", lr);
  TORCH_CHECK_VALUE(weight_decay >= 0 && std::isfinite(weight_decay), "weight_decay must be a finite float >= 0, not ",
                    weight_decay);
  Update u{static_cast<float>(lr), nullptr, static_cast<float>(weight_decay), maximize};
  if (lr_tensor.has_value()) {
    TORCH_CHECK_VALUE(lr_tensor->scalar_type() == at::kFloat && lr_tensor->numel() == 1 &&
                          lr_tensor->device() == weights.device(),
                      "lr_tensor must be one float32 on ", weights.device(), ", got ", lr_tensor->scalar_type(), " on ",
                      lr_tensor->device());
    u.lr_ptr = lr_tensor->const_data_ptr<float>();
  }
  TORCH_CHECK_VALUE(grads.size() == params.size() && h.size() == params.size() && c.size() == params.size(),
                    "params, grads, h and c must be lists of one length");
  if (params.empty()) return;
  std::vector<Row> rows;
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (strided parameter, its contiguous copy)
  for (size_t i = 0; i < params.size(); ++i) {
    at::Tensor work = params[i].is_contiguous() ? params[i] : params[i].contiguous();
    if (!params[i].is_contiguous()) write_back.emplace_back(params[i], work);
    rows.push_back({work, work, grads[i].contiguous(), h[i], h[i], c[i], c[i]});
  }
  run_forward(rows, weights, s, skipped.data_ptr<int64_t>(), u);
  for (auto& [param, work] : write_back) param.copy_(work);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> forward(const at::Tensor& theta, const at::Tensor& grad, const at::Tensor& h,
                                                       const at::Tensor& c, const at::Tensor& weights, int64_t layers,
                                                       int64_t hidden, int64_t features, std::optional<double> preprocess_p,
                                                       double output_scale) {
  const NetShape s = make_shape(layers, hidden, features, preprocess_p, output_scale);
  auto theta_out = at::empty_like(theta), h_out = at::empty_like(h), c_out = at::empty_like(c);
  run_forward({{theta, theta_out, grad, h, h_out, c, c_out}}, weights, s, nullptr, Update{});
  return {theta_out, h_out, c_out};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward(const at::Tensor& grad, const at::Tensor& h, const at::Tensor& c,
                                                        const at::Tensor& dtheta, const at::Tensor& dh_next,
                                                        const at::Tensor& dc_next, const at::Tensor& weights,
                                                        int64_t layers, int64_t hidden, int64_t features,
                                                        std::optional<double> preprocess_p, double output_scale) {
  const NetShape s = make_shape(layers, hidden, features, preprocess_p, output_scale);
  TORCH_CHECK_VALUE(grad.scalar_type() == at::kFloat && dtheta.scalar_type() == at::kFloat &&
                        dh_next.scalar_type() == at::kFloat && dc_next.scalar_type() == at::kFloat,
                    "∇ and the adjoints must be float32");
  TORCH_CHECK_VALUE(dtheta.numel() == grad.numel(), "dtheta must have ∇'s ", grad.numel(), " elements");
  TORCH_CHECK_VALUE(dh_next.sizes() == h.sizes() && dc_next.sizes() == h.sizes(), "dh_next and dc_next must be ", h.sizes());
  for (const auto* t : {&dtheta, &dh_next, &dc_next}) {
    TORCH_CHECK_VALUE(t->is_contiguous() && t->device() == weights.device(), "adjoints must be contiguous, on ", weights.device());
  }
  check_rows({{grad, grad, grad, h, h, c, c}}, weights, s);
  if (weights.device().is_cpu()) return backward_cpu(grad, h, c, dtheta, dh_next, dc_next, weights, s);
#ifdef L2L_WITH_CUDA
  return backward_cuda(grad, h, c, dtheta, dh_next, dc_next, weights, s);
#else
  TORCH_CHECK(false, "l2l_fused._C was built without CUDA");
#endif
}

}  // namespace
}  // namespace l2l

TORCH_LIBRARY(l2l_fused, m) {
  m.def("native_group_step(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] h, Tensor(c!)[] c, Tensor weights, "
        "Tensor(d!) skipped, int layers, int hidden, int features, float? preprocess_p, float output_scale, "
        "Tensor? lr_tensor=None, float lr=1., float weight_decay=0., bool maximize=False) -> ()");
  m.def("native_forward(Tensor theta, Tensor grad, Tensor h, Tensor c, Tensor weights, int layers, int hidden, "
        "int features, float? preprocess_p, float output_scale) -> (Tensor, Tensor, Tensor)");
  m.def("native_backward(Tensor grad, Tensor h, Tensor c, Tensor dtheta, Tensor dh_next, Tensor dc_next, "
        "Tensor weights, int layers, int hidden, int features, float? preprocess_p, float output_scale) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(l2l_fused, CPU, m) {
  m.impl("native_group_step", &l2l::group_step);
  m.impl("native_forward", &l2l::forward);
  m.impl("native_backward", &l2l::backward);
}

#ifdef L2L_WITH_CUDA
TORCH_LIBRARY_IMPL(l2l_fused, CUDA, m) {
  m.impl("native_group_step", &l2l::group_step);
  m.impl("native_forward", &l2l::forward);
  m.impl("native_backward", &l2l::backward);
}
#endif

PyMODINIT_FUNC PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "Native kernels of l2l_fused; the ops live in torch.ops.l2l_fused.",
                               -1, nullptr, nullptr, nullptr, nullptr, nullptr};
  PyObject* m = PyModule_Create(&module);
  // The sizes the kernels were compiled with (csrc/l2l_constants.h), for a test to catch a build older than
  // l2l_fused/ops/constants.py.
  if (m != nullptr && (PyModule_AddIntConstant(m, "MAX_LAYERS", l2l::kMaxLayers) != 0 ||
                       PyModule_AddIntConstant(m, "MAX_HIDDEN", l2l::kMaxHidden) != 0)) {
    Py_DECREF(m);
    return nullptr;
  }
  return m;
}
