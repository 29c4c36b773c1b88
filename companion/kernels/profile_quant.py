"""What Nsight Compute sees in each quantization kernel: where its time goes, in a few hardware counters.

A kernel below the copy rate is short of one of two things: bytes in flight (the memory system is not
kept busy: low DRAM throughput with idle issue slots) or instruction issue (the schedulers are busy every
cycle and DRAM waits for them). Five counters tell them apart, per launched kernel:

* ``dram_pct``: DRAM throughput, percent of its peak, over the kernel's run;
* ``issue_active_pct``: percent of active cycles in which a warp scheduler issued an instruction;
* ``instructions_per_element``: warp instructions executed times 32 lanes, per input element — the
  arithmetic a kernel spends on each number;
* ``registers`` per thread and ``occupancy_pct``, the warps resident per SM as a percent of the maximum.

Each kernel is profiled in its own process under ``ncu`` on one call (after warm-up) on an 8192 x 8192
bf16 input. Nsight Compute fixes the clocks at their base values while it measures, so its durations are
longer than the benchmark's; the ratios are what to read.

    python -m companion.book bench quant_profile      # -> book/data/quant_profile.json (needs ncu)
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import subprocess
import sys

M = K = 8192
METRICS = {
    "gpu__time_duration.sum": "duration_us",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "smsp__issue_active.avg.pct_of_peak_sustained_active": "issue_active_pct",
    "smsp__inst_executed.sum": "instructions",
    "launch__registers_per_thread": "registers",
    "sm__warps_active.avg.pct_of_peak_sustained_active": "occupancy_pct",
}


_MICROSECONDS_PER = {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3}


def _ncu() -> str:
    found = shutil.which("ncu") or next(
        (p for p in ("/usr/local/cuda/bin/ncu", "/opt/nvidia/nsight-compute/ncu") if os.path.exists(p)), None)
    if found is None:
        raise RuntimeError("the quantization profile needs Nsight Compute's `ncu` on the PATH "
                           "(or in /usr/local/cuda/bin)")
    return found


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def parse_ncu_csv(text: str) -> list[dict]:
    """ncu's ``--csv`` output (one row per kernel and metric) -> one dict per launched kernel, in order."""
    lines = [line for line in text.splitlines() if line.startswith('"')]
    kernels: dict[str, dict] = {}
    for row in csv.DictReader(io.StringIO("\n".join(lines))):
        entry = kernels.setdefault(row["ID"], {"kernel": row["Kernel Name"].split("(")[0].strip()})
        name, unit, value = METRICS.get(row["Metric Name"]), row["Metric Unit"], _number(row["Metric Value"])
        if name == "duration_us":
            if unit not in _MICROSECONDS_PER:
                raise ValueError(f"unexpected unit {unit!r} for {row['Metric Name']}")
            value *= _MICROSECONDS_PER[unit]
        if name is not None:
            entry[name] = value
    return list(kernels.values())


def measure_quant_profile() -> dict:
    """Every kernel of the quantization benchmark, profiled; per launched kernel the counters above."""
    import torch

    from companion.book import bench
    from companion.kernels.bench_quant import _kernels

    if not torch.cuda.is_available():
        raise RuntimeError("the quantization profile needs a CUDA GPU")
    ncu = _ncu()
    names = list(_kernels(torch.zeros(1, 1, device="cuda", dtype=torch.bfloat16)))
    results = {}
    for name in names:
        run = subprocess.run(
            [ncu, "--csv", "--profile-from-start", "off", "--metrics", ",".join(METRICS),
             sys.executable, "-m", "companion.kernels.profile_quant", name],
            capture_output=True, text=True, timeout=600)
        launches = parse_ncu_csv(run.stdout)
        if run.returncode != 0 or not launches:
            raise RuntimeError(f"ncu failed on {name} (exit {run.returncode}): {(run.stderr or run.stdout)[-1500:]}")
        for launch in launches:
            launch["instructions_per_element"] = launch.pop("instructions") * 32 / (M * K)
        results[name] = launches
    return {"environment": bench.environment(), "results": {"shape": [M, K], "kernels": results}}


def _profiled_call(name: str) -> None:
    """One call of the named kernel inside the profiler's range, after warm-up (run under ncu)."""
    import torch

    from companion.kernels.bench_quant import _kernels, random_input

    x = random_input(M, K)
    fn = _kernels(x)[name]
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStart()
    fn(x)
    torch.cuda.synchronize()
    torch.cuda.cudart().cudaProfilerStop()


if __name__ == "__main__":
    _profiled_call(sys.argv[1])
