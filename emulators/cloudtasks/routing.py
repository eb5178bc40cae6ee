"""Which local service a task goes to: App Engine routing over the services of the stack.

Each service of the app runs on its own address; a task (or its queue's
``app_engine_routing_override``) names a service and maybe a version::

    routes = ServiceRoutes("http://127.0.0.1:9000", {"worker": "http://127.0.0.1:9001"})
    routes.resolve("worker", "")         # ("http://127.0.0.1:9001", None)
    routes.resolve("", "")               # the default service
    routes.resolve("nope", "")           # the default service, and a note saying why

An unnamed service is the default service, as in production. A service or version that does
not exist is routed to the default service, as App Engine's appspot.com hostnames do ("soft
routing", which Cloud Tasks' App Engine hosts use); a version a service was not registered
under goes to that service's unversioned address (locally, one process serves every version).
"""

from __future__ import annotations

from collections.abc import Mapping

DEFAULT_SERVICE = "default"


class ServiceRoutes:
    """``default_url`` serves the default service; ``services`` maps ``service`` or
    ``version.service`` (a version-specific address) to the URL of its process."""

    def __init__(self, default_url: str, services: Mapping[str, str] | None = None) -> None:
        self.default_url = default_url
        self.services = dict(services or {})

    @classmethod
    def parse(cls, default_url: str, entries: list[str]) -> ServiceRoutes:
        """From ``--service-url`` values: ``NAME=URL`` or ``VERSION.NAME=URL``."""
        services = {}
        for entry in entries:
            name, sep, url = entry.partition("=")
            if not sep or not name or not url.startswith("http://"):
                raise ValueError(f"expected SERVICE=http://HOST:PORT, got {entry!r}")
            services[name] = url
        return cls(default_url, services)

    def resolve(self, service: str, version: str) -> tuple[str, str | None]:
        """The URL a task with this routing goes to, and a note when it is soft-routed."""
        service = service or DEFAULT_SERVICE
        if version and f"{version}.{service}" in self.services:
            return self.services[f"{version}.{service}"], None
        if service in self.services:
            return self.services[service], None
        if service == DEFAULT_SERVICE:
            return self.default_url, None
        return self.default_url, (
            f"service {service!r} does not exist: routed to the default service, as App "
            "Engine does for an unknown service"
        )


def routing_of(queue_pb: object, task_pb: object) -> tuple[str, str]:
    """(service, version) a task is routed by: its queue's override where one is set, else its
    own ``app_engine_routing``."""
    override = queue_pb.app_engine_routing_override  # type: ignore[attr-defined]
    if override.service or override.version:
        return override.service, override.version
    own = task_pb.app_engine_http_request.app_engine_routing  # type: ignore[attr-defined]
    return own.service, own.version
