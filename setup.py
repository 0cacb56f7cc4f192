"""Build script for fused_ce.

The C++/CUDA extension ``fused_ce._C`` is built from ``csrc/``:

* ``csrc/ops.cpp`` defines the op schemas (once, for every backend);
* ``csrc/cpu/`` holds the CPU kernels, compiled once per x86 instruction set
  (baseline, AVX2, AVX-512) and chosen at run time, like ATen's own kernels;
* ``csrc/cuda/`` holds the CUDA kernels, compiled whenever torch is a CUDA build
  and nvcc is found -- with or without a visible GPU.

Environment variables:

* ``FUSED_CE_CUDA``: ``auto`` (default), ``1`` (require the CUDA kernels: fail if
  they cannot be built) or ``0`` (CPU-only build).
* ``TORCH_CUDA_ARCH_LIST``: the GPU architectures to compile for. When it is unset
  and no GPU is visible, ``8.0;9.0+PTX`` is used.
* ``CUDA_HOME``: the CUDA toolkit; found automatically when unset.
* ``FUSED_CE_SANITIZE``: ``1`` builds the CPU code with AddressSanitizer and
  UndefinedBehaviorSanitizer (for ``bench/sanitize_cpu.sh``).
* ``MAX_JOBS``: parallel compile jobs (ninja).
"""

import contextlib
import glob
import os
import pathlib
import platform
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _is_cuda_toolkit(path):
    return bool(path) and os.path.isfile(os.path.join(path, "bin", "nvcc")) and os.path.isfile(
        os.path.join(path, "include", "cuda_runtime.h")
    )


def find_cuda_home():
    """Locate the CUDA toolkit itself.

    torch guesses CUDA_HOME from the ``nvcc`` on PATH, which is wrong when that
    ``nvcc`` is a wrapper script (it is on the development machines), so look for
    a directory that really holds ``bin/nvcc`` and the runtime headers.
    """
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.realpath(nvcc)
        candidates.append(os.path.dirname(os.path.dirname(real)))
        # A wrapper script that execs the real compiler: read the path out of it.
        try:
            with open(real, "rb") as f:
                head = f.read(4096)
            if head.startswith(b"#!"):
                for token in head.decode(errors="ignore").split():
                    if token.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(token)))
        except OSError:
            pass
    candidates.append("/usr/local/cuda")
    candidates.extend(sorted(glob.glob("/usr/local/cuda-*"), reverse=True))
    for path in candidates:
        if _is_cuda_toolkit(path):
            return os.path.realpath(path)
    return None


def cuda_mode():
    mode = os.environ.get("FUSED_CE_CUDA", "auto").strip().lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"FUSED_CE_CUDA must be 'auto', '0' or '1', got {mode!r}")
    return mode


CUDA_HOME = None
if cuda_mode() != "0":
    CUDA_HOME = find_cuda_home()
    if CUDA_HOME:
        # Must be set before torch.utils.cpp_extension is imported: it reads it once.
        os.environ["CUDA_HOME"] = CUDA_HOME

import torch  # noqa: E402
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def want_cuda():
    mode = cuda_mode()
    if mode == "0":
        return False
    reasons = []
    if torch.version.cuda is None:
        reasons.append(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None:
        reasons.append("no CUDA toolkit (bin/nvcc) was found; set CUDA_HOME")
    if reasons:
        if mode == "1":
            sys.exit("FUSED_CE_CUDA=1 but the CUDA kernels cannot be built: " + "; ".join(reasons))
        print("fused_ce: building CPU-only: " + "; ".join(reasons), file=sys.stderr)
        return False
    return True


def is_x86():
    return platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")


# One object per x86 instruction set, chosen at run time (see csrc/cpu/dispatch.cpp).
# The flags match those ATen compiles its own per-capability kernels with.
CPU_ISAS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mlzcnt"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c"],
}


# The CPU kernel files compiled once per instruction set (csrc/cpu/<name>.cpp).
CPU_KERNEL_SOURCES = ("kernels", "distill")


class BuildWithCpuIsas(BuildExtension):
    """torch's BuildExtension, plus the CPU kernels compiled once per instruction set.

    setuptools cannot give one source file its own flags, so the per-ISA kernel
    objects are compiled here and linked in as extra objects. They come after the
    extension's own objects on the link line, so for inline functions of shared
    headers the linker keeps the baseline copy (the first one it sees).
    """

    def build_extension(self, ext):
        isas = list(CPU_ISAS) if is_x86() else ["DEFAULT"]
        base = list(ext.extra_compile_args["cxx"]) if isinstance(ext.extra_compile_args, dict) else list(
            ext.extra_compile_args
        )
        macros = [f"-D{k}" if v is None else f"-D{k}={v}" for k, v in ext.define_macros]
        for isa in isas:
            flags = base + macros + [f"-DCPU_CAPABILITY={isa}", f"-DCPU_CAPABILITY_{isa}"] + CPU_ISAS[isa]
            out_dir = os.path.join(self.build_temp, f"isa_{isa.lower()}")
            # The same source, compiled under another name per ISA so the objects differ.
            src_dir = os.path.join(self.build_temp, "isa_sources")
            os.makedirs(src_dir, exist_ok=True)
            sources = []
            for name in CPU_KERNEL_SOURCES:
                src = os.path.join(src_dir, f"{name}_{isa.lower()}.cpp")
                text = f'#include "{os.path.join(ROOT, "csrc", "cpu", name + ".cpp")}"\n'
                if not os.path.exists(src) or pathlib.Path(src).read_text() != text:
                    pathlib.Path(src).write_text(text)
                sources.append(src)
            objects = self.compiler.compile(
                sources,
                output_dir=out_dir,
                include_dirs=ext.include_dirs,
                extra_postargs={"cxx": flags, "nvcc": []},
                depends=glob.glob(os.path.join(ROOT, "csrc", "**", "*.h"), recursive=True)
                + [os.path.join(ROOT, "csrc", "cpu", name + ".cpp") for name in CPU_KERNEL_SOURCES],
            )
            ext.extra_objects.extend(objects)
        super().build_extension(ext)


def extension():
    with_cuda = want_cuda()
    sanitize = os.environ.get("FUSED_CE_SANITIZE", "0") == "1"
    # No -std: torch's build adds the standard its headers need (C++17 up to 2.9, C++20 since)
    cxx = ["-O3", "-fopenmp", "-fno-math-errno", "-Wno-unknown-pragmas"]
    link = ["-fopenmp"]
    if sanitize:
        san = ["-fsanitize=address,undefined", "-fno-omit-frame-pointer", "-fno-sanitize-recover=undefined"]
        cxx = ["-O1", "-g", "-fopenmp"] + san
        link += san
    sources = ["csrc/ops.cpp", "csrc/cpu/dispatch.cpp"]
    include_dirs = [os.path.join(ROOT, "csrc")]
    macros = []
    if with_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp"))
        nvcc = [
            "-O3",
            # IEEE math but for exp (see csrc/common/ce_math.h), no FMA contraction.
            "--fmad=false",
            "--expt-relaxed-constexpr",
            "-lineinfo",
            # ATen defines these for its own CUDA code; a plain extension must not,
            # or the half/bfloat16 operators clash with cuda_fp16/cuda_bf16.
            "-U__CUDA_NO_HALF_OPERATORS__",
            "-U__CUDA_NO_HALF_CONVERSIONS__",
            "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
            "-U__CUDA_NO_HALF2_OPERATORS__",
        ]
        macros.append(("FUSED_CE_WITH_CUDA", None))
        return CUDAExtension(
            "fused_ce._C",
            sources,
            include_dirs=include_dirs,
            define_macros=macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc},
            extra_link_args=link,
        )
    return CppExtension(
        "fused_ce._C",
        sources,
        include_dirs=include_dirs,
        define_macros=macros,
        extra_compile_args={"cxx": cxx},
        extra_link_args=link,
    )


def default_arch_list():
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return
    visible = False
    with contextlib.suppress(Exception):  # no driver: the same as no GPU
        visible = torch.cuda.is_available()
    if not visible:
        os.environ["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0+PTX"


default_arch_list()

# Metadata, dependencies and the version live in pyproject.toml; this file only
# describes the extension, whose flags depend on the toolchain found.
setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithCpuIsas.with_options(no_python_abi_suffix=True)},
)
