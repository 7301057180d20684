// Declarations of the CPU kernels registered as torch ops in registration.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/TensorBody.h>
#include <c10/util/ArrayRef.h>

#include <optional>

namespace adapt_engine {

// Metric ids shared with kernels/saliency.py (METRIC_IDS).
enum SaliencyMetric : int64_t { kTaylor = 0, kVectorize = 1, kMagnitude = 2, kParamMix = 3 };

// Adds per-group raw scores (signed for kVectorize) of a 2-D weight into out (float32, contiguous).
// dim selects the scored axis: 0 scores rows, 1 scores columns.
void group_saliency_cpu(const at::Tensor& weight, const std::optional<at::Tensor>& grad,
                        const std::optional<at::Tensor>& fisher, at::Tensor& out, int64_t dim,
                        int64_t group_size, int64_t metric, double fisher_scale);

// Compacts a contiguous tensor in place along dim, keeping the slices listed in index
// (int64, sorted, unique, in range: validated by the caller). Returns the temp bytes used.
int64_t gather_inplace_cpu(at::Tensor& tensor, const at::Tensor& index, int64_t dim);

// Status codes of gather_channels_cpu; on any failure nothing has been modified.
enum GatherStatus : int64_t { kGatherOk = 0, kBadIndex = 1, kOutOfRange = 2, kOverlap = 3, kBadTensor = 4 };

// Validates the index (sorted, unique, in range for every tensor) and the tensors (CPU,
// contiguous, not overlapping), then compacts each tensor in place along its dim.
int64_t gather_channels_cpu(at::TensorList tensors, const at::Tensor& index, at::IntArrayRef dims);

// Upper bound of the bounce buffer used by gather_inplace_cpu (besides one item, see gather.cpp).
int64_t gather_temp_budget_bytes();

}  // namespace adapt_engine
