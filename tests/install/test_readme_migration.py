"""README's "Add it to an existing app", followed literally on an app that never heard of us.

tests/legacy_app is a guestbook: a webapp2 app on the python3 runtime with its own handlers/
package, templates/, static/, main.py, app.yaml (its own static handler), queue.yaml (its own
queues, `default` included), index.yaml, cron.yaml and requirements.txt. Its code is what it
is after the import swap (``from gae_deferred import defer``): the README's steps are about
wiring, and they are what this module applies, block by block, from the README itself:

1. the wheel of this checkout goes where the README's `pip wheel` command puts it, and
   requirements.txt gets the README's line for it, as written;
2. main.py becomes the README's main.py;
4. cron.yaml's list gets the sweeper;
7. main.py gets the Secret Manager block, requirements.txt its client (under the local stack
   its key wins: were Secret Manager called, without credentials here, no defer() would work);
8. its pip commands run in a fresh virtualenv, in the app's folder (their order is part of the
   contract: gae-deferred is not on PyPI), then `gae-deferred-dev app.yaml`, on free ports;
5. the first start prints the missing indexes: they go at the end of index.yaml's list, and
   the next start warns of nothing.

Then the app is used as its owner would, in Chromium: sign the guestbook, see the deferred
review publish the greeting, find the failed mail on the dashboard, press Retry now, see the
mail go out. Steps 3 and 6 leave queue.yaml and app.yaml as they are, and they keep working:
the mail queue's retry limit makes the failure a dead letter, the static handlers serve the
app's files.
"""

from __future__ import annotations

import difflib
import pathlib
import re
import shlex
import shutil
import textwrap
from collections.abc import Iterator

import pytest
import yaml
from playwright.sync_api import Browser

from tests.fixtures import ROOT
from tests.install.conftest import DevServer, make_venv, pip_install, site_packages
from tests.stack_support import wait_for

LEGACY_APP = ROOT / "tests" / "legacy_app"
#: The README's requirement line: the wheel of this version in the app's wheels/ folder.
README_REQUIREMENT = re.compile(r"\./wheels/gae_deferred-(?P<version>[^-]+)-py3-none-any\.whl")
#: The README's command that builds it there, from a checkout of the repository.
README_WHEEL_COMMAND = "$ pip wheel --no-deps -w path/to/your-app/wheels path/to/gae_deferred"


class Readme:
    """The numbered steps of README.md's "Add it to an existing app", and their blocks."""

    def __init__(self) -> None:
        text = (ROOT / "README.md").read_text()
        start = text.index("\n## Add it to an existing app\n")
        self.section = text[start : text.index("\n## ", start + 1)]

    def step(self, number: int) -> str:
        found = re.search(rf"^{number}\. (.*?)(?=^\d+\. |\Z)", self.section, re.S | re.M)
        assert found, f"the README has no step {number}"
        return found.group(1)

    def says(self, number: int, words: str) -> bool:
        """Whether step ``number`` says ``words`` (however its lines wrap)."""
        return words in " ".join(self.step(number).split())

    def blocks(self, number: int) -> list[str]:
        """Step ``number``'s fenced blocks, as a user copies them (without the list's indent)."""
        found = re.findall(r"^ *```\w*\n(.*?)^ *```", self.step(number), re.S | re.M)
        return [textwrap.dedent(body) for body in found]

    def block(self, number: int) -> str:
        """Step ``number``'s one fenced block."""
        (body,) = self.blocks(number)
        return body


def apply_readme(readme: Readme, app_dir: pathlib.Path, wheel: pathlib.Path) -> None:
    """Steps 1, 2, 4 and 7 on the app's files, as the README words them."""
    # 1. The README's `pip wheel` writes the checkout's wheel into the app's wheels/ folder (the
    # wheel fixture built it so, from a clean copy); its line goes into requirements.txt as
    # written, and names that very file, of this version.
    command, requirement = readme.blocks(1)
    assert command.strip() == README_WHEEL_COMMAND
    (line,) = requirement.splitlines()
    named = README_REQUIREMENT.fullmatch(line)
    assert named, line
    assert wheel.name.split("-")[1] == named["version"]
    (app_dir / "wheels").mkdir()
    shutil.copy(wheel, app_dir / "wheels" / wheel.name)
    assert (app_dir / line).is_file(), f"{line} is not the wheel `pip wheel` wrote"
    with (app_dir / "requirements.txt").open("a") as requirements:
        requirements.write(line + "\n")

    # 2. The README's main.py is the app's main.py with its lines changed: nothing of the app's
    # goes but the line that makes the app.
    before = (app_dir / "main.py").read_text().splitlines()
    after = readme.block(2)
    diff = list(difflib.ndiff(before, after.splitlines()))
    removed = [line[2:] for line in diff if line[0] == "-"]
    assert removed == ["app = webapp2.WSGIApplication(ROUTES)"], removed
    # The promise: at most three lines of code (the block's file comment aside).
    added = [line[2:] for line in diff if line[0] == "+" and line[2:].strip()]
    assert len([line for line in added if not line.startswith("#")]) <= 3, added
    (app_dir / "main.py").write_text(after)

    # 4. The block's list items, after the app's.
    assert readme.says(4, "add the sweeper to its `cron:` list")
    header, *jobs = readme.block(4).splitlines()[1:]
    assert header == "cron:"
    with (app_dir / "cron.yaml").open("a") as cron_yaml:
        cron_yaml.write("\n".join(jobs) + "\n")

    # 7. "add `google-cloud-secret-manager` to requirements.txt and this to main.py".
    clients = re.findall(r"add\s+`([^`]+)`\s+to requirements\.txt", readme.step(7))
    assert clients == ["google-cloud-secret-manager"], "step 7 must name its block's requirement"
    (client,) = clients
    with (app_dir / "requirements.txt").open("a") as requirements:
        requirements.write(client + "\n")
    with (app_dir / "main.py").open("a") as main_py:
        main_py.write("\n\n" + readme.block(7))


def run_step_8_installs(readme: Readme, app_dir: pathlib.Path, venv: pathlib.Path) -> None:
    """Step 8's commands before ``gae-deferred-dev app.yaml``, in the app's folder."""
    *installs, serve = (
        shlex.split(line.removeprefix("$ ")) for line in readme.block(8).splitlines()
    )
    assert serve == ["gae-deferred-dev", "app.yaml"]  # DevServer runs it, on free ports
    for argv in installs:
        assert argv[:2] == ["pip", "install"], argv
        pip_install(venv, *argv[2:], cwd=app_dir)


def pasted_indexes(warning: str) -> str:
    """The YAML gae-deferred-dev prints after "Add under `indexes:`", as a user selects it."""
    lines = warning.split("`indexes:`", 1)[1].splitlines()[1:]
    yaml_lines = []
    for line in lines:
        if line and not line.startswith(("- ", "  ")):
            break
        yaml_lines.append(line)
    return "\n".join(yaml_lines).strip() + "\n"


class Guestbook:
    """The migrated app: its folder, its virtualenv, and what its first start printed."""

    def __init__(self, readme: Readme, app_dir: pathlib.Path, venv: pathlib.Path) -> None:
        self.app_dir = app_dir
        self.venv = venv
        self.first_warning = DevServer(venv, app_dir).stop()
        assert readme.says(5, "ready to paste at the end of its `indexes:` list")
        with (app_dir / "index.yaml").open("a") as index_yaml:
            index_yaml.write("\n" + pasted_indexes(self.first_warning))
        # The stack calls cron.yaml's URLs every 2 s instead of every minute.
        self.server = DevServer(venv, app_dir, "--cron-every", "2")


@pytest.fixture(scope="module")
def guestbook(wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Guestbook]:
    readme = Readme()
    app_dir = tmp_path_factory.mktemp("migration") / "guestbook"
    shutil.copytree(LEGACY_APP, app_dir, ignore=shutil.ignore_patterns("__pycache__", ".local"))
    apply_readme(readme, app_dir, wheel)
    venv = make_venv(tmp_path_factory.mktemp("guestbook-venv") / "venv")
    run_step_8_installs(readme, app_dir, venv)
    app = Guestbook(readme, app_dir, venv)
    yield app
    if app.server.process.poll() is None:
        app.server.stop()


def test_the_first_start_prints_the_missing_indexes_ready_to_paste(guestbook: Guestbook) -> None:
    from gae_deferred.local.datastore import load_index_yaml

    package = load_index_yaml(site_packages(guestbook.venv) / "gae_deferred" / "index.yaml")
    # One warning, the indexes' (step 6: app.yaml needs nothing, and gets no warning).
    assert guestbook.first_warning.count("warning:") == 1, guestbook.first_warning
    assert f"lacks {len(package)} of gae_deferred's Datastore indexes" in guestbook.first_warning
    # Pasted at the end of the app's list, they join its own index.
    own = load_index_yaml(LEGACY_APP / "index.yaml")
    assert load_index_yaml(guestbook.app_dir / "index.yaml") == own + package


@pytest.mark.browser
def test_sign_the_guestbook_then_retry_its_failed_mail_from_the_dashboard(
    guestbook: Guestbook, browser: Browser
) -> None:
    """Step 8: "Defer from your code, watch it run, retrigger failures from the dashboard"."""
    server = guestbook.server
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    errors: list[str] = []
    tab.on("console", lambda message: message.type == "error" and errors.append(message.text))
    tab.on("pageerror", lambda error: errors.append(str(error)))
    try:
        # The app's own page: its template, its stylesheet from app.yaml's static handler.
        with tab.expect_response(f"{server.url}/static/guestbook.css") as app_css:
            tab.goto(f"{server.url}/")
        assert app_css.value.ok
        assert tab.eval_on_selector("h1", "h1 => getComputedStyle(h1).color") == "rgb(0, 100, 0)"
        tab.fill("textarea[name=content]", "Hello from the README")
        with tab.expect_navigation():  # the form posts, the app redirects to its page
            tab.click("button:has-text('Sign Guestbook')")
        greeting = tab.locator("blockquote.greeting", has_text="Hello from the README")

        def greeting_says(text: str) -> bool:
            tab.goto(f"{server.url}/")
            return text in greeting.inner_text()

        # tasks.review, deferred by the Sign handler onto the default queue, publishes it.
        wait_for(lambda: greeting_says("published"), "the deferred review to publish it", 30)
        assert "moderators not notified yet" in greeting.inner_text()

        # The dashboard, with its stylesheet from the installed package.
        installed_css = site_packages(guestbook.venv) / "gae_deferred" / "webapp2" / "static"
        with tab.expect_response(re.compile(r"/_ah/deferred-admin/static/admin\.css$")) as css:
            tab.goto(f"{server.url}/_ah/deferred-admin")
        assert css.value.body() == (installed_css / "deferred_admin" / "admin.css").read_bytes()
        sheets = tab.evaluate("[...document.styleSheets].map(s => [s.href, s.cssRules.length])")
        assert [href for href, rules in sheets if rules] == [css.value.url]
        tab.click("header nav >> text=Failures")
        row = tab.locator("tr", has_text="tasks.notify_moderators")
        wait_for(lambda: tab.reload() and row.count() == 1, "the failed mail to be listed", 30)
        assert "tasks.MailRelayError" in row.inner_text()
        row.locator("text=Show").click()
        failure = tab.locator("details.failure")
        failure.locator("summary").click()
        # The mail queue of the app's queue.yaml never retries: the first failure is dead.
        assert failure.locator("summary .state").inner_text() == "dead"
        assert "451 greylisted" in failure.locator("pre.message").inner_text()
        failure.locator("text=Permalink").click()

        # Deferred by the app's request, and the task's log line carries that request's trace.
        origin = tab.locator("dt:has-text('Deferred by') + dd").inner_text()
        path, trace = re.match(r"(\S+) · trace ([0-9a-f]{32})", origin).groups()
        assert path == "/sign"
        logged = rf"ERROR gae_deferred \[trace {trace[:8]}\]: task \S+ \(tasks.notify_moderators\)"
        assert re.search(logged, server.log()), logged

        tab.click("button:has-text('Retry now')")
        assert "Retrying failure" in tab.locator(".flash").inner_text()
        failure_page = tab.url
        tab.goto(f"{server.url}/")
        wait_for(lambda: greeting_says("moderators notified"), "the retried mail to go out", 30)
        tab.goto(failure_page)
        assert tab.locator(".facts .state").inner_text() == "resolved"
    finally:
        context.close()
    assert errors == [], errors


def test_the_apps_cron_job_and_the_sweeper_both_run(guestbook: Guestbook) -> None:
    """Step 4: cron.yaml keeps the app's job and gets the sweeper; the stack calls both."""
    jobs = yaml.safe_load((guestbook.app_dir / "cron.yaml").read_text())["cron"]
    urls = [job["url"] for job in jobs]
    assert urls == ["/tasks/prune", "/_ah/deferred-admin/cron/sweep"]
    wait_for(
        lambda: all(f'"GET {url} HTTP/1.1" 200' in guestbook.server.log() for url in urls),
        "both cron URLs to answer 200",
        30,
    )


def test_queue_sync_finds_the_queues_the_stack_made(guestbook: Guestbook) -> None:
    """Step 3's command, in another shell pointed at the stack (docs/local-stack.md): the
    emulator holds the app's queues exactly as its queue.yaml says."""
    out = guestbook.server.shell(". .local/env && python -m gae_deferred.queues sync queue.yaml")
    assert out == "synced: 0 created, 0 updated\n"


def test_the_next_start_warns_of_nothing_and_stops_cleanly(guestbook: Guestbook) -> None:
    """Last: stops the module's app. Step 5: with the pasted indexes, no warning."""
    err = guestbook.server.stop()
    assert "warning" not in err and "Traceback" not in err, err
