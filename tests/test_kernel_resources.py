"""The Triton kernels compile for A100 (sm_80) and H100/H200 (sm_90) at the launch settings
kdkit uses, for float32 and bf16 (autocast) feature maps, without spilling registers or
exceeding shared memory: checked ahead of time, no GPU needed (a spilling kernel would miss
the speed targets by a wide margin)."""

import os
import subprocess
import sys

import pytest

from kdkit import kernels


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        return os.path.isfile(get_ptxas(90).path)
    except Exception:  # no Triton, or a wheel without the NVIDIA backend
        return False


@pytest.mark.skipif(not kernels.triton_available() or not _nvidia_backend(),
                    reason="needs Triton with its NVIDIA backend (ptxas)")
def test_kernels_compile_for_sm80_and_sm90_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "kdkit.kernels.resources", "--arch", "80", "90",
         "--inputs", "fp32", "bf16", "--check"],
        capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line for line in result.stdout.splitlines() if line.startswith("| sm_")]
    assert len(rows) == 80  # 20 launch variants per architecture and input dtype
    assert all(line.endswith("| none |") for line in rows)
