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

import argparse
import datetime
import os
import pathlib
import sys
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.book", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("execute", help="re-execute notebooks in place")
    run.add_argument("paths", nargs="+", help="notebooks or folders holding them")
    run.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto",
                     help="auto: the GPU when there is one; cpu: hide the GPU; gpu: fail without one")
    run.add_argument("--timeout", type=int, default=1200, help="seconds allowed per cell")
    run.add_argument("--kernel", default="python3", help="Jupyter kernel name")
    bench = sub.add_parser("bench", help="run a GPU benchmark and store its results under book/data/")
    bench.add_argument("names", nargs="+", help="benchmarks to run (ceilings, ...)")
    args = parser.parse_args(argv)

    if args.command == "bench":
        from companion.book import bench as benchmarks

        for name in args.names:
            if name not in benchmarks.BENCHMARKS:
                parser.error(f"unknown benchmark {name!r}; known: {', '.join(benchmarks.BENCHMARKS)}")
            path = benchmarks.save(name, benchmarks.BENCHMARKS[name]())
            print(f"{name}: written to {path}", flush=True)
        return 0

    # The kernels inherit this process's environment; set it before companion.runtime decides.
    if args.device == "cpu":
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        os.environ["COMPANION_TRITON"] = "interpret"
    elif args.device == "gpu":
        os.environ["COMPANION_TRITON"] = "compiled"

    failures = 0
    for path in find_notebooks(args.paths):
        print(f"executing {path} ...", flush=True)
        try:
            seconds = execute_notebook(path, args.timeout, args.kernel)
        except Exception as error:  # report every failing notebook, then fail
            failures += 1
            print(f"  FAILED: {type(error).__name__}: {str(error)[-2000:]}", file=sys.stderr, flush=True)
        else:
            print(f"  done in {seconds:.1f} s", flush=True)
    return 1 if failures else 0
