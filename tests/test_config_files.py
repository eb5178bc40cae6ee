"""app.yaml, cron.yaml, queue.yaml and index.yaml agree with the code that reads them."""

from __future__ import annotations

import webapp2
import webtest
import yaml

from gae_deferred.local.app_yaml import StaticHandler, deploy_problems, load_app_yaml
from gae_deferred.local.datastore import load_index_yaml
from gae_deferred.local.dev import missing_package_indexes, package_indexes
from gae_deferred.queue_config import load_queue_yaml
from gae_deferred.webapp2 import deferred_routes
from tests import pythons
from tests.fixtures import ROOT


def test_app_yaml_targets_a_python_ci_tests_and_our_entrypoint():
    app = load_app_yaml(ROOT / "app.yaml")
    # The newest of the Pythons `make test` runs (tests/pythons.py); the comment names them all.
    assert app.document["runtime"] == "python313"
    assert pythons.SUPPORTED[-1] == "3.13"
    comment = (ROOT / "app.yaml").read_text().split("\nruntime:", 1)[0]
    for version in pythons.SUPPORTED:
        assert f"python{version.replace('.', '')}" in comment
    assert app.document["entrypoint"].startswith("gunicorn ") and app.wsgi_app == "main:app"
    static = [h for h in app.handlers if isinstance(h, StaticHandler)]
    assert static and all(h.root.is_dir() for h in static)


def test_app_yaml_deploys_on_the_python3_runtime():
    document = yaml.safe_load((ROOT / "app.yaml").read_text())
    assert deploy_problems(document) == []
    assert all("login" not in handler for handler in document["handlers"])


def test_app_yaml_commented_alternative_is_login_admin_with_the_bundled_services():
    text = (ROOT / "app.yaml").read_text()
    block = text[text.index("# The alternative") :].split("\n#\n", 1)[1]
    alternative = yaml.safe_load("\n".join(line[2:] for line in block.splitlines()))
    document = {**yaml.safe_load(text), **alternative}
    admin_only = {h["url"] for h in document["handlers"] if h.get("login") == "admin"}
    assert admin_only == {"/_ah/queue/deferred.*", "/_ah/deferred-admin.*"}
    assert deploy_problems(document) == []
    del document["app_engine_apis"]
    assert [p for p in deploy_problems(document) if "'login' needs app_engine_apis" in p]


def test_deploy_problems_refuse_python27_fields_and_login_without_bundled_services():
    document = {
        "runtime": "python27",
        "api_version": 1,
        "threadsafe": True,
        "libraries": [{"name": "webapp2", "version": "latest"}],
        "builtins": [{"deferred": "on"}],
        "skip_files": ["^x$"],
        "handlers": [
            {"url": "/s", "static_dir": "s", "application_readable": True},
            {"url": "/admin.*", "script": "main.app", "login": "admin"},
        ],
    }
    problems = "\n".join(deploy_problems(document))
    for field in ("api_version", "threadsafe", "libraries", "builtins", "skip_files"):
        assert f"'{field}' is a python27 field" in problems
    assert "'application_readable' is a python27 field" in problems
    assert "runtime 'python27' is not a python3 runtime" in problems
    assert "handler #2 (/admin.*): script must be 'auto'" in problems
    assert "handler #2 (/admin.*): 'login' needs app_engine_apis: true" in problems
    fixed = {
        "runtime": "python312",
        "app_engine_apis": True,
        "handlers": [{"url": "/admin.*", "script": "auto", "login": "admin"}],
    }
    assert deploy_problems(fixed) == []


def test_cron_yaml_urls_are_routed(ndb_stub):
    app = webtest.TestApp(webapp2.WSGIApplication(deferred_routes()))
    for job in yaml.safe_load((ROOT / "cron.yaml").read_text())["cron"]:
        # Not from App Engine cron nor an admin here: refused, but routed (not a 404).
        assert app.get(job["url"], expect_errors=True).status_int == 403


def test_queue_yaml_and_index_yaml_load():
    queues = load_queue_yaml(ROOT / "queue.yaml")
    assert {"default", "reports"} <= set(queues)
    assert queues["reports"].retry.task_retry_limit == 3
    kinds = {index.kind for index in load_index_yaml(ROOT / "index.yaml")}
    assert {"_DeferredPayload", "_DeferredFailure"} <= kinds


def test_this_apps_index_yaml_and_the_packages_agree_on_gae_deferreds_indexes():
    """The dashboard and sweeper tests run on this app's index.yaml (the emulator and the stub
    refuse a query whose index it lacks); apps get the package's: it must hold them all."""
    packaged = package_indexes()
    ours = [i for i in load_index_yaml(ROOT / "index.yaml") if i.kind.startswith("_Deferred")]
    assert [index for index in ours if index not in packaged] == []
    assert missing_package_indexes(ROOT / "index.yaml") == []


def test_every_package_folder_is_in_the_wheel():
    """pyproject.toml lists the packages explicitly (the folders map into one package): a new
    subpackage left out would import from a checkout and be missing from the wheel."""
    import tomllib

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    for package, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder).parts
            assert ".".join((package, *relative)) in listed, init
