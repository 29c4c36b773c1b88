"""Re-execute the book's notebooks in place, so that their stored outputs are fresh.

    python -m companion.book execute book/                 # every notebook under book/
    python -m companion.book execute book/floats.ipynb     # one chapter
    python -m companion.book execute book/ --device cpu    # force the CPU path on a GPU machine

Each notebook runs top to bottom in a new kernel with its own folder as working directory; a cell that
raises stops that notebook and the command exits non-zero. The device and versions of the run are
recorded in the notebook's metadata under ``companion``, so a reader can tell where stored numbers
came from.
"""
from __future__ import annotations

import datetime
import pathlib
import time


def find_notebooks(paths) -> list[pathlib.Path]:
    """The notebooks named, or found under the folders named, in a stable order."""
    found = []
    for p in map(pathlib.Path, paths):
        if p.is_dir():
            found += [
                q
                for q in sorted(p.rglob("*.ipynb"))
                if ".ipynb_checkpoints" not in q.parts and "_build" not in q.parts
            ]
        elif p.suffix == ".ipynb" and p.exists():
            found.append(p)
        else:
            raise FileNotFoundError(f"{p}: not a notebook or a folder")
    return found


def execute_notebook(path: pathlib.Path, timeout: int, kernel_name: str) -> float:
    """Execute one notebook in place; return the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    from companion import runtime

    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    client = NotebookClient(
        nb, timeout=timeout, kernel_name=kernel_name, resources={"metadata": {"path": str(path.parent)}}
    )
    client.execute()
    seconds = time.perf_counter() - start
    nb.metadata["companion"] = {
        "executed": datetime.date.today().isoformat(),
        "device": runtime.device_description(),
        "seconds": round(seconds, 1),
        **runtime.versions(),
    }
    nbformat.validate(nb)
    nbformat.write(nb, path)
    return seconds
