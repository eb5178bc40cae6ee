"""The sample app's own handlers (a package named like the repository's handlers/ folder)."""

import json
import os
import sys

import jinja2
import webapp2

from gae_deferred import defer

from . import reports

_templates = jinja2.Environment(
    loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "..", "templates")),
    autoescape=True,
)


class Home(webapp2.RequestHandler):
    def get(self):
        self.response.write(_templates.get_template("home.html").render(name="sample app"))


class Defer(webapp2.RequestHandler):
    """Defers reports.write from the app, on the app's own queue."""

    def get(self):
        directory, label = self.request.get("dir"), self.request.get("label")
        task = defer(reports.write, directory, label, _queue="sample-reports")
        self.response.write(task.name)


class Where(webapp2.RequestHandler):
    """Which files the app imported its modules from."""

    def get(self):
        self.response.content_type = "application/json"
        modules = {name: sys.modules[name].__file__ for name in ("gae_deferred", "handlers")}
        self.response.write(json.dumps(modules))


def routes():
    return [
        webapp2.Route("/", Home),
        webapp2.Route("/defer", Defer),
        webapp2.Route("/where", Where),
    ]
