"""Offline corpus from text installed with Python itself: stdlib code and English documentation prose.

Every machine that can run the trainer has these files, so `data=embedded` works with no network.
Files are visited in sorted order so the corpus is the same on every run of the same Python build.
"""

from __future__ import annotations

import ast
import hashlib
import html
import os
import re
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from html.parser import HTMLParser

from .cache import digest, load_json, save_json

# Test suites are mostly fixtures and deliberately odd code; they would skew the code domain.
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
MIN_PARAGRAPH_CHARS = 200


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def stdlib_files() -> list[str]:
    """Sorted .py paths of the standard library, tests and third-party packages excluded."""
    root = stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def source_signature() -> list:
    """Cheap stand-in for the corpus content: changes whenever the installed stdlib does."""
    root = stdlib_root()
    sig: list = [sys.version, root]
    for path in stdlib_files():
        st = os.stat(path)
        sig.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    help_html = os.path.join(root, "idlelib", "help.html")
    if os.path.exists(help_html):
        sig.append(("idlelib/help.html", os.path.getsize(help_html)))
    return sig


def provenance(kind: str) -> dict:
    info = {
        "origin": f"Python {sys.version.split()[0]} standard library installed at {stdlib_root()}",
        "licence": "PSF-2.0 (Python Software Foundation License)",
        "stdlib_files": len(stdlib_files()),
    }
    if kind == "code":
        info["content"] = "stdlib .py sources (tests excluded), docstrings removed, comments kept"
    else:
        info["content"] = ("pydoc_data.topics (Python reference docs), idlelib/help.html (tags stripped), "
                           f"stdlib docstring paragraphs of >= {MIN_PARAGRAPH_CHARS} characters")
    return info


def _read(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (UnicodeDecodeError, OSError):
        return None


_OWNERS = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)


def _doc_owners(node: ast.AST) -> Iterator[ast.AST]:
    """Modules, classes and functions, found by walking statement lists only.

    Several times faster than ast.walk, which also visits every expression node.
    """
    if isinstance(node, _OWNERS):
        yield node
    for name in ("body", "orelse", "finalbody", "handlers", "cases"):
        for child in getattr(node, name, None) or ():
            if isinstance(child, (ast.stmt, ast.excepthandler, ast.match_case)):
                yield from _doc_owners(child)


def _docstring_expr(owner: ast.AST) -> ast.Expr | None:
    body = owner.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        return body[0]
    return None


def _strip(source: str, owners: list[ast.AST]) -> str:
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()
    only_stmt: dict[int, int] = {}  # first line -> indent, for bodies that would become empty
    for owner in owners:
        node = _docstring_expr(owner)
        if node is None:
            continue
        first, last = node.lineno - 1, node.end_lineno - 1
        # A docstring sharing its line with other code (`def f(): "doc"`) is left alone.
        if lines[first][: node.col_offset].strip() or lines[last][node.end_col_offset:].strip(" \t\r\n;"):
            continue
        drop.update(range(first, last + 1))
        if len(owner.body) == 1 and not isinstance(owner, ast.Module):
            only_stmt[first] = node.col_offset
    out = []
    for i, line in enumerate(lines):
        if i in only_stmt:
            out.append(" " * only_stmt[i] + "pass\n")  # keeps the sample valid Python
        elif i not in drop:
            out.append(line)
    return "".join(out)


def strip_docstrings(source: str) -> str | None:
    """Drop the lines of every docstring; None if the file does not parse."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return None
    return _strip(source, list(_doc_owners(tree)))


def _scan_file(path: str) -> tuple[str, str]:
    """(source without docstrings, docstring paragraphs as one document); empty strings if unusable."""
    text = _read(path)
    if not text:
        return "", ""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return "", ""
    owners = list(_doc_owners(tree))
    paras = []
    for owner in owners:
        doc = ast.get_docstring(owner, clean=True)
        if doc:
            paras.extend(_paragraphs(doc))
    code = _strip(text, owners)
    return (code if code.strip() else ""), "\n\n".join(paras)


_scanned: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {}  # per process, whatever the cache_dir


def scan_stdlib(cache_dir: str | None = None) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """Stripped sources and docstring documents of every stdlib file, in file order.

    Parsing 12 MB of Python takes seconds, so both domains come from one pass, kept on disk keyed by
    the installed stdlib and this module's code; later builds (any seed or tokenizer) read it back.
    """
    with open(__file__, "rb") as f:
        key = digest(source_signature(), hashlib.sha256(f.read()).hexdigest())
    if key in _scanned:
        return _scanned[key]
    path = os.path.join(cache_dir, "text", f"stdlib-{key}.json") if cache_dir else None
    if path and os.path.exists(path):
        code, prose = load_json(path)
    else:
        results = [_scan_file(p) for p in stdlib_files()]
        code = [c for c, _ in results if c]
        prose = [d for _, d in results if d]
        if path:
            save_json(path, [code, prose])
    _scanned[key] = (tuple(code), tuple(prose))
    return _scanned[key]


def code_documents(cache_dir: str | None = None) -> Iterator[str]:
    yield from scan_stdlib(cache_dir)[0]


def _paragraphs(text: str) -> list[str]:
    """Blank-line separated paragraphs with hard wraps joined.

    Indented blocks (code samples, grammar rules), doctests and column-aligned parameter tables are
    dropped: they are not prose, and the code domain already covers code.
    """
    out = []
    for para in re.split(r"\n\s*\n", textwrap.dedent(text.expandtabs())):
        lines = [line for line in para.splitlines() if line.strip()]
        if not lines or lines[0][:1] == " " or ">>>" in para:
            continue
        if sum(bool(re.search(r"\S {3,}\S", line.strip())) for line in lines) * 3 >= len(lines):
            continue
        flat = " ".join(line.strip() for line in lines)
        if flat.endswith("::"):
            flat = flat[:-1]
        if len(flat) >= MIN_PARAGRAPH_CHARS:
            out.append(flat)
    return out


class _TextOfHTML(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "head"):
            self._skip += 1
        elif tag in ("p", "div", "br", "li", "h1", "h2", "h3", "h4", "pre", "dt", "dd", "section"):
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style", "head") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _idle_help_text() -> str:
    path = os.path.join(stdlib_root(), "idlelib", "help.html")
    raw = _read(path) if os.path.exists(path) else None
    if not raw:
        return ""
    parser = _TextOfHTML()
    parser.feed(raw)
    return html.unescape("".join(parser.parts))


def prose_documents(cache_dir: str | None = None) -> Iterator[str]:
    """Reference topics, the IDLE manual, then per-module docstrings.

    Paragraphs are deduplicated across the whole domain: reference topics nest (a section's text reappears
    in its parent topic) and pure-Python fallbacks repeat their C twins' docstrings, so whole-document
    deduplication alone would let eval paragraphs leak into training.
    """
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distro builds split pydoc_data out
        topics = {}
    seen: set[str] = set()

    def fresh(paras: list[str]) -> str:
        kept = [p for p in paras if p not in seen]
        seen.update(kept)
        return "\n\n".join(kept)

    docs = [fresh(_paragraphs(topics[key])) for key in sorted(topics)]
    docs.append(fresh(_paragraphs(_idle_help_text())))
    docs.extend(fresh(doc.split("\n\n")) for doc in scan_stdlib(cache_dir)[1])
    yield from (d for d in docs if d)
