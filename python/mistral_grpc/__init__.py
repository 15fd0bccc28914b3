"""mistral-grpc: a gRPC microservice serving Mistral-7B-Instruct on a torch C++/CUDA extension.

The package itself imports nothing heavy, so `from mistral_grpc.client import ChatClient` needs
neither torch nor the compiled extension. The extension (mistral_grpc._C) links against libtorch:
import torch before it, as mistral_grpc.ops does.
"""

__version__ = "0.1.0"
