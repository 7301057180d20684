// Registers the CPU kernels as torch ops (torch.ops.adapt_engine_kernels.*). torch/library.h
// compiles in seconds where the pybind11 route (torch/extension.h) takes about a minute.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(adapt_engine_kernels, m) {
  m.def(
      "group_saliency(Tensor weight, Tensor? grad, Tensor(b!)? fisher, Tensor(a!) out, int dim, "
      "int group_size, int metric, float fisher_scale) -> ()");
  m.def("gather_inplace(Tensor(a!) tensor, Tensor index, int dim) -> int");
  m.def("gather_channels(Tensor(a!)[] tensors, Tensor index, int[] dims) -> int");
  m.def("gather_temp_budget_bytes() -> int", &adapt_engine::gather_temp_budget_bytes);
}

TORCH_LIBRARY_IMPL(adapt_engine_kernels, CPU, m) {
  m.impl("group_saliency", &adapt_engine::group_saliency_cpu);
  m.impl("gather_inplace", &adapt_engine::gather_inplace_cpu);
  m.impl("gather_channels", &adapt_engine::gather_channels_cpu);
}
