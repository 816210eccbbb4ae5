"""Upstream Python source read by ``ast`` only: find a dotted target and its parameters without importing it.

``doctor`` reads upstream checkouts (``--upstream``) and installed packages it must not import through
:class:`SourceIndex`; the conformance tests check the integration's targets against the pinned sources with it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any


class SourceIndex:
    """Finds a dotted target in Python source files under some roots, by ``ast`` only.

    A root is a directory that contains top-level packages (a checkout, or ``site-packages``); a directory that *is*
    a package (``.../vllm_ascend``) is accepted and its parent used. Follows ``from x import name`` re-exports,
    ``name = other`` aliases and base classes (within the indexed sources), up to a small depth.
    """

    def __init__(self, roots: Iterable[Path]):
        self.roots: list[Path] = []
        for root in roots:
            root = Path(root)
            if (root / "__init__.py").is_file() and not (root / root.name).is_dir():
                root = root.parent
            if root not in self.roots:
                self.roots.append(root)
        self._trees: dict[Path, ast.Module | None] = {}

    def module_file(self, module: str) -> Path | None:
        relative = Path(*module.split("."))
        for root in self.roots:
            for candidate in (root / relative.with_suffix(".py"), root / relative / "__init__.py"):
                if candidate.is_file():
                    return candidate
        return None

    def _tree(self, path: Path) -> ast.Module | None:
        if path not in self._trees:
            try:
                self._trees[path] = ast.parse(path.read_text(encoding="utf-8", errors="replace"), str(path))
            except (OSError, SyntaxError):
                self._trees[path] = None
        return self._trees[path]

    def locate(self, dotted: str) -> tuple[Path, str] | None:
        """(file, attribute path inside it) for the longest module prefix of ``dotted`` found under the roots."""
        parts = dotted.split(".")
        for split in range(len(parts) - 1, 0, -1):
            path = self.module_file(".".join(parts[:split]))
            if path is not None:
                return path, ".".join(parts[split:])
        return None

    def resolve(self, dotted: str, *, inherited: bool = True) -> tuple[ast.AST, Path, bool] | str:
        """``(definition node, file, is_method)`` for a dotted target, or a string saying what is missing.

        ``inherited=False``: a class attribute must be defined by that class itself (what ``PatchSet`` patches).
        """
        located = self.locate(dotted)
        if located is None:
            return f"no module of {dotted} under {[str(r) for r in self.roots]}"
        path, attrs = located
        return self._resolve_in(path, attrs.split("."), depth=0, inherited=inherited)

    def _resolve_in(
        self, path: Path, attrs: list[str], depth: int, inherited: bool = True
    ) -> tuple[ast.AST, Path, bool] | str:
        tree = self._tree(path)
        if tree is None:
            return f"{path} does not parse"
        if depth > 6:
            return f"{'.'.join(attrs)}: too many re-exports (last {path})"
        name, rest = attrs[0], attrs[1:]
        node = _find_top_level(tree.body, name)
        if node is None:
            return f"{name} is not defined in {path}"
        if isinstance(node, ast.ImportFrom | ast.Import):
            target = _import_target(node, name, path, self)
            if target is None:
                return f"{name} is imported in {path} from a module outside the indexed sources"
            module_path, original = target
            return self._resolve_in(module_path, [original, *rest], depth + 1, inherited)
        if isinstance(node, ast.Assign):  # alias: name = other_name
            if isinstance(node.value, ast.Name):
                return self._resolve_in(path, [node.value.id, *rest], depth + 1, inherited)
            return f"{name} in {path} is assigned from an expression; cannot read its signature without import"
        if not rest:
            return node, path, False
        if not isinstance(node, ast.ClassDef):
            return f"{name} in {path} is not a class, so it has no attribute {rest[0]}"
        return self._resolve_member(node, path, rest, depth, inherited)

    def _resolve_member(
        self, cls: ast.ClassDef, path: Path, rest: list[str], depth: int, inherited: bool = True
    ) -> tuple[ast.AST, Path, bool] | str:
        member = _find_top_level(cls.body, rest[0])
        if member is not None and not isinstance(member, ast.ImportFrom | ast.Import):
            if len(rest) == 1:
                return member, path, isinstance(member, ast.FunctionDef | ast.AsyncFunctionDef)
            if isinstance(member, ast.ClassDef):
                return self._resolve_member(member, path, rest[1:], depth, inherited)
            return f"{cls.name}.{rest[0]} in {path} is not a class"
        if not inherited:
            return f"{cls.name} in {path} does not define {rest[0]} itself (it may inherit it)"
        for base in cls.bases:  # inherited: look in base classes we can see
            base_name = (
                base.id if isinstance(base, ast.Name) else base.attr if isinstance(base, ast.Attribute) else None
            )
            if base_name is None or base_name == cls.name:
                continue
            found = self._resolve_in(path, [base_name, *rest], depth + 1)
            if not isinstance(found, str):
                return found
        return f"{cls.name}.{'.'.join(rest)} is not defined in {path} (nor in base classes found in the sources)"


def _binds(node: ast.stmt, name: str) -> bool:
    """Whether a top-level statement binds ``name`` (def, class, plain assignment or import)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return node.name == name
    if isinstance(node, ast.Assign):
        return any(isinstance(t, ast.Name) and t.id == name for t in node.targets)
    if isinstance(node, ast.ImportFrom | ast.Import):
        return any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names)
    return False


def _find_top_level(body: list[ast.stmt], name: str) -> ast.stmt | None:
    """The last statement of a body (descending into if/try blocks) that binds ``name``."""
    found = None
    for node in body:
        if _binds(node, name):
            found = node
        elif isinstance(node, ast.If | ast.Try):
            blocks = [node.body, node.orelse]
            if isinstance(node, ast.Try):
                blocks += [node.finalbody, *[h.body for h in node.handlers]]
            for block in blocks:
                inner = _find_top_level(block, name)
                if inner is not None:
                    found = inner
    return found


def _import_target(
    node: ast.ImportFrom | ast.Import, name: str, path: Path, index: SourceIndex
) -> tuple[Path, str] | None:
    if isinstance(node, ast.Import):
        return None  # `import a.b as name` binds a module, not a callable target
    for alias in node.names:
        if (alias.asname or alias.name) != name:
            continue
        module = node.module or ""
        if node.level:  # relative import: resolve against this file's package
            package = path.parent
            for _ in range(node.level - 1):
                package = package.parent
            base = package / Path(*module.split(".")) if module else package
            for candidate in (base.with_suffix(".py"), base / "__init__.py"):
                if candidate.is_file():
                    return candidate, alias.name
            return None  # `from . import name` where name is a submodule: a module, not a callable
        module_path = index.module_file(module)
        return (module_path, alias.name) if module_path is not None else None
    return None


def parameters(node: ast.AST, is_method: bool) -> tuple[str, ...]:
    """Parameter names as ``inspect.signature`` reports them for the attribute looked up on its owner."""
    if isinstance(node, ast.ClassDef):
        init = _find_top_level(node.body, "__init__")
        if not isinstance(init, ast.FunctionDef | ast.AsyncFunctionDef):
            return ()
        return parameters(init, True)[1:]  # a class's signature is __init__ without self
    if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
        return ()
    args = node.args
    names = [a.arg for a in (*args.posonlyargs, *args.args)]
    if args.vararg:
        names.append(args.vararg.arg)
    names += [a.arg for a in args.kwonlyargs]
    if args.kwarg:
        names.append(args.kwarg.arg)
    decorators = {d.id if isinstance(d, ast.Name) else getattr(d, "attr", "") for d in node.decorator_list}
    if is_method and "classmethod" in decorators:
        names = names[1:]  # bound to the class when looked up on it
    return tuple(names)


def check_target_in_source(target: Any, index: SourceIndex, versions: Sequence[str] = ()) -> dict[str, Any]:
    """``PatchTarget.check``'s result computed from source: ``{"name", "found", "compatible", "version_known",
    "detail", "source", "versions", "installed"}``; ``versions`` are the candidate version strings of the
    source (package version, git commit)."""
    result: dict[str, Any] = {
        "name": target.path,
        "versions": list(target.versions),
        "installed": next(iter(versions), None),
    }
    found = index.resolve(target.path)
    known = any(str(c).startswith(v) for c in versions if c for v in target.versions)
    if isinstance(found, str):
        return result | {"found": False, "compatible": False, "version_known": known, "detail": found, "source": None}
    node, path, is_method = found
    params = parameters(node, is_method)
    compatible = params[: len(target.parameters)] == tuple(target.parameters)
    detail = (
        "" if compatible else f"expected parameters {tuple(target.parameters)}, found {params} ({path}:{node.lineno})"
    )
    return result | {
        "found": True,
        "compatible": compatible,
        "version_known": known,
        "detail": detail,
        "source": str(path),
    }
