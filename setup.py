"""Builds mistral_grpc._C: the CPU kernels always, the CUDA kernels whenever nvcc is present.

The CUDA build is gated on CUDA_HOME/nvcc, never on torch.cuda.is_available(): CI and the
developer machines have nvcc but no GPU, and a .cu that does not compile must turn CI red.
MISTRAL_GRPC_CUDA=0 skips the CUDA sources for a quick CPU-only rebuild while iterating.
MISTRAL_GRPC_PROTO_STUBS=0 skips the gRPC stubs: a kernels-only build where grpcio-tools is missing
(scripts/gpu_check.sh on a lent GPU machine).
MISTRAL_GRPC_SKIP_EXTENSION=1 installs the package without building the extension: scripts/setup.sh
builds it afterwards with `build_ext --inplace`, whose build/ folder makes the next build incremental.
"""

import glob
import os
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
PROTO_ROOT = os.path.join(ROOT, "proto")
PYTHON_ROOT = os.path.join(ROOT, "python")


def generate_grpc_stubs(out_root: str = PYTHON_ROOT) -> None:
    """Generates the Python stubs from proto/ into mistral_grpc/proto (never hand-edited, not committed).

    The include mapping `mistral_grpc/proto=proto` makes protoc write imports as
    `from mistral_grpc.proto.mistral.chat.v1 import ...`, so no top-level `mistral` package appears.
    out_root is the folder holding mistral_grpc/ (a test regenerates elsewhere to spot stale stubs).
    """
    protos = sorted(glob.glob(os.path.join(PROTO_ROOT, "**", "*.proto"), recursive=True))
    if not protos:
        return
    virtual = ["mistral_grpc/proto/" + os.path.relpath(p, PROTO_ROOT) for p in protos]
    subprocess.check_call([sys.executable, "-m", "grpc_tools.protoc", f"-Imistral_grpc/proto={PROTO_ROOT}",
                           f"--python_out={out_root}", f"--grpc_python_out={out_root}",
                           f"--pyi_out={out_root}", *virtual], cwd=ROOT)
    for dirpath, _, _ in os.walk(os.path.join(out_root, "mistral_grpc", "proto")):
        init = os.path.join(dirpath, "__init__.py")
        if not os.path.exists(init):
            open(init, "w").close()


def locate_cuda_home() -> None:
    """torch guesses CUDA_HOME from the nvcc on PATH; a wrapper script there (as on our machines)
    makes it guess /usr/local, where libcudart is not. Prefer the usual CUDA folder."""
    if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists("/usr/local/cuda/bin/nvcc"):
        os.environ["CUDA_HOME"] = "/usr/local/cuda"


def cuda_wanted() -> bool:
    from torch.utils.cpp_extension import CUDA_HOME

    flag = os.environ.get("MISTRAL_GRPC_CUDA", "auto").lower()
    if flag in ("0", "off", "false", "no"):
        return False
    have_nvcc = CUDA_HOME is not None and os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
    if flag in ("1", "on", "true", "yes") and not have_nvcc:
        raise RuntimeError("MISTRAL_GRPC_CUDA=1 but no nvcc found (set CUDA_HOME)")
    return have_nvcc


def extension():
    import torch
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    csrc = "csrc"
    sources = sorted(glob.glob(os.path.join(csrc, "*.cpp")) + glob.glob(os.path.join(csrc, "cpu", "*.cpp")))
    include_dirs = [os.path.join(ROOT, "csrc")]
    cxx_flags = ["-O3", "-std=c++20", "-fopenmp"]
    libraries = ["gomp"]
    if not cuda_wanted():
        return CppExtension("mistral_grpc._C", sources, include_dirs=include_dirs,
                            extra_compile_args={"cxx": cxx_flags}, libraries=libraries)
    # No GPU to detect at build time: name the architectures (Ampere and Hopper at least).
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    # ATen/cuda headers pull in cusparse.h, which the CUDA 13 wheels keep under nvidia/cu13.
    torch_site = os.path.dirname(os.path.dirname(torch.__file__))
    include_dirs += [p for p in glob.glob(os.path.join(torch_site, "nvidia", "cu*", "include"))]
    sources += sorted(glob.glob(os.path.join(csrc, "cuda", "*.cu")))
    nvcc_flags = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo", "--expt-relaxed-constexpr"]
    return CUDAExtension("mistral_grpc._C", sources, include_dirs=include_dirs,
                         extra_compile_args={"cxx": cxx_flags + ["-DMISTRAL_GRPC_WITH_CUDA"],
                                             "nvcc": nvcc_flags + ["-DMISTRAL_GRPC_WITH_CUDA"]},
                         libraries=libraries)


def main() -> None:
    locate_cuda_home()
    from torch.utils.cpp_extension import BuildExtension

    if os.environ.get("MISTRAL_GRPC_PROTO_STUBS", "1") != "0":
        generate_grpc_stubs()
    skip_extension = os.environ.get("MISTRAL_GRPC_SKIP_EXTENSION", "0") == "1"
    setup(
        ext_modules=[] if skip_extension else [extension()],
        cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    )


if __name__ == "__main__":
    main()
