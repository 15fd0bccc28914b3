"""mistral-grpc: a gRPC microservice serving Mistral-7B-Instruct on a torch C++/CUDA extension."""

import torch  # noqa: F401  (the extension links against libtorch: load it first)

from mistral_grpc import _C  # noqa: F401  (registers torch.ops.mistral_grpc.*)

__version__ = "0.1.0"
