"""Mutation testing of the verification code: ``make mutation`` (``python -m tests.mutation``).

Each mutant changes one spot of one module (flip a comparison, swap ``and``/``or``, drop a
``not``, drop a ``raise``, change a number, a string or a bool, swap ``+``/``-`` or ``&``/``|``)
and runs that module's in-process tests with ``-x``: a failing test kills the mutant, a mutant
that passes every test survives. Modules and their tests are in TARGETS. The score and every
survivor are printed; docs/reliability.md says why each survivor is equivalent (no test can
tell it from the original) or which test kills it.

The mutant is compiled from the module's AST and handed to the import system for that module
only (a meta path finder): no file in the checkout is ever changed. The driver imports the
heavy third-party packages once and forks a child per mutant, which imports gae_deferred
afresh and runs pytest. ``python -m tests.mutation envelope`` runs the targets whose module
name contains ``envelope``; ``--list`` prints the mutants without running them.
"""

from __future__ import annotations

import argparse
import ast
import copy
import dataclasses
import importlib.abc
import importlib.machinery
import importlib.util
import os
import pathlib
import select
import signal
import sys
import time
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
#: module name -> (source file, tests that must notice a change in it, fastest first).
TARGETS: dict[str, tuple[str, list[str]]] = {
    "gae_deferred._signing": (
        "lib/gae_deferred/_signing.py",
        ["tests/test_verification.py", "tests/test_envelope.py"],
    ),
    "gae_deferred.context": (
        "lib/gae_deferred/context.py",
        ["tests/test_verification.py", "tests/test_task_handler.py", "tests/test_http_target.py"],
    ),
    "gae_deferred.http_target": (
        "lib/gae_deferred/http_target.py",
        ["tests/test_http_target.py"],
    ),
    "gae_deferred._key_cache": (
        "lib/gae_deferred/_key_cache.py",
        ["tests/test_http_target.py", "tests/dashboard/test_security.py"],
    ),
    "gae_deferred.envelope": (
        "lib/gae_deferred/envelope.py",
        ["tests/test_verification.py", "tests/test_envelope.py", "tests/test_task_handler.py"],
    ),
    "gae_deferred.webapp2.deferred_task": (
        "handlers/deferred_task.py",
        [
            "tests/test_verification.py",
            "tests/test_task_handler.py",
            "tests/test_every_answer.py",
            "tests/test_http_target.py",
        ],
    ),
}
#: What is mutated of a module (its top-level functions, classes and assignments by name);
#: a module not listed here is mutated whole. envelope.py: the verification and the wire
#: format, not how a call is pickled, previewed or compressed.
SCOPES: dict[str, set[str]] = {
    "gae_deferred.envelope": {
        "MAGIC",
        "FORMAT_VERSION",
        "FLAG_ZLIB",
        "FLAG_REFERENCE",
        "_KNOWN_FLAGS",
        "_PREFIX",
        "_MAC_BYTES",
        "_MAX_HEADER_BYTES",
        "_keyed",
        "encode_header",
        "_seal",
        "_seal_pieces",
        "rebind",
        "read_header",
        "open_envelope",
        "decompressed",
        "_inflate",
        "load_call",
    },
}
#: A mutant whose tests run longer than this is counted as killed (it hung: noticed).
TIMEOUT_SECONDS = 240.0
_FLIPPED_COMPARISONS: dict[type, type] = {
    ast.Lt: ast.LtE,
    ast.LtE: ast.Lt,
    ast.Gt: ast.GtE,
    ast.GtE: ast.Gt,
    ast.Eq: ast.NotEq,
    ast.NotEq: ast.Eq,
    ast.In: ast.NotIn,
    ast.NotIn: ast.In,
    ast.Is: ast.IsNot,
    ast.IsNot: ast.Is,
}
_SWAPPED_OPERATORS: dict[type, type] = {
    ast.Add: ast.Sub,
    ast.Sub: ast.Add,
    ast.BitAnd: ast.BitOr,
    ast.BitOr: ast.BitAnd,
}
_LOGGING_METHODS = {"debug", "info", "warning", "error", "exception", "critical"}


@dataclasses.dataclass(frozen=True)
class Mutant:
    module: str
    number: int
    line: int
    what: str

    def __str__(self) -> str:
        return f"{TARGETS[self.module][0]}:{self.line}: {self.what}"


class _Mutator(ast.NodeTransformer):
    """Walks a module; applies mutation number ``chosen`` (or none, counting them all)."""

    def __init__(self, chosen: int = -1, scope: set[str] | None = None) -> None:
        self.chosen = chosen
        self.scope = scope
        self.count = 0
        self.found: list[tuple[int, str]] = []

    def _point(self, node: ast.AST, what: str) -> bool:
        """Register a mutation point; True when it is the one to apply."""
        number = self.count
        self.count += 1
        self.found.append((getattr(node, "lineno", 0), what))
        return number == self.chosen

    # Not mutated: docstrings, annotations, logging arguments, __all__.
    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.AST:
        node.body = self._skip_docstring(node.body)
        node.args = self._visit_arguments(node.args)
        node.decorator_list = [self.visit(d) for d in node.decorator_list]
        return node

    visit_AsyncFunctionDef = visit_FunctionDef  # type: ignore[assignment]

    def visit_ClassDef(self, node: ast.ClassDef) -> ast.AST:
        node.body = self._skip_docstring(node.body)
        return node

    def visit_Module(self, node: ast.Module) -> ast.AST:
        if self.scope is None:
            node.body = self._skip_docstring(node.body)
            return node
        node.body = [self.visit(s) if _names(s) & self.scope else s for s in node.body]
        return node

    def _skip_docstring(self, body: list[ast.stmt]) -> list[ast.stmt]:
        first = body[0] if body else None
        docstring = (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        )
        rest = [self.visit(statement) for statement in body[1:] if statement is not None]
        kept = [first] if docstring else [self.visit(first)] if first is not None else []
        return [statement for statement in [*kept, *rest] if statement is not None]

    def _visit_arguments(self, args: ast.arguments) -> ast.arguments:
        args.defaults = [self.visit(d) for d in args.defaults]
        args.kw_defaults = [self.visit(d) if d is not None else None for d in args.kw_defaults]
        return args

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is not None:
            node.value = self.visit(node.value)
        return node

    def visit_Assign(self, node: ast.Assign) -> ast.AST:
        if any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return node
        return self.generic_visit(node)

    def visit_Call(self, node: ast.Call) -> ast.AST:
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr in _LOGGING_METHODS:
            return node
        return self.generic_visit(node)

    def visit_ImportFrom(self, node: ast.ImportFrom) -> ast.AST:
        return node

    # Mutations.
    def visit_Compare(self, node: ast.Compare) -> ast.AST:
        self.generic_visit(node)
        for index, op in enumerate(node.ops):
            flipped = _FLIPPED_COMPARISONS.get(type(op))
            if flipped and self._point(node, f"{type(op).__name__} -> {flipped.__name__}"):
                node.ops[index] = flipped()
        return node

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.AST:
        self.generic_visit(node)
        other = ast.Or if isinstance(node.op, ast.And) else ast.And
        if self._point(node, f"{type(node.op).__name__} -> {other.__name__}"):
            node.op = other()
        return node

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.AST:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not) and self._point(node, "not x -> x"):
            return node.operand
        return node

    def visit_BinOp(self, node: ast.BinOp) -> ast.AST:
        self.generic_visit(node)
        swapped = _SWAPPED_OPERATORS.get(type(node.op))
        if swapped and self._point(node, f"{type(node.op).__name__} -> {swapped.__name__}"):
            node.op = swapped()
        return node

    def visit_Raise(self, node: ast.Raise) -> ast.AST:
        self.generic_visit(node)
        if self._point(node, "raise -> pass"):
            return ast.copy_location(ast.Pass(), node)
        return node

    def visit_JoinedStr(self, node: ast.JoinedStr) -> ast.AST:
        for index, value in enumerate(node.values):
            if isinstance(value, ast.FormattedValue):
                node.values[index] = self.visit(value)
            elif isinstance(value, ast.Constant) and self._point(value, "f-string text changed"):
                value.value = f"XX{value.value}XX"
        return node

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        value = node.value
        if isinstance(value, bool):
            if self._point(node, f"{value} -> {not value}"):
                node.value = not value
        elif isinstance(value, int | float):
            if self._point(node, f"{value!r} -> {value + 1!r}"):
                node.value = value + 1
        elif isinstance(value, str) and value:
            if self._point(node, f"{_short(value)} -> 'XX...XX'"):
                node.value = f"XX{value}XX"
        elif isinstance(value, bytes) and value and self._point(node, f"{_short(value)} changed"):
            node.value = value + b"X"
        return node


def _names(statement: ast.stmt) -> set[str]:
    """The names a top-level statement defines (a function, a class, assigned names)."""
    if isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {statement.name}
    if isinstance(statement, ast.Assign):
        return {t.id for t in statement.targets if isinstance(t, ast.Name)}
    if isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name):
        return {statement.target.id}
    return set()


def _short(value: str | bytes) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _tree(module: str) -> ast.Module:
    return ast.parse((ROOT / TARGETS[module][0]).read_text(), TARGETS[module][0])


def mutants(module: str) -> list[Mutant]:
    counter = _Mutator(scope=SCOPES.get(module))
    counter.visit(_tree(module))
    return [Mutant(module, n, line, what) for n, (line, what) in enumerate(counter.found)]


def mutated_code(mutant: Mutant) -> Any:
    mutator = _Mutator(mutant.number, SCOPES.get(mutant.module))
    tree = mutator.visit(copy.deepcopy(_tree(mutant.module)))
    ast.fix_missing_locations(tree)
    return compile(tree, str(ROOT / TARGETS[mutant.module][0]), "exec")


class _MutantLoader(importlib.machinery.SourceFileLoader):
    def __init__(self, fullname: str, path: str, code: Any) -> None:
        super().__init__(fullname, path)
        self._code = code

    def get_code(self, fullname: str) -> Any:
        return self._code


class _MutantFinder(importlib.abc.MetaPathFinder):
    def __init__(self, mutant: Mutant) -> None:
        self.mutant = mutant
        self.code = mutated_code(mutant)

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if fullname != self.mutant.module:
            return None
        origin = str(ROOT / TARGETS[fullname][0])
        loader = _MutantLoader(fullname, origin, self.code)
        return importlib.util.spec_from_file_location(fullname, origin, loader=loader)


def _run_child(mutant: Mutant | None, module: str) -> None:
    """In the forked child: install the mutant, run its tests, exit with pytest's code."""
    import pytest

    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    if mutant is not None:
        sys.meta_path.insert(0, _MutantFinder(mutant))
    tests = TARGETS[module][1]
    args = [*tests, "-x", "-q", "-p", "no:cacheprovider", "-p", "no:randomly", "-m", "not e2e"]
    os._exit(int(pytest.main(args)))


def run(mutant: Mutant | None, module: str) -> str:
    """ "killed", "survived" or "timeout" for a mutant; None runs the unmutated module."""
    pid = os.fork()
    if pid == 0:
        try:
            _run_child(mutant, module)
        finally:
            os._exit(99)
    deadline = time.monotonic() + TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            code = os.waitstatus_to_exitcode(status)
            return "survived" if code == 0 else "killed"
        select.select([], [], [], 0.1)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return "timeout"


def _preload() -> None:
    """The heavy third-party imports, once, before forking (gae_deferred itself is not
    imported here: each child imports it with its mutant)."""
    import cloudpickle  # noqa: F401
    import google.cloud.ndb
    import google.cloud.tasks_v2  # noqa: F401
    import hypothesis  # noqa: F401
    import pytest  # noqa: F401
    import webapp2  # noqa: F401
    import webtest  # noqa: F401


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.mutation", description=__doc__)
    parser.add_argument("only", nargs="*", help="run the targets whose name contains these")
    parser.add_argument("--list", action="store_true", help="print the mutants, run nothing")
    options = parser.parse_args(argv)
    os.chdir(ROOT)
    sys.path.insert(0, str(ROOT))
    selected = [m for m in TARGETS if not options.only or any(o in m for o in options.only)]
    if options.list:
        for module in selected:
            for mutant in mutants(module):
                print(mutant)
        return 0
    _preload()
    totals: dict[str, tuple[int, int]] = {}
    survivors: list[Mutant] = []
    for module in selected:
        started = time.monotonic()
        if run(None, module) != "survived":
            print(f"{module}: its tests fail without any mutant; fix them first", flush=True)
            return 2
        found = mutants(module)
        killed = 0
        for mutant in found:
            outcome = run(mutant, module)
            killed += outcome != "survived"
            if outcome == "survived":
                survivors.append(mutant)
                print(f"  survived  {mutant}", flush=True)
        totals[module] = (killed, len(found))
        print(
            f"{module}: {killed} of {len(found)} mutants killed "
            f"({time.monotonic() - started:.0f}s)",
            flush=True,
        )
    print("\nmutation score")
    for module, (killed, total) in totals.items():
        print(f"  {TARGETS[module][0]:40} {killed:4} / {total:4} killed  ({killed / total:.0%})")
    print(f"{len(survivors)} survivors (docs/reliability.md says why each is equivalent)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
