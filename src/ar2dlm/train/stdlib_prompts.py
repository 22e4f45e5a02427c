"""The ``stdlib`` prompt source: functions of the running interpreter's standard library, to be completed.

Each prompt is a ``def`` line (or lines) and the docstring exactly as in the
source, ending right after the docstring, so the model writes the body;
methods are preceded by their ``class`` line. The rules (which modules,
functions and docstrings qualify, the split by module hash, the caps) are
those of ``prompts.py``'s module docstring, which describes every source.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import io
import os
import random
import tokenize
from pathlib import Path

CAPS = {"train": 600, "bench": 60}
PER_MODULE = 6
DOC_CHARS = (60, 1200)
MAX_PROMPT_CHARS = 2500
SKIP = frozenset({"idlelib", "tkinter", "lib2to3", "turtledemo", "pydoc_data", "test", "tests",
                         "site-packages", "dist-packages"})


@functools.lru_cache(maxsize=None)
def build(stdlib: str) -> tuple[tuple[str, str, str], ...]:
    """``(id, split, prompt)`` of every stdlib prompt under the stdlib directory, in the order drawn."""
    left = dict(CAPS)
    records = []
    for module, path in sorted(_modules(Path(stdlib)), key=lambda mp: _hash_int(f"order:{mp[0]}")):
        split = split_of(module)
        if not left[split]:
            if not any(left.values()):
                break
            continue
        found = module_prompts(module, path)[:left[split]]
        left[split] -= len(found)
        records += [(f"stdlib/{module}/{qualname}", split, prompt) for qualname, prompt in found]
    return tuple(records)


def split_of(module: str) -> str:
    return "bench" if _hash_int(module) % 5 == 0 else "train"


def _public_name(name: str) -> bool:
    return (name.isidentifier() and not name.startswith("_") and name not in SKIP
            and not name.startswith("test_") and not name.endswith("_test"))


def _modules(root: Path) -> list[tuple[str, Path]]:
    """``(dotted name, path)`` of the public modules under the stdlib directory."""
    modules = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root).parts
        dirnames[:] = sorted(d for d in dirnames if _public_name(d) and (Path(dirpath) / d / "__init__.py").is_file())
        for filename in sorted(filenames):
            if not filename.endswith(".py"):
                continue
            stem = filename[:-3]
            if stem == "__init__" and rel:
                modules.append((".".join(rel), Path(dirpath) / filename))
            elif _public_name(stem):
                modules.append((".".join(rel + (stem,)), Path(dirpath) / filename))
    return modules


def module_prompts(module: str, path: Path) -> list[tuple[str, str]]:
    """Up to ``PER_MODULE`` ``(qualname, prompt)`` pairs from one module, in source order."""
    try:
        with tokenize.open(path) as f:
            source = f.read()
        tree = ast.parse(source, filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return []
    lines = io.StringIO(source).readlines()  # splits on "\n" only, as ast counts lines
    found = []
    for cls, fn in _functions(tree):
        prompt = _function_prompt(lines, cls, fn)
        if prompt:
            found.append((f"{cls.name}.{fn.name}" if cls else fn.name, prompt))
    if len(found) > PER_MODULE:
        picked = set(random.Random(f"ar2dlm-stdlib:{module}").sample(range(len(found)), PER_MODULE))
        found = [item for i, item in enumerate(found) if i in picked]
    return found


def _functions(tree: ast.Module):
    """``(class or None, function)`` for top-level functions and methods of public top-level classes."""
    kinds = (ast.FunctionDef, ast.AsyncFunctionDef)
    for node in tree.body:
        if isinstance(node, kinds):
            yield None, node
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            for item in node.body:
                if isinstance(item, kinds):
                    yield node, item


def _function_prompt(lines: list[str], cls: ast.ClassDef | None, fn) -> str | None:
    """Class line (for methods) + ``def`` line(s) + docstring, as in the source; None if unsuitable."""
    if fn.name.startswith("_") or len(fn.body) < 2 or _is_stub(fn.body[1:]):
        return None
    doc = fn.body[0]
    if not (isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant) and isinstance(doc.value.value, str)):
        return None
    lo, hi = DOC_CHARS
    if not lo <= len(doc.value.value.strip()) <= hi:
        return None
    if doc.lineno <= fn.lineno or fn.body[1].lineno <= doc.end_lineno:
        return None  # docstring shares a line with the def or with code
    header = _class_header(lines, cls) if cls else ""
    prompt = header + "".join(lines[fn.lineno - 1:doc.end_lineno])
    if not prompt.endswith("\n"):
        prompt += "\n"
    return prompt if len(prompt) <= MAX_PROMPT_CHARS else None


def _is_stub(body: list[ast.stmt]) -> bool:
    """A body that is only ``pass``, ``...`` or ``raise NotImplementedError``."""
    if len(body) != 1:
        return False
    stmt = body[0]
    if isinstance(stmt, ast.Pass):
        return True
    if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and stmt.value.value is Ellipsis:
        return True
    if isinstance(stmt, ast.Raise) and stmt.exc is not None:
        exc = stmt.exc.func if isinstance(stmt.exc, ast.Call) else stmt.exc
        return isinstance(exc, ast.Name) and exc.id == "NotImplementedError"
    return False


def _class_header(lines: list[str], cls: ast.ClassDef) -> str:
    """The ``class ...:`` line(s) as in the source (decorators left out)."""
    first = cls.lineno - 1
    last = max([first] + [node.end_lineno - 1 for node in cls.bases + cls.keywords])
    for i in range(last, min(cls.body[0].lineno - 1, len(lines))):
        if lines[i].split("#", 1)[0].rstrip().endswith(":"):
            return "".join(lines[first:i + 1])
    return f"class {cls.name}:\n"


def _hash_int(text: str) -> int:
    return int(hashlib.sha256(text.encode("utf-8")).hexdigest()[:8], 16)
