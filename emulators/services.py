"""Several services of one app, as ``dev_appserver.py default/app.yaml worker/app.yaml`` ran them.

``gae-deferred-dev default/app.yaml worker/app.yaml`` (:mod:`.dev`) runs each service on its own
port, with its own folder, entrypoint and ``env_variables``; they share the Datastore and Cloud
Tasks emulators, the signing key and ``.local/`` of the default service (the one whose
app.yaml names no ``service:``, or ``service: default``), whose queue.yaml, index.yaml and
cron.yaml are the app's, as on App Engine. The Cloud Tasks emulator delivers each task to the
service its App Engine routing names (``defer(..., _target="worker")``)::

    with service_stack(["default/app.yaml", "worker/app.yaml"], app_port=0, ...) as stack:
        stack.services["worker"].app_url
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Any

from .app_yaml import AppYaml, load_app_yaml
from .cloudtasks.routing import DEFAULT_SERVICE
from .errors import AppYamlError
from .stack import LocalStack, free_port


def service_name(app: AppYaml) -> str:
    """The service an app.yaml deploys (``service:``, legacy ``module:``, else default)."""
    name = app.document.get("service") or app.document.get("module") or DEFAULT_SERVICE
    return str(name)


class ServiceApp(LocalStack):
    """One more service: its front end and gunicorn only, on the stack of the default service
    (its emulators, signing key, queue.yaml; logs under ``.local/services/<name>/``)."""

    def __init__(self, main: LocalStack, app: AppYaml, name: str) -> None:
        super().__init__(
            app.path,
            base_dir=main.base_dir / "services" / name,
            app_port=0,
            datastore_port=main.datastore_port,
            tasks_port=main.tasks_port,
            host=main.host,
            project=main.project,
            location=main.location,
            reload=main.reload,
            workers=main.workers,
            threads=main.threads,
            extra_pythonpath=main.extra_pythonpath,
            front_options=main.front_options,
            startup_timeout=main.startup_timeout,
            stop_timeout=main.stop_timeout,
            echo=main.echo,
        )
        self.main = main
        self.name = name
        # App-wide files: the default service's, never one beside this app.yaml.
        self.queue_yaml = main.queue_yaml
        self.index_yaml = main.index_yaml

    @property
    def signing_key_file(self) -> pathlib.Path:
        return self.main.signing_key_file

    def _child_env(self, *, app: bool = False) -> dict[str, str]:
        env = super()._child_env(app=app)
        if app:
            env["GAE_SERVICE"] = self.name
        return env

    def choose_ports(self, taken: set[int]) -> None:
        """Free ports for the front end and gunicorn, none of ``taken`` (kept on restarts)."""
        for attribute in ("app_port", "backend_port"):
            port = getattr(self, attribute)
            while port == 0 or port in taken:
                port = free_port(self.host)
            setattr(self, attribute, port)
            taken.add(port)

    def start_service(self) -> None:
        """Start the front end and gunicorn against the default service's emulators."""
        self.datastore_port = self.main.datastore_port
        self.tasks_port = self.main.tasks_port
        self.base_dir.mkdir(parents=True, exist_ok=True)
        self.start_app()


class ServiceStack(LocalStack):
    """The default service's LocalStack, plus a ServiceApp per other service."""

    def __init__(
        self, app_yaml: str | os.PathLike[str], others: Sequence[AppYaml], **options: Any
    ) -> None:
        super().__init__(app_yaml, **options)
        self.services: dict[str, ServiceApp] = {}
        for app in others:
            self.services[service_name(app)] = ServiceApp(self, app, service_name(app))

    def service_urls(self) -> dict[str, str]:
        return {name: service.dispatch_url for name, service in self.services.items()}

    def _child_env(self, *, app: bool = False) -> dict[str, str]:
        env = super()._child_env(app=app)
        if app:
            env["GAE_SERVICE"] = DEFAULT_SERVICE
        return env

    def start(self) -> LocalStack:
        """The emulators and the default service, then every other service."""
        self._resolve_ports()
        taken = {self.app_port, self.datastore_port, self.tasks_port, self.backend_port}
        for service in self.services.values():
            service.choose_ports(taken)
        super().start()
        try:
            for service in self.services.values():
                service.start_service()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Every service's app first (no new task runs), then the default one and the emulators."""
        for service in self.services.values():
            service.stop()
        super().stop()

    def dead_children(self) -> list[str]:
        dead = super().dead_children()
        for name, service in self.services.items():
            dead += [f"{child} of {name}" for child in service.dead_children()]
        return dead

    def _owner(self, child: str) -> tuple[LocalStack, str]:
        name, _, service = child.partition(" of ")
        return (self.services[service], name) if service else (self, name)

    def log_file(self, child: str) -> pathlib.Path:
        owner, name = self._owner(child)
        return LocalStack.log_file(owner, name)

    def child_output(self, name: str) -> str:
        owner, child = self._owner(name)
        return LocalStack.child_output(owner, child)

    def pids(self) -> dict[str, int]:
        pids = super().pids()
        for name, service in self.services.items():
            pids.update({f"{child} of {name}": pid for child, pid in service.pids().items()})
        return pids

    def describe(self) -> str:
        lines = super().describe().split("\n")
        at = next(i for i, line in enumerate(lines) if line.startswith("  app "))
        for offset, (name, service) in enumerate(self.services.items(), start=1):
            lines.insert(at + offset, f"  {name:<10} {service.app_url}/   (service {name})")
        return "\n".join(lines)


def service_stack(app_yamls: Sequence[str | os.PathLike[str]], **options: Any) -> LocalStack:
    """The stack for one app.yaml (a LocalStack) or several (a ServiceStack): exactly one of
    them the default service, no service twice. AppYamlError says what is wrong."""
    apps = [load_app_yaml(path) for path in app_yamls]
    if len(apps) == 1:
        return LocalStack(apps[0].path, **options)
    names = [service_name(app) for app in apps]
    for name in names:
        if names.count(name) > 1:
            paths = ", ".join(str(app.path) for app in apps if service_name(app) == name)
            raise AppYamlError(f"service {name!r} is in more than one app.yaml: {paths}")
    if DEFAULT_SERVICE not in names:
        raise AppYamlError(
            "none of the app.yaml files is the default service (no `service:`, or "
            "`service: default`): App Engine needs it, and the stack runs it first"
        )
    default = apps[names.index(DEFAULT_SERVICE)]
    others = [app for app in apps if app is not default]
    return ServiceStack(default.path, others, **options)
