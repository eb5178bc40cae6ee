"""Install fixtures: the wheel of this checkout, and fresh venvs with it installed.

    def test_something(full_venv):        # the wheel + its deps + the [local] extra
        run_python(full_venv, "import gae_deferred.local.dev")

    def test_other(core_venv):            # the wheel --no-deps + the core deps only
        run_python(core_venv, "import gae_deferred")

    server = DevServer(full_venv, app_dir)  # the venv's gae-deferred-dev app.yaml, free ports
    server.get("/")

The wheel is built from a clean copy of the checkout's files (no stale build/ leftovers) and
cached by their content in pytest's cache dir; each venv is made once per session. pip's own
cache makes the dependency installs quick after the first run. Versions are pinned to the
requirements files CI tests.
"""

from __future__ import annotations

import hashlib
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import tomllib
from collections.abc import Sequence

import pytest
import requests

from tests.fixtures import ROOT

INSTALL_DIR = pathlib.Path(__file__).resolve().parent
#: Runtime dependencies the core (``import gae_deferred``) must do without.
WEB_ONLY = ("webapp2", "webob", "jinja2")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Everything here builds and installs the package and runs real processes: e2e."""
    for item in items:
        if INSTALL_DIR in pathlib.Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)


def run(argv: Sequence[str | pathlib.Path], **options) -> subprocess.CompletedProcess:
    """Run a command, failing the test with its output if it fails."""
    done = subprocess.run(
        [str(a) for a in argv], capture_output=True, text=True, timeout=900, **options
    )
    if done.returncode != 0:
        pytest.fail(f"{' '.join(map(str, argv))} failed ({done.returncode}):\n{done.stderr}")
    return done


def run_python(venv: pathlib.Path, code: str, **options) -> str:
    """Run ``code`` with the venv's python (from a directory without this checkout)."""
    options.setdefault("cwd", venv)
    return run([venv / "bin" / "python", "-c", code], **options).stdout


def _source_files() -> list[str]:
    listed = run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT).stdout
    return sorted(name for name in listed.split("\0") if name and (ROOT / name).is_file())


@pytest.fixture(scope="session")
def wheel(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """``pip wheel --no-deps`` of this checkout, rebuilt only when a file changed."""
    files = _source_files()
    digest = hashlib.sha256()
    for name in files:
        digest.update(name.encode() + b"\0" + (ROOT / name).read_bytes())
    cache = request.config.cache.mkdir("gae-deferred-wheel") / digest.hexdigest()[:16]
    built = sorted(cache.glob("gae_deferred-*.whl"))
    if built:
        return built[0]
    source = tmp_path_factory.mktemp("source")
    for name in files:
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, source / name)
    staging = tmp_path_factory.mktemp("wheel")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", staging, source])
    (wheel_file,) = staging.glob("gae_deferred-*.whl")
    cache.mkdir(parents=True, exist_ok=True)
    return pathlib.Path(shutil.copy2(wheel_file, cache / wheel_file.name))


def _constraints(directory: pathlib.Path) -> pathlib.Path:
    """The exact versions of requirements*.txt (without their `-r` and `.` lines)."""
    pins = []
    for name in ("requirements.txt", "requirements-dev.txt"):
        for line in (ROOT / name).read_text().splitlines():
            line = line.split("#", 1)[0].strip()
            if line and "==" in line:
                pins.append(line)
    path = directory / "constraints.txt"
    path.write_text("\n".join(pins) + "\n")
    return path


def make_venv(directory: pathlib.Path) -> pathlib.Path:
    run([sys.executable, "-m", "venv", directory])
    return directory


def pip_install(venv: pathlib.Path, *args: str | pathlib.Path, **options) -> None:
    """``pip install *args`` with the venv's pip, held to the versions CI tests."""
    pip = [venv / "bin" / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    run([*pip, "-c", _constraints(venv), *args], **options)


@pytest.fixture(scope="session")
def full_venv(wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A fresh venv with the wheel, its dependencies and the ``[local]`` extra."""
    venv = make_venv(tmp_path_factory.mktemp("full") / "venv")
    pip_install(venv, f"gae-deferred[local] @ {wheel.as_uri()}")
    return venv


@pytest.fixture(scope="session")
def core_venv(wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """A fresh venv with the wheel (--no-deps) and only the core's dependencies."""
    venv = make_venv(tmp_path_factory.mktemp("core") / "venv")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = [
        requirement
        for requirement in project["dependencies"]
        if not requirement.lower().startswith(WEB_ONLY)
    ]
    pip_install(venv, *core)
    pip_install(venv, "--no-deps", wheel)
    return venv


def site_packages(venv: pathlib.Path) -> pathlib.Path:
    (found,) = (venv / "lib").glob("python3.*/site-packages")
    return found


class DevServer:
    """``gae-deferred-dev app.yaml`` in ``app_dir``, the command ``venv`` installed, as a user
    runs it, on free ports; ``options`` are more of its command-line options."""

    def __init__(self, venv: pathlib.Path, app_dir: pathlib.Path, *options: str) -> None:
        self.app_dir = app_dir
        # A user's shell: the venv's commands first, nothing of this test run's settings.
        env = {k: v for k, v in os.environ.items() if not k.startswith(("GAE_", "PYTHON"))}
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env['PATH']}"
        self.env = env
        self.process = subprocess.Popen(
            [
                *("gae-deferred-dev", "app.yaml", "--port", "0", "--datastore-port", "0"),
                *("--tasks-port", "0", "--no-reload", "--quiet", *options),
            ],
            cwd=app_dir,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        printed = ""
        assert self.process.stdout is not None
        for line in self.process.stdout:
            printed += line
            if line.startswith("Ctrl-C stops everything"):
                break
        else:
            pytest.fail(f"gae-deferred-dev exited: {self.process.communicate()}")
        self.url = re.search(r"^  app\s+(\S+)/", printed, re.M).group(1)

    def get(self, path: str, **params: str) -> requests.Response:
        answer = requests.get(self.url + path, params=params, timeout=30)
        assert answer.status_code == 200, (path, answer.status_code, answer.text[:500])
        return answer

    def shell(self, command: str) -> str:
        """Run ``command`` in another shell of the user's, in the app's folder; its stdout."""
        return run(["bash", "-c", command], cwd=self.app_dir, env=self.env).stdout

    def log(self, child: str = "app") -> str:
        """What a child of the stack wrote to ``.local/logs/`` (``--quiet`` sends it there)."""
        return (self.app_dir / ".local" / "logs" / f"{child}.log").read_text()

    def stop(self) -> str:
        """Stop it as Ctrl-C would; returns what it printed on stderr (its warnings)."""
        self.process.send_signal(signal.SIGTERM)
        _, err = self.process.communicate(timeout=60)
        assert self.process.returncode == 0, err
        return err
