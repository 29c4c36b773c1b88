"""Where the companion's Triton kernels run.

One rule for the whole package: CUDA tensors run compiled Triton kernels on the GPU; without a GPU the
same kernels run under Triton's interpreter (``TRITON_INTERPRET=1``), which executes them with NumPy on
the CPU. The interpreter is chosen when ``triton.jit`` decorates a kernel, so this module must be
imported before any kernel module — ``companion.kernels`` imports it first.

Force either mode with the environment variable ``COMPANION_TRITON``:

* ``auto`` (default): compiled when ``torch.cuda.is_available()``, else interpreted;
* ``compiled``: always compiled (fails without a GPU);
* ``interpret``: always interpreted, even on a GPU machine (slow; useful to debug a kernel).

A process runs in one mode: the decision is taken once, at import.
"""
from __future__ import annotations

import os
import platform

import torch

_CHOICES = ("auto", "compiled", "interpret")


def _decide_mode() -> str:
    requested = os.environ.get("COMPANION_TRITON", "auto").strip().lower()
    if requested not in _CHOICES:
        raise ValueError(f"COMPANION_TRITON={requested!r}; expected one of {', '.join(_CHOICES)}")
    if requested == "auto":
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return "interpret"
        return "compiled" if torch.cuda.is_available() else "interpret"
    if requested == "compiled" and not torch.cuda.is_available():
        raise RuntimeError("COMPANION_TRITON=compiled, but torch sees no CUDA device")
    return requested


MODE: str = _decide_mode()
"""``"compiled"`` or ``"interpret"``: how every companion kernel runs in this process."""

if MODE == "interpret":
    # Read by triton.jit when it decorates a kernel; set it before companion.kernels is imported.
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)

INTERPRET: bool = MODE == "interpret"


def kernel_device() -> torch.device:
    """The device on which tensors for companion kernels should live in this process."""
    return torch.device("cuda" if MODE == "compiled" else "cpu")


def gpu_name() -> str | None:
    """The CUDA device name, or None without a GPU."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour the book's numbers depend on."""
    import numpy

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # triton ships for Linux only
        triton_version = "not installed"
    try:
        import ml_dtypes

        ml_dtypes_version = ml_dtypes.__version__
    except ImportError:
        ml_dtypes_version = "not installed"
    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": triton_version,
        "numpy": numpy.__version__,
        "ml_dtypes": ml_dtypes_version,
        "cuda": torch.version.cuda or "none",
    }


def device_description() -> str:
    """Where kernels run, in words: the GPU and its compute capability, or the CPU interpreter."""
    if MODE == "compiled":
        major, minor = torch.cuda.get_device_capability()
        return f"{gpu_name()} (sm_{major}{minor}), compiled Triton"
    cpu = platform.processor() or platform.machine()
    return f"CPU ({cpu}, {os.cpu_count()} cores), Triton interpreter"


def environment_report() -> str:
    """One line: where kernels run and the versions that matter."""
    v = versions()
    return (
        f"{device_description()} · torch {v['torch']} · triton {v['triton']} · numpy {v['numpy']}"
        f" · ml_dtypes {v['ml_dtypes']} · Python {v['python']}"
    )


def check_tensor(x, name: str, dtypes=None, *, contiguous: bool = True, ndim=None) -> None:
    """Check a kernel argument and say plainly what is wrong with it.

    Raises TypeError for a non-tensor or a wrong dtype, ValueError for a wrong device, rank or layout.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if dtypes is not None and x.dtype not in dtypes:
        allowed = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} has dtype {str(x.dtype).replace('torch.', '')}; expected one of: {allowed}")
    if MODE == "compiled" and x.device.type != "cuda":
        raise ValueError(
            f"{name} is on {x.device}, but kernels run compiled on the GPU in this process; "
            f"move it with .cuda() (or set COMPANION_TRITON=interpret before importing companion)"
        )
    if MODE == "interpret" and x.device.type != "cpu":
        raise ValueError(f"{name} is on {x.device}, but kernels run under the Triton interpreter on the CPU")
    if ndim is not None and x.ndim not in (ndim if isinstance(ndim, tuple) else (ndim,)):
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")
    if contiguous and not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first); got strides {x.stride()}")


# Programs a persistent kernel starts under the interpreter: few, so that each walks several tiles and
# the tests exercise the loop (the interpreter runs programs one after another, so the number costs
# nothing there).
INTERPRETER_PROGRAMS = 3


def persistent_programs(n_tiles: int, per_sm: int) -> int:
    """How many programs to start for a kernel whose programs walk ``n_tiles`` tiles in a strided loop
    (program p takes tiles p, p + P, p + 2P, ...): ``per_sm`` per streaming multiprocessor, or one per
    tile when ``per_sm`` is 0 (and never more programs than tiles)."""
    if per_sm == 0:
        return max(n_tiles, 1)
    if MODE == "interpret":
        return max(min(n_tiles, INTERPRETER_PROGRAMS), 1)
    return max(min(n_tiles, per_sm * torch.cuda.get_device_properties().multi_processor_count), 1)
