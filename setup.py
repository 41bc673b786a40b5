"""Packaging for hpt-fast.

The C++ extension ``hpt_fast._C`` (the "cpu" backend) is built by CMake (CMakeLists.txt) against
the torch installed in the building interpreter, hence ``pip install --no-build-isolation``. A
failed build is not fatal: the package then works with the torch backend only.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeBuild(build_ext):
    """Builds each extension with CMake; on failure warns and leaves the extension out."""

    def build_extension(self, ext: Extension) -> None:
        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        try:
            self._run_cmake(target)
        except (OSError, subprocess.CalledProcessError) as err:
            print(
                f"\nWARNING: building {ext.name} failed ({err}).\n"
                "hpt_fast will work without it, using the torch backend instead of the cpu one.\n"
                "To get it: a C++17 compiler, cmake and torch in the building environment, then\n"
                "    pip install --no-build-isolation -e .\n",
                file=sys.stderr,
            )

    def _run_cmake(self, target: Path) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            raise OSError("cmake not found on PATH")
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        configure = [
            cmake,
            "-S", str(ROOT),
            "-B", str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DHPT_OUTPUT_DIR={target.parent}",
            "-DCMAKE_BUILD_TYPE=Release",
        ]
        already_configured = (build_dir / "CMakeCache.txt").exists()
        if not already_configured and "CMAKE_GENERATOR" not in os.environ and shutil.which("ninja"):
            configure += ["-G", "Ninja"]
        subprocess.run(configure, check=True)
        subprocess.run(
            [cmake, "--build", str(build_dir), "--parallel", str(os.cpu_count() or 1)], check=True
        )
        if not target.exists():
            raise OSError(f"CMake finished but {target} was not produced")


setup(
    name="hpt-fast",
    version="0.1.0",
    description="Fused linear + log-prob / entropy op for LLM post-training",
    python_requires=">=3.10",
    packages=["hpt_fast", "hpt_fast.backends", "hpt_fast.rollout", "hpt_fast.kernels"],
    package_dir={"hpt_fast.kernels": "kernels"},
    ext_modules=[Extension("hpt_fast._C", sources=[], optional=True)],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=[
        # transformers 5's model classes refuse torch before 2.6
        "torch>=2.6",
        "numpy",
        "tqdm",
        "pyyaml",
        "safetensors",
        "transformers>=5.0",
        "pyarrow",
        "tokenizers",
        "deepspeed",
        # transformers' DeepSpeed ZeRO-3 loading (zero.Init in from_pretrained) imports it
        "accelerate>=1.1",
        "math-verify",
    ],
    extras_require={
        # liger-kernel: the trainer's Liger patch is tested through its real API
        # TRL: hpt_fast.trl_head patches a private name of it, tested against this version
        # peft: patch_causal_lm_loss under LoRA, tested against this version
        "test": ["pytest", "pytest-benchmark", "triton", "matplotlib", "liger-kernel",
                 "trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0", "peft==0.21.2"],
        # TRL and what it needs, pinned to the versions bench/step_time_vs_trl.py was measured with
        "bench": ["pytest-benchmark", "liger-kernel", "cut-cross-entropy", "triton",
                  "trl==1.16.0", "accelerate==1.15.0", "datasets==5.2.0"],
        "gpu": ["triton", "liger-kernel"],
        "vllm": ["vllm"],
        "plot": ["matplotlib"],
        "tensorboard": ["tensorboard"],
    },
    zip_safe=False,
)
