"""The maintainer's commands: ``python -m companion.book execute ...`` and ``... bench ...``.

    python -m companion.book execute book/                 # re-execute every notebook in place
    python -m companion.book execute book/ --device cpu    # force the CPU path on a GPU machine
    python -m companion.book bench ceilings quant_kernels  # GPU benchmarks -> book/data/*.json
"""
import argparse
import os
import sys

from companion.book.execute import execute_notebook, find_notebooks


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m companion.book", description=__doc__.splitlines()[0])
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


if __name__ == "__main__":
    sys.exit(main())
