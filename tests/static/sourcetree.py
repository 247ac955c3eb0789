"""Helpers for the static layer: find and parse the repository's files without importing them.

Nothing here (or in any tests/static test) imports torch or rwkvslice: the static session's
environment has no torch, and a check that imported the package would stop being static.
"""

from __future__ import annotations

import ast
import functools
import re
import sys
from collections.abc import Iterator
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src" / "rwkvslice"


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def py_files(*dirs: str) -> list[Path]:
    """Python files under the given repo-relative directories (or single files), sorted."""
    out: list[Path] = []
    for d in dirs:
        p = ROOT / d
        if p.is_file():
            out.append(p)
        elif p.is_dir():
            out.extend(f for f in p.rglob("*.py") if "__pycache__" not in f.parts)
    return sorted(out)


@functools.cache
def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def dotted(node: ast.AST) -> str:
    """`torch.nn.functional.cross_entropy` for an attribute chain, '' for anything else."""
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    if isinstance(node, ast.Call):  # e.g. torch.amp.GradScaler(...)(...) -> "()" prefix
        inner = dotted(node.func)
        return ".".join([inner + "()", *reversed(parts)]) if inner else ""
    return ""


def calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def call_name(call: ast.Call) -> str:
    return dotted(call.func)


def keyword(call: ast.Call, name: str) -> ast.expr | None:
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value
    return None


def functions(tree: ast.AST) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
    """(qualified name, node) for every function, methods as Class.method."""

    def visit(node: ast.AST, prefix: str):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                yield f"{prefix}{child.name}", child
                yield from visit(child, f"{prefix}{child.name}.")
            else:
                yield from visit(child, prefix)

    yield from visit(tree, "")


def find_function(path: Path, qualname: str) -> ast.FunctionDef | ast.AsyncFunctionDef | None:
    for name, node in functions(parse(path)):
        if name == qualname:
            return node
    return None


def classes(tree: ast.AST) -> Iterator[ast.ClassDef]:
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            yield node


def imported_modules(tree: ast.AST, module_name: str) -> set[str]:
    """Absolute names of every module imported anywhere in the file (relative imports resolved)."""
    out: set[str] = set()
    package = module_name.rsplit(".", 1)[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            out.add(mod)
            out.update(f"{mod}.{alias.name}" for alias in node.names)
    return out


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT / "src").with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


@functools.cache
def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def registered_markers() -> set[str]:
    lines = pyproject()["tool"]["pytest"]["ini_options"].get("markers", [])
    return {re.split(r"[:(]", line, maxsplit=1)[0].strip() for line in lines}


def markdown_code_blocks(path: Path) -> list[str]:
    """The contents of the fenced code blocks of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return re.findall(r"^```[^\n]*\n(.*?)^```", text, flags=re.M | re.S)


def shell_commands(block: str) -> list[str]:
    """Commands in a shell code block: comments and prompts dropped, `a && b` split."""
    out: list[str] = []
    for line in block.splitlines():
        line = line.strip()
        if line.startswith("$ "):
            line = line[2:]
        line = line.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        out.extend(part.strip() for part in re.split(r"&&|;", line) if part.strip())
    return out


@functools.cache
def nox_sessions() -> dict[str, dict]:
    """Session name -> {"default": bool, "params": [ids] or None}, read from noxfile.py's decorators."""
    tree = parse(ROOT / "noxfile.py")
    out: dict[str, dict] = {}
    for node in tree.body:
        if not isinstance(node, ast.FunctionDef):
            continue
        info: dict | None = None
        for dec in node.decorator_list:
            if isinstance(dec, ast.Call) and dotted(dec.func) == "nox.session":
                name_kw = keyword(dec, "name")
                default_kw = keyword(dec, "default")
                info = {
                    "name": name_kw.value if isinstance(name_kw, ast.Constant) else node.name,
                    "default": True if default_kw is None else bool(ast.literal_eval(default_kw)),
                    "parametrized": False,
                }
            elif isinstance(dec, ast.Attribute) and dotted(dec) == "nox.session":
                info = {"name": node.name, "default": True, "parametrized": False}
        if info is None:
            continue
        info["parametrized"] = any(
            isinstance(d, ast.Call) and dotted(d.func) == "nox.parametrize" for d in node.decorator_list
        )
        out[info["name"]] = info
    return out
