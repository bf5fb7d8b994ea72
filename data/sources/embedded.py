"""Offline corpus from text installed on every machine that runs the trainer: stdlib code and English prose.

Code is the standard library's own source. Prose is the Python documentation shipped with the interpreter
first, then the docstrings of this project's own runtime dependencies (transformers, torch, numpy, ...), which
any install of the project brings along, so `data=embedded` works with no network.
Files are visited in sorted order so the corpus is the same on every run of the same installation.
"""

from __future__ import annotations

import ast
import hashlib
import html
import importlib.metadata
import importlib.util
import os
import re
import sys
import sysconfig
import textwrap
from collections.abc import Iterator
from html.parser import HTMLParser
from inspect import cleandoc

from ..cache import digest, load_json, save_json

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


def provenance(kind: str, used: dict | None = None) -> dict:
    """Where a domain's text came from. For prose, `used` (filled by prose_documents) names the sources reached."""
    info = {
        "origin": f"Python {sys.version.split()[0]} standard library installed at {stdlib_root()}",
        "licence": "PSF-2.0 (Python Software Foundation License)",
        "stdlib_files": len(stdlib_files()),
    }
    if kind == "code":
        info["content"] = "stdlib .py sources (tests excluded), docstrings removed, comments kept"
        return info
    info["content"] = ("pydoc_data.topics (Python reference docs), idlelib/help.html (tags stripped), "
                       f"stdlib docstring paragraphs of >= {MIN_PARAGRAPH_CHARS} characters, then docstrings "
                       "and module-level documentation of the project's installed dependencies (code, doctests, "
                       "parameter heads and markup removed; paragraphs deduplicated across the domain)")
    used = used if used is not None else {STDLIB_SOURCE: None}
    sources = []
    if STDLIB_SOURCE in used:
        sources.append({"name": STDLIB_SOURCE, "version": sys.version.split()[0], "licence": info["licence"],
                        "files": info["stdlib_files"], "documents": used[STDLIB_SOURCE]})
    for module, distribution, licence in DEPENDENCIES:
        if module in used:
            sources.append({"name": module, "distribution": distribution, "version": package_version(distribution),
                            "licence": licence, "declared_licence": _declared_licence(distribution),
                            "root": package_root(module), "files": len(package_files(module)),
                            "documents": used[module]})
    info["sources"] = sources
    if len(sources) > 1:
        info["origin"] += " and the site-packages of " + ", ".join(
            f"{s['name']} {s['version']}" for s in sources[1:])
        info["licence"] = "; ".join(f"{s['name']}: {s['licence']}" for s in sources)
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


# --- Dependency docstrings -------------------------------------------------------------------------------------
# The project's own runtime dependencies, in the fixed order their prose joins the domain (after the stdlib's).
# (import name, distribution name, licence of the package as published). Only .py files are read, with `ast`;
# nothing is imported. Vendored trees are skipped: their code carries other projects' licences.
# Cheap, well-written packages come first so a moderate data.size_mb parses little; torch's own required
# dependencies (networkx, sympy) come last, after the project's direct ones.
DEPENDENCIES = (
    ("numpy", "numpy", "BSD-3-Clause"),
    ("huggingface_hub", "huggingface_hub", "Apache-2.0"),
    ("hydra", "hydra-core", "MIT"),
    ("omegaconf", "omegaconf", "BSD-3-Clause"),
    ("tqdm", "tqdm", "MPL-2.0 AND MIT"),
    ("tokenizers", "tokenizers", "Apache-2.0"),
    ("safetensors", "safetensors", "Apache-2.0"),
    ("wandb", "wandb", "MIT"),
    ("torch", "torch", "BSD-3-Clause"),
    ("transformers", "transformers", "Apache-2.0"),
    ("networkx", "networkx", "BSD-3-Clause"),
    ("sympy", "sympy", "BSD-3-Clause"),
)
_DEP_SKIP_DIRS = {"test", "tests", "testing", "_testing", "vendor", "_vendor", "vendored", "third_party",
                  "__pycache__"}
STDLIB_SOURCE = "python-stdlib"


def package_root(module: str) -> str | None:
    """Directory of an installed top-level package, found without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    locations = list(spec.submodule_search_locations or []) if spec else []
    return sorted(locations)[0] if locations else None


def package_version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def package_files(module: str) -> list[str]:
    """Sorted .py paths of a package; only regular sub-packages (with __init__.py), tests and vendored code excluded."""
    root = package_root(module)
    if root is None:
        return []
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _DEP_SKIP_DIRS
                             and os.path.exists(os.path.join(dirpath, d, "__init__.py")))
        out.extend(os.path.join(dirpath, f) for f in sorted(filenames) if f.endswith(".py"))
    return out


def _package_signature(module: str, distribution: str) -> list:
    root = package_root(module)
    files = []
    for path in package_files(module):
        st = os.stat(path)
        files.append((os.path.relpath(path, root), st.st_size, st.st_mtime_ns))
    return [module, package_version(distribution), root, files]


def dependency_signature() -> list:
    """Which dependencies are installed, at which version, and a cheap stand-in for their files' content."""
    sig = []
    for module, distribution, _ in DEPENDENCIES:
        pkg = _package_signature(module, distribution)
        sig.append([module, pkg[1], len(pkg[3]), digest(pkg[3])])
    return sig


def _declared_licence(distribution: str) -> str | None:
    """The licence the installed distribution declares in its metadata (for the record; the table decides)."""
    try:
        meta = importlib.metadata.metadata(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None
    for value in (meta.get("License-Expression"), meta.get("License")):
        if value and value.strip() and value.strip().upper() != "UNKNOWN":
            return value.strip().splitlines()[0][:80]
    classifiers = [c.rsplit("::", 1)[-1].strip() for c in meta.get_all("Classifier") or [] if "License ::" in c]
    return ", ".join(classifiers) or None


def _module_code_hash() -> str:
    with open(__file__, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


_ROLE = re.compile(r":[\w:.+-]+:`([^`]*)`")
_TARGET = re.compile(r"\[`([^`\]]*)`\]")  # transformers' [`~utils.ModelOutput`] cross-references
_MD_LINK = re.compile(r"\[([^\]\n]+)\]\([^)\s]*\)")
_RST_LINK = re.compile(r"`([^`<]+?)\s*<[^>`]+>`_{1,2}")
_SECTION = re.compile(
    r"(?i:args|arguments|parameters|params|other parameters|keyword args|keyword arguments|kwargs|returns?|"
    r"return type|rtype|yields?|raises|exceptions?|examples?|example usage|usage|notes?|see also|attributes|"
    r"warnings?|references|shape|inputs?|outputs?|methods|todo|tip|type|properties)\s*:*")
_GOOGLE_PARAM = re.compile(r"`{0,2}(\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*)`{0,2}\s*(\(.*?\))?\s*:\s*(.*)")
_NUMPY_PARAM = re.compile(r"\*{0,2}\w+(?:\s*,\s*\*{0,2}\w+)*\s+:(?:\s.*)?")
_FIELD = re.compile(r":(\w+)(?:\s[^:]*)?:\s*(.*)")  # :param x: ..., :returns: ..., :rtype: ...
_RULE = re.compile(r"[-=~^*#+`'\"]{3,}|[-=+| ]*[-=]{3,}[-=+| ]*")
_TAG_LINE = re.compile(r"</?[A-Za-z][\w-]*(?:\s[^<>]*)?/?>")
_ADMONITIONS = {"note", "warning", "seealso", "tip", "important", "caution", "attention", "danger", "hint",
                "admonition"}
_CODE_START = re.compile(r"(?:def |class |import |from \S+ import |return\b|raise |assert |yield |@\w|print\(|"
                         r"for .+ in .+:$|if .+:$|elif |else:|try:|except\b|with .+:$|\$ |pip install |[#}\]{)])")
_ASSIGN = re.compile(r"[\w.\[\]'\"]+\s*(?:[-+*/]?=)[^=]")
_STOPWORDS = frozenset("the a an of to is in and for this that be it with as are if by or on not can will from "
                       "which when an its their at was has have should must may all any each".split())


def _codeish(line: str) -> bool:
    """A line that reads as code, not as a sentence (inline `code` spans count as one word)."""
    s = re.sub(r"`[^`]*`", "x", line.strip())
    if not s:
        return False
    if _CODE_START.match(s) or _ASSIGN.match(s):
        return True
    symbols = sum(not (c.isalpha() or c.isspace()) for c in s)
    return symbols > 0.25 * len(s)


def _shorten(target: str) -> str:
    """`~a.b.C` -> C, `a.b.C` -> a.b.C, `text <target>` -> text: what the rendered documentation shows."""
    target = target.strip()
    if "<" in target and target.endswith(">"):
        return target[: target.index("<")].strip()
    if target.startswith("~"):
        return target[1:].rsplit(".", 1)[-1]
    return target.lstrip("!")


def _clean_inline(text: str) -> str:
    text = _ROLE.sub(lambda m: _shorten(m.group(1)), text)
    text = _TARGET.sub(lambda m: _shorten(m.group(1)), text)
    text = _RST_LINK.sub(r"\1", text)
    text = _MD_LINK.sub(r"\1", text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"`([^`]+)`_{0,2}", r"\1", text)
    text = re.sub(r"(?<![\w*])\*\*(\S|\S[^*]*?\S)\*\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w*\\])\*([^*\s][^*]*?)\*(?![\w*])", r"\1", text)
    text = text.replace("\\*", "*").replace("\\_", "_")
    text = _TAG_LINE.sub("", text)
    return re.sub(r"\s+", " ", text).strip()


def _reads_as_english(text: str) -> bool:
    words = re.findall(r"[A-Za-z]+", text)
    if len(words) < 25:
        return False
    if sum(w.lower() in _STOPWORDS for w in words) < 0.2 * len(words):
        return False
    return sum(c.isalpha() or c.isspace() for c in text) >= 0.85 * len(text)


def dependency_paragraphs(doc: str) -> list[str]:
    """English paragraphs of a reST / Google / NumPy / markdown docstring, markup cleaned.

    Dropped: code (fenced, `::` literal blocks, code directives, doctests with their output, lines that mostly
    read as code), section headers and their underlines, parameter heads (`name (type):`, `name : type`,
    `:param x:`), tables. Kept: sentences, including the descriptions under parameter heads, admonitions' text
    and list items (markers removed).
    """
    paras: list[str] = []
    cur: list[str] = []
    literal_indent: int | None = None  # inside a literal/code block introduced at this indentation
    fence = doctest = False

    def flush() -> None:
        if cur:
            if sum(_codeish(line) for line in cur) * 3 < len(cur) and \
                    sum(bool(re.search(r"\S {3,}\S", line)) for line in cur) * 3 < len(cur):
                flat = _clean_inline(" ".join(cur))
                if flat.endswith("::"):
                    flat = flat[:-1]
                if len(flat) >= MIN_PARAGRAPH_CHARS and _reads_as_english(flat):
                    paras.append(flat)
            cur.clear()

    for raw in textwrap.dedent(doc.expandtabs()).splitlines():
        s = raw.strip()
        indent = len(raw) - len(raw.lstrip())
        if s.startswith(("```", "~~~")):
            flush()
            fence = not fence
            continue
        if fence:
            continue
        if literal_indent is not None:
            if not s or indent > literal_indent:
                continue
            literal_indent = None
        if doctest:
            if s:
                continue
            doctest = False
        if not s:
            flush()
            continue
        if s.startswith((">>>", "$ ", "In [")):
            flush()
            doctest = True
            continue
        if _RULE.fullmatch(s):
            if cur and len(cur) == 1:
                cur.clear()  # the underlined line was a section title
            flush()
            continue
        if s.startswith(".."):
            flush()
            directive = re.match(r"\.\.\s+([\w:-]+)::\s*(.*)", s)
            if directive and directive.group(1).lower() in _ADMONITIONS:
                if directive.group(2):
                    cur.append(directive.group(2))
            else:  # code-block, math, autosummary, comments, link targets...: skip the indented body
                literal_indent = indent
            continue
        if _TAG_LINE.fullmatch(s) or _SECTION.fullmatch(s) or (not cur and len(s.split()) <= 4 and s.endswith(":")):
            flush()
            if s.endswith("::"):
                literal_indent = indent
            continue
        if _NUMPY_PARAM.fullmatch(s):  # `name : type`: the description follows, indented
            flush()
            continue
        field = _FIELD.fullmatch(s)
        google = None if field else _GOOGLE_PARAM.fullmatch(s)
        if google and not (google.group(2) or not google.group(3)
                           or re.fullmatch(r"\*{0,2}[a-z_][a-z0-9_]*", google.group(1))):
            google = None  # `Note: ...` or a sentence with a colon, not a parameter
        if field or google:
            flush()
            rest = google.group(3) if google else field.group(2)
            if rest and not (field and field.group(1) in ("type", "rtype", "vartype")):
                cur.append(rest)
            continue
        s = re.sub(r"^(?:[-*+\u2022]|\d+[.)]|\([a-z0-9]\))\s+", "", s)
        cur.append(s)
        if s.endswith("::"):
            flush()
            literal_indent = indent
    flush()
    return paras


_DOC_CALLS = {"add_docstr", "_add_docstr", "add_docstr_all", "add_start_docstrings", "add_end_docstrings",
              "add_newdoc", "add_newdoc_ufunc"}


def _string_of(node: ast.AST) -> str | None:
    """A string literal, or the literal of a `"...".format(...)` call (torch's documentation tables)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "format":
        return _string_of(node.func.value)
    if isinstance(node, ast.Tuple) and node.elts:  # numpy: add_newdoc(module, name, (attribute, "doc"))
        return _string_of(node.elts[-1])
    return None


def _module_level_docs(tree: ast.Module) -> Iterator[str]:
    """Documentation kept outside docstrings: `X_DOCSTRING = "..."` and `add_docstr(obj, "...")` calls."""
    for stmt in tree.body:
        if isinstance(stmt, ast.Assign) and any(isinstance(t, ast.Name) and "DOC" in t.id.upper()
                                                for t in stmt.targets):
            text = _string_of(stmt.value)
            if text:
                yield text
        value = getattr(stmt, "value", None)
        if isinstance(value, ast.Call):
            func = value.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in _DOC_CALLS:
                for arg in value.args:
                    text = _string_of(arg)
                    if text:
                        yield text


def _scan_dependency_file(path: str) -> str:
    """Docstring and module-level documentation paragraphs of one file, as one document."""
    text = _read(path)
    if not text or '"""' not in text and "'''" not in text:
        return ""
    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return ""
    paras = []
    for owner in _doc_owners(tree):
        node = _docstring_expr(owner)
        if node is not None:
            paras.extend(dependency_paragraphs(cleandoc(node.value.value)))
    for doc in _module_level_docs(tree):
        paras.extend(dependency_paragraphs(cleandoc(doc)))
    return "\n\n".join(paras)


def scan_dependency(module: str, distribution: str, cache_dir: str | None = None) -> tuple[str, ...]:
    """Docstring documents of one installed dependency, in file order; cached like the stdlib scan.

    The key holds the package's version and every file's size and mtime, so an upgrade re-scans it.
    """
    key = digest(_package_signature(module, distribution), _module_code_hash())
    if key in _scanned:
        return _scanned[key][1]
    path = os.path.join(cache_dir, "text", f"{module}-{key}.json") if cache_dir else None
    if path and os.path.exists(path):
        docs = load_json(path)
    else:
        docs = [d for d in map(_scan_dependency_file, package_files(module)) if d]
        if path:
            save_json(path, docs)
    _scanned[key] = ((), tuple(docs))
    return _scanned[key][1]


def _fuzzy_key(paragraph: str) -> str:
    """Paragraph minus names and punctuation-bound tokens: transformers repeats a docstring per model with only
    the model's name changed, and such near-copies on both sides of the split would leak eval text."""
    key = " ".join(w for w in paragraph.split() if w.isalpha() and w.islower())
    return key if len(key) >= 60 else paragraph


def prose_documents(cache_dir: str | None = None, used: dict | None = None) -> Iterator[str]:
    """Reference topics, the IDLE manual, per-module stdlib docstrings, then each dependency's docstrings.

    Paragraphs are deduplicated across the whole domain: reference topics nest (a section's text reappears
    in its parent topic) and pure-Python fallbacks repeat their C twins' docstrings, so whole-document
    deduplication alone would let eval paragraphs leak into training. Dependencies are read lazily, one
    package at a time, so a small data.size_mb never parses them. `used`, when given, receives per source
    the number of documents yielded so far.
    """
    used = {} if used is None else used
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distro builds split pydoc_data out
        topics = {}
    seen: set[str] = set()
    fuzzy: set[str] = set()

    def fresh(paras: list[str]) -> str:
        kept = [p for p in paras if p not in seen]
        seen.update(kept)
        fuzzy.update(map(_fuzzy_key, kept))
        return "\n\n".join(kept)

    docs = [fresh(_paragraphs(topics[key])) for key in sorted(topics)]
    docs.append(fresh(_paragraphs(_idle_help_text())))
    docs.extend(fresh(doc.split("\n\n")) for doc in scan_stdlib(cache_dir)[1])
    for doc in docs:
        if doc:
            used[STDLIB_SOURCE] = used.get(STDLIB_SOURCE, 0) + 1
            yield doc
    for module, distribution, _ in DEPENDENCIES:
        if package_root(module) is None:
            continue
        for doc in scan_dependency(module, distribution, cache_dir):
            kept = []
            for para in doc.split("\n\n"):
                key = _fuzzy_key(para)
                if para not in seen and key not in fuzzy:
                    seen.add(para)
                    fuzzy.add(key)
                    kept.append(para)
            if kept:
                used[module] = used.get(module, 0) + 1
                yield "\n\n".join(kept)
