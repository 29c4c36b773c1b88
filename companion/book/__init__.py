"""Helpers for the book's notebooks: the environment report, showing tested source, the figure style.

Every chapter begins with::

    from companion.book import setup
    setup()

which applies the figure style and prints where this run's numbers come from.
"""
from __future__ import annotations

import inspect
import textwrap

from companion.book.figures import use_book_style

__all__ = ["setup", "show_source", "use_book_style"]


def setup() -> None:
    """Apply the book's figure style and print the one-line environment report."""
    from companion import runtime  # imported here: `python -m companion.book` sets the device first

    use_book_style()
    print(runtime.environment_report())


def show_source(obj, *, strip_docstring: bool = False):
    """Display the source of a companion function or class as a highlighted code block.

    The book shows the code that the tests check, never a copy of it. With ``strip_docstring`` the
    docstring is left out, for functions whose docstring the surrounding prose already tells.
    Kernels decorated with ``triton.jit`` are shown through the function they wrap.
    """
    from IPython.display import Markdown

    target = getattr(obj, "fn", obj)  # triton.jit wraps the Python function in .fn
    source = textwrap.dedent(inspect.getsource(target))
    if strip_docstring and target.__doc__:
        doc = inspect.getdoc(target)
        for quote in ('"""', "'''"):
            start = source.find(quote)
            end = source.find(quote, start + 3) if start >= 0 else -1
            if start >= 0 and end > start and doc.splitlines()[0] in source[start:end]:
                line_start = source.rfind("\n", 0, start) + 1
                line_end = source.find("\n", end + 3)
                source = source[:line_start] + source[line_end + 1:]
                break
    module = inspect.getmodule(target).__name__
    return Markdown(f"From `{module}`:\n\n```python\n{source.rstrip()}\n```")
