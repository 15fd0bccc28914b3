// Shared host-side declarations for the mistral_grpc ops: the argument checks that the CPU and
// CUDA implementations of one schema both call, so a bad call fails the same way on either device.
#pragma once

#include <ATen/core/Tensor.h>

namespace mistral_grpc {}  // namespace mistral_grpc
