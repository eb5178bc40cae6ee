"""gae_deferred's public names: one list (the imports of __init__.pyi) gives the
lazy imports, dir() and __all__, and the names docs/design.md's contract calls are in it."""

import inspect
import pathlib
import re
import subprocess
import sys

import gae_deferred

DESIGN = pathlib.Path(__file__).resolve().parent.parent / "docs" / "design.md"


def _contract_section() -> str:
    text = DESIGN.read_text(encoding="utf-8")
    start = text.index("## The library — contract names")
    return text[start : text.index("\n## ", start + 1)]


def _parameters_of_public_callables() -> set[str]:
    names: set[str] = set()
    for name in gae_deferred.__all__:
        value = getattr(gae_deferred, name)
        if inspect.isfunction(value):
            names.update(inspect.signature(value).parameters)
    return names


def test_every_function_and_error_the_contract_names_is_public():
    section = _contract_section()
    # `name(` opens a call; a parameter of a public function (`fn(entity)`) is not a name.
    parameters = _parameters_of_public_callables() - set(gae_deferred.__all__)
    calls = set(re.findall(r"`([a-z_][a-z0-9_]*)\(", section)) - parameters
    # Exceptions of other libraries are named as theirs: "ndb's `RetryError`".
    errors = set(re.findall(r"(?<!'s )`([A-Z][A-Za-z]*(?:Error|Failure))`", section))
    assert {"defer", "batch", "iterate", "configure", "run", "serialize"} <= calls
    assert {"DeferError", "PermanentTaskFailure", "TaskAlreadyExistsError"} <= errors
    assert sorted((calls | errors) - set(gae_deferred.__all__)) == []


def test_a_star_import_brings_exactly_all_and_nothing_of_webapp2():
    script = (
        "import sys\n"
        "before = set(globals())\n"
        "from gae_deferred import *\n"
        "print(' '.join(sorted(set(globals()) - before - {'before'})))\n"
        "print('webapp2' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    )
    starred, webapp2_loaded = result.stdout.splitlines()
    assert starred.split() == gae_deferred.__all__
    assert webapp2_loaded == "False"
    assert "TaskHandler" not in gae_deferred.__all__ and "TaskHandler" in dir(gae_deferred)
    assert len(set(gae_deferred.__all__)) == len(gae_deferred.__all__)


def test_no_public_name_is_also_a_submodule_that_would_shadow_it():
    """Importing a submodule sets it on the package: a submodule named like a public function
    (``gae_deferred.batch`` was both) made ``gae_deferred.batch()`` a module after
    ``import gae_deferred.batch``. Each submodule is imported first, in a fresh interpreter."""
    package = pathlib.Path(gae_deferred.__file__).parent
    modules = {path.stem for path in package.glob("*.py")} | {
        path.name for path in package.iterdir() if (path / "__init__.py").exists()
    }
    functions = {name for name in gae_deferred.__all__ if callable(getattr(gae_deferred, name))}
    assert modules & functions == set()
    script = (
        "import importlib, gae_deferred\n"
        f"for name in {sorted(modules - {'__init__', '__main__'})!r}:\n"
        "    importlib.import_module('gae_deferred.' + name)\n"
        "assert callable(gae_deferred.batch) and callable(gae_deferred.defer)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
