// The pets op library: one TORCH_LIBRARY block with every schema, and the CPU kernels. Ops registered here
// (not as pybind functions) are visible to torch.export, torch.compile and the ONNX exporter.
//
// Conventions of every op: task_ids is int64 [B] and gives each batch row a table slot in [0, T); tables are
// stacked by slot along dim 0; batch tensors are [B, ..., features]; ops are functional (a new output, inputs
// untouched). CUDA kernels register in a TORCH_LIBRARY_IMPL(pets, CUDA, m) block built under PETS_WITH_CUDA.
#include <Python.h>

#include <torch/library.h>

#include "adapter/adapter.h"
#include "bias/bias.h"
#include "gelu/gelu.h"
#include "head/head.h"
#include "layer_norm/layer_norm.h"
#include "lora/lora.h"
#include "row/row.h"
#include "scale/scale.h"
#include "sparse/sparse.h"

// `import pets_compiler._C` loads this library, which runs the registrations below; it has no Python API.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(pets, m) {
  const std::vector<at::Tag> tags = {at::Tag::pt2_compliant_tag};
  // out[i] = y[i] + scale[t] * (x[i] @ lora_a[t, :r].T) @ lora_b[t, :, :r].T, t = task_ids[i], r = rank[t]
  m.def(
      "lora_delta(Tensor y, Tensor x, Tensor task_ids, Tensor lora_a, Tensor lora_b, Tensor scale, "
      "Tensor rank) -> Tensor",
      tags);
  // out[i] = y[i] + bias[t] (every token of row i), t = task_ids[i]
  m.def("bias_delta(Tensor y, Tensor task_ids, Tensor bias) -> Tensor", tags);
  // out = (y + the lora_delta term (if lora_a is given) + the bias_delta term (if bias is given)) * (1 + out_scale[t])
  // (if out_scale is given: IA3's output scale, stored as l - 1), one output
  m.def(
      "linear_delta(Tensor y, Tensor x, Tensor task_ids, Tensor? lora_a, Tensor? lora_b, Tensor? lora_scale, "
      "Tensor? lora_rank, Tensor? bias, Tensor? out_scale=None) -> Tensor",
      tags);
  // out[i] = normalize(v) * (weight + weight_delta[t]) + (bias + bias_delta[t]), t = task_ids[i], with
  // v = x[i] + x_bias[t] + residual[i] (each term only where given, each sum rounded to x's dtype)
  m.def(
      "layer_norm(Tensor x, Tensor task_ids, Tensor weight, Tensor bias, Tensor weight_delta, "
      "Tensor bias_delta, float eps, Tensor? x_bias=None, Tensor? residual=None) -> Tensor",
      tags);
  // out[i] = x[i] @ weight[t].T + bias[t], t = task_ids[i] (per-task heads, labels zero-padded to L)
  m.def("segmented_linear(Tensor x, Tensor task_ids, Tensor weight, Tensor bias) -> Tensor", tags);
  // out[i] = y[i] * (1 + delta[t]) (every token of row i), t = task_ids[i]; IA3 scale l stored as l - 1
  m.def("scale(Tensor y, Tensor task_ids, Tensor delta) -> Tensor", tags);
  // out[i] = gelu(y[i] + bias[t], approximate) * (1 + scale[t]) (every token of row i), t = task_ids[i]; no bias:
  // gelu(y[i]), no scale: no product; approximate as aten.gelu's ("none" or "tanh")
  m.def("gelu_delta(Tensor y, Tensor task_ids, Tensor? bias, Tensor? scale, str approximate) -> Tensor", tags);
  // out[i] = (y[i] + bias[t]) * (1 + scale[t]) + residual[i] (every token of row i), t = task_ids[i]; each term only
  // where given (bias or scale at least); residual has y's shape
  m.def("row_delta(Tensor y, Tensor task_ids, Tensor? bias, Tensor? scale, Tensor? residual) -> Tensor", tags);
  // out[i, n, o] = y[i, n, o] + sum_{row_ptr[t, o] <= k < row_ptr[t, o + 1]} val[k] * x[i, n, col[k]], t = task_ids[i]
  m.def(
      "sparse_delta(Tensor y, Tensor x, Tensor task_ids, Tensor row_ptr, Tensor col, Tensor val) -> Tensor",
      tags);
  // out[i, s] = y[i, s] + D_t[ids[i, s]], D_t [V, H] = CSR (row_ptr[t], col, val) as in sparse_delta, t = task_ids[i]
  m.def(
      "embedding_delta(Tensor y, Tensor ids, Tensor task_ids, Tensor row_ptr, Tensor col, Tensor val) -> Tensor",
      tags);
  // out[i] = LN_t(h[i] + residual[i]) with slot t's AdapterHub bottleneck adapter per config[t], t = task_ids[i];
  // with h_bias, h[i] + h_bias[t] (rounded to h's dtype) stands for h[i] wherever the op reads it
  m.def(
      "adapter(Tensor h, Tensor residual, Tensor task_ids, Tensor ln_weight, Tensor ln_bias, "
      "Tensor ln_weight_delta, Tensor ln_bias_delta, float eps, Tensor down_w, Tensor down_b, Tensor up_w, "
      "Tensor up_b, Tensor scaling, Tensor config, Tensor? h_bias=None) -> Tensor",
      tags);
}

TORCH_LIBRARY_IMPL(pets, CPU, m) {
  m.impl("lora_delta", &pets::lora_delta_cpu);
  m.impl("bias_delta", &pets::bias_delta_cpu);
  m.impl("linear_delta", &pets::linear_delta_cpu);
  m.impl("layer_norm", &pets::layer_norm_cpu);
  m.impl("segmented_linear", &pets::segmented_linear_cpu);
  m.impl("scale", &pets::scale_cpu);
  m.impl("gelu_delta", &pets::gelu_delta_cpu);
  m.impl("row_delta", &pets::row_delta_cpu);
  m.impl("sparse_delta", &pets::sparse_delta_cpu);
  m.impl("embedding_delta", &pets::embedding_delta_cpu);
  m.impl("adapter", &pets::adapter_cpu);
}
