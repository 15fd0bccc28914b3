// The activation dtypes the layer ops take (the checks reject any other), for AT_DISPATCH.
#pragma once

#include <ATen/Dispatch.h>

#define MG_DISPATCH_FLOAT_TYPES(TYPE, NAME, ...)                                                      \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)                            \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__)                     \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))
