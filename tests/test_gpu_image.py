"""The GPU image has torch and transformers but not deepspeed, flash-attn, matplotlib, pynvml or hypothesis:
everything `spbench gpu-check` runs must import and work without them (DeepSpeed only when ZeRO is asked)."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MISSING = ("deepspeed", "flash_attn", "matplotlib", "pynvml", "hypothesis")

SCRIPT = f"""
import sys
for name in {MISSING!r}:
    sys.modules[name] = None  # import fails, as when not installed
import spbench.cli.gpu_check, spbench.cli.parity, spbench.cli.check_attention  # noqa
import spbench.memory.probe, spbench.memory.distprobe, spbench.check.parity  # noqa
from spbench import report
path = report.render([sys.argv[1]], sys.argv[2])
assert "Plots skipped: matplotlib is not installed" in path.read_text()
from runtime.attention.kernels import KernelError, select_kernel
import torch
try:
    select_kernel("flash-attn", torch.device("cuda"), torch.bfloat16)
except KernelError as e:
    assert "pip install" in str(e)
else:
    raise AssertionError("flash-attn selected without the package")
print("ok")
"""


def test_gpu_check_code_paths_need_no_optional_packages(tmp_path):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(REPO / "spbench/suites/golden/ci.json"), str(tmp_path / "rep")],
                       cwd=REPO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-2000:]
