"""The existing app's own handlers: nothing here knows about gae_deferred except one defer()."""

from __future__ import annotations

import webapp2

import gae_deferred

SENT: list[str] = []


def send_welcome(address: str) -> None:
    SENT.append(address)


class SignupHandler(webapp2.RequestHandler):
    def post(self) -> None:
        address = self.request.POST["email"]
        gae_deferred.defer(send_welcome, address, _queue="reports")
        self.response.write("welcome queued")


class HomeHandler(webapp2.RequestHandler):
    def get(self) -> None:
        self.response.write("my app")


ROUTES = [
    webapp2.Route("/", HomeHandler),
    webapp2.Route("/signup", SignupHandler),
]
