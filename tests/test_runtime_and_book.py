"""The dispatch module, the notebook helpers and the re-execute command."""
import json
import os
import subprocess
import sys

import nbformat
import pytest
import torch

from companion import runtime
from companion.book import show_source
from companion.book.execute import find_notebooks


def test_mode_matches_the_machine():
    forced = os.environ.get("COMPANION_TRITON", "auto")
    if forced == "auto":
        assert runtime.MODE == ("compiled" if torch.cuda.is_available() else "interpret")
    assert runtime.INTERPRET == (os.environ.get("TRITON_INTERPRET") == "1")
    assert runtime.kernel_device().type == ("cuda" if runtime.MODE == "compiled" else "cpu")


def test_environment_report_names_device_and_versions():
    line = runtime.environment_report()
    assert "\n" not in line
    for key in ("torch", "triton", "numpy", "Python"):
        assert key in line
    assert ("Triton interpreter" in line) == runtime.INTERPRET


def _child(code: str, **env):
    """Run code in a fresh interpreter (the mode is decided once per process)."""
    full_env = {**os.environ, **env}
    full_env.pop("TRITON_INTERPRET", None)
    return subprocess.run([sys.executable, "-c", code], env=full_env, capture_output=True, text=True)


def test_forcing_the_interpreter_and_rejecting_bad_values():
    done = _child("from companion import runtime; print(runtime.MODE)", COMPANION_TRITON="interpret")
    assert done.returncode == 0 and done.stdout.strip() == "interpret"
    bad = _child("import companion.runtime", COMPANION_TRITON="fast")
    assert bad.returncode != 0 and "expected one of auto, compiled, interpret" in bad.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_forcing_compiled_without_gpu_is_a_clear_error():
    done = _child("import companion.runtime", COMPANION_TRITON="compiled")
    assert done.returncode != 0 and "no CUDA device" in done.stderr


def test_check_tensor_messages():
    x = torch.zeros(2, 3, device=runtime.kernel_device())
    runtime.check_tensor(x, "x", (torch.float32,), ndim=2)
    with pytest.raises(ValueError, match="must have 1 dimensions"):
        runtime.check_tensor(x, "x", ndim=1)
    with pytest.raises(TypeError, match="expected one of: bfloat16"):
        runtime.check_tensor(x, "x", (torch.bfloat16,))


def test_show_source_renders_the_tested_code():
    shown = show_source(runtime.kernel_device)._repr_markdown_()
    assert shown.startswith("From `companion.runtime`:")
    assert "def kernel_device() -> torch.device:" in shown and "```python" in shown
    stripped = show_source(runtime.kernel_device, strip_docstring=True)._repr_markdown_()
    assert "The device on which" not in stripped and "def kernel_device" in stripped


def test_show_source_of_a_triton_kernel():
    from companion.kernels import round_bf16

    shown = show_source(round_bf16._round_to_bf16_kernel)._repr_markdown_()
    assert "def _round_to_bf16_kernel(" in shown and "@triton.jit" in shown


def test_execute_command_runs_a_notebook_in_place(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.cells = [nbformat.v4.new_code_cell("from companion import runtime\nprint(6 * 7)")]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(nb, path)
    done = subprocess.run([sys.executable, "-m", "companion.book", "execute", str(tmp_path), "--device", "cpu"],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    stored = json.loads(path.read_text())
    assert "".join(stored["cells"][0]["outputs"][0]["text"]) == "42\n"
    assert stored["cells"][0]["execution_count"] == 1
    assert "Triton interpreter" in stored["metadata"]["companion"]["device"]


def test_execute_command_fails_on_an_error(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell("raise ValueError('broken chapter')")]
    nbformat.write(nb, tmp_path / "broken.ipynb")
    done = subprocess.run([sys.executable, "-m", "companion.book", "execute", str(tmp_path / "broken.ipynb")],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 1 and "broken chapter" in done.stderr


def test_find_notebooks_refuses_what_is_not_a_notebook(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a notebook"):
        find_notebooks([tmp_path / "missing.txt"])
