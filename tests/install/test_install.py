"""The wheel as a user installs it: one top-level package, a core without web deps, and a sample
app of its own (tests/sample_app) under the installed gae-deferred-dev."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
from collections.abc import Iterator

import pytest

import gae_deferred
from tests.install.conftest import WEB_ONLY, DevServer, run, run_python, site_packages
from tests.stack_support import wait_for

SAMPLE_APP = pathlib.Path(__file__).resolve().parents[1] / "sample_app"
#: What ``import gae_deferred`` must work without, and must not import (the core is
#: framework-free). Checks of further core modules go here too.
CORE_IMPORTS = ("gae_deferred", "gae_deferred.queue_config")


def test_the_wheel_installs_one_top_level_package(full_venv: pathlib.Path) -> None:
    site = site_packages(full_venv)
    (dist_info,) = site.glob("gae_deferred-*.dist-info")
    assert (dist_info / "top_level.txt").read_text().split() == ["gae_deferred"]
    script = full_venv / "bin" / "gae-deferred-dev"
    allowed = [path.resolve() for path in (site / "gae_deferred", dist_info, script)]
    for line in (dist_info / "RECORD").read_text().splitlines():
        installed = (site / line.rsplit(",", 2)[0]).resolve()
        assert any(installed.is_relative_to(root) for root in allowed), installed
    for name in ("handlers", "emulators", "lib", "demo", "main.py", "templates", "static", "tests"):
        assert not (site / name).exists(), f"{name} installed at the top of site-packages"
    package = site / "gae_deferred"
    assert (package / "index.yaml").is_file()
    assert (package / "webapp2" / "static" / "deferred_admin" / "admin.css").is_file()
    assert (package / "webapp2" / "templates" / "deferred_admin" / "base.html").is_file()
    assert (full_venv / "bin" / "gae-deferred-dev").is_file()


def test_the_core_imports_without_webapp2_or_jinja2(core_venv: pathlib.Path) -> None:
    checks = f"""
import importlib, importlib.util, sys
web_only = {WEB_ONLY!r}
assert all(importlib.util.find_spec(name) is None for name in web_only), "web deps installed"
for name in {CORE_IMPORTS!r}:
    importlib.import_module(name)
loaded = sorted(m for m in sys.modules if m.split(".")[0].lower() in web_only)
assert not loaded, loaded
import gae_deferred
print(gae_deferred.__file__)
"""
    where = run_python(core_venv, checks).strip()
    assert pathlib.Path(where).is_relative_to(site_packages(core_venv))
    # And the web half says what is missing instead of half-working.
    failed = subprocess.run(
        [core_venv / "bin" / "python", "-c", "import gae_deferred.webapp2"],
        capture_output=True,
        text=True,
        cwd=core_venv,
    )
    assert failed.returncode != 0 and "webapp2" in failed.stderr


@pytest.mark.parametrize("form", ["bytecode only", "zipped"])
def test_the_public_names_work_without_the_py_sources(
    core_venv: pathlib.Path, tmp_path: pathlib.Path, form: str
) -> None:
    """Some images ship bytecode alone (``compileall -b``, then the .py files removed) and some
    apps import packages from a zip: the public names still resolve, from ``__init__.pyi``."""
    place = tmp_path / "packages"
    shutil.copytree(
        site_packages(core_venv) / "gae_deferred",
        place / "gae_deferred",
        ignore=shutil.ignore_patterns("__pycache__", "webapp2", "local"),
    )
    if form == "bytecode only":
        run([core_venv / "bin" / "python", "-m", "compileall", "-q", "-b", place])
        for source in (place / "gae_deferred").rglob("*.py"):
            source.unlink()
        path = place
    else:
        path = pathlib.Path(shutil.make_archive(str(tmp_path / "packages"), "zip", place))
    checks = """
import gae_deferred
assert gae_deferred.__file__.endswith(("__init__.pyc", "__init__.py")), gae_deferred.__file__
assert callable(gae_deferred.defer) and callable(gae_deferred.batch)
assert issubclass(gae_deferred.DeferError, gae_deferred.Error)
assert "defer" in gae_deferred.__all__ and "TaskHandler" not in gae_deferred.__all__
print(len(gae_deferred.__all__), gae_deferred.__file__)
"""
    env = {**os.environ, "PYTHONPATH": str(path)}
    count, where = run_python(core_venv, checks, env=env).split()
    assert int(count) == len(gae_deferred.__all__) and where.startswith(str(path))
    assert where.endswith(".pyc" if form == "bytecode only" else ".py")


@pytest.fixture(scope="module")
def sample_app(
    full_venv: pathlib.Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DevServer]:
    app_dir = tmp_path_factory.mktemp("sample") / "app"
    shutil.copytree(SAMPLE_APP, app_dir, ignore=shutil.ignore_patterns("__pycache__", ".local"))
    # What the app's owner does: take gae_deferred's indexes into the app's index.yaml.
    shutil.copy(site_packages(full_venv) / "gae_deferred" / "index.yaml", app_dir / "index.yaml")
    running = DevServer(full_venv, app_dir)
    yield running
    if running.process.poll() is None:
        running.stop()


def test_the_sample_app_imports_its_own_handlers_and_the_installed_package(
    sample_app: DevServer, full_venv: pathlib.Path
) -> None:
    where = sample_app.get("/where").json()
    assert pathlib.Path(where["gae_deferred"]).is_relative_to(site_packages(full_venv))
    assert where["handlers"] == str(sample_app.app_dir / "handlers" / "__init__.py")
    assert "Hello from the sample app" in sample_app.get("/").text


def test_the_apps_static_handler_serves_its_files(sample_app: DevServer) -> None:
    css = sample_app.get("/static/sample.css")
    assert css.headers["Content-Type"] == "text/css" and "darkgreen" in css.text


def test_the_dashboard_and_its_stylesheet_come_from_the_package(
    sample_app: DevServer, full_venv: pathlib.Path
) -> None:
    page = sample_app.get("/_ah/deferred-admin")
    assert 'href="/_ah/deferred-admin/static/admin.css"' in page.text
    css = sample_app.get("/_ah/deferred-admin/static/admin.css")
    installed = site_packages(full_venv) / "gae_deferred/webapp2/static/deferred_admin/admin.css"
    assert css.headers["Content-Type"].startswith("text/css")
    assert css.content == installed.read_bytes()


def test_the_apps_queue_yaml_queues_are_listed(sample_app: DevServer) -> None:
    listed = json.dumps(sample_app.get("/_ah/deferred-admin/api/queues").json())
    assert "sample-reports" in listed


def test_a_task_deferred_by_the_apps_own_module_runs(
    sample_app: DevServer, tmp_path: pathlib.Path
) -> None:
    task_name = sample_app.get("/defer", dir=str(tmp_path), label="report-1").text
    assert task_name
    done = tmp_path / "report-1"
    wait_for(lambda: done.exists() and done.read_text(), "the deferred report to run", 30)
    queue, pid = done.read_text().split()
    assert queue == "sample-reports" and int(pid) != os.getpid()


def test_the_sample_app_stops_cleanly(sample_app: DevServer) -> None:
    """Last: stops the module's app. No warning: its index.yaml has gae_deferred's indexes."""
    err = sample_app.stop()
    assert "warning" not in err and "Traceback" not in err


def test_pip_installs_the_wheel_on_this_python_without_flags(full_venv: pathlib.Path) -> None:
    """`make test` runs this on 3.11, 3.12 and 3.13: a plain `pip install` (full_venv's, no
    --ignore-requires-python) of the wheel, and webapp2's `import cgi` works (legacy-cgi on
    3.13, which removed the module)."""
    checks = """
import importlib.metadata, sys
import gae_deferred.webapp2, cgi
meta = importlib.metadata.metadata("gae-deferred")
print(json.dumps({
    "python": "%d.%d" % sys.version_info[:2],
    "requires_python": meta["Requires-Python"],
    "requires": [r for r in meta.get_all("Requires-Dist") if r.startswith("legacy-cgi")],
    "cgi": importlib.metadata.distribution("legacy-cgi").version
        if sys.version_info >= (3, 13) else None,
}))
"""
    found = json.loads(run_python(full_venv, "import json\n" + checks))
    assert found["python"] == f"{sys.version_info.major}.{sys.version_info.minor}"
    assert found["requires_python"] == ">=3.11"
    assert found["requires"] == ['legacy-cgi>=2.6; python_version >= "3.13"']
    assert (found["cgi"] is not None) == (sys.version_info >= (3, 13))


def test_the_testing_extra_brings_what_the_deferred_tasks_fixture_needs(
    wheel: pathlib.Path, tmp_path: pathlib.Path
) -> None:
    """README: `pip install './wheels/<the wheel>[testing]'`, and nothing else, runs a test
    that uses the deferred_tasks fixture (pytest comes with the extra)."""
    from tests.install.conftest import make_venv, pip_install

    app_dir = tmp_path / "app"
    (app_dir / "wheels").mkdir(parents=True)
    shutil.copy(wheel, app_dir / "wheels" / wheel.name)
    (app_dir / "test_it.py").write_text(
        "import operator\n\nfrom gae_deferred import defer\n\n\n"
        "def test_capture(deferred_tasks):\n"
        "    defer(operator.add, 1, 2)\n"
        "    assert deferred_tasks.run_all() == 1\n"
    )
    venv = make_venv(tmp_path / "venv")
    pip_install(venv, f"./wheels/{wheel.name}[testing]", cwd=app_dir)
    done = subprocess.run(
        [venv / "bin" / "python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_it.py"],
        cwd=app_dir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout
