"""The page that lists greetings, and the form that signs the guestbook."""

import os

import jinja2
import tasks
import webapp2
from models import Greeting, guestbook_key

from gae_deferred import defer

JINJA_ENVIRONMENT = jinja2.Environment(
    loader=jinja2.FileSystemLoader(os.path.join(os.path.dirname(__file__), "..", "templates")),
    autoescape=True,
)


class MainPage(webapp2.RequestHandler):
    def get(self) -> None:
        template = JINJA_ENVIRONMENT.get_template("index.html")
        self.response.write(template.render(greetings=Greeting.latest()))


class Sign(webapp2.RequestHandler):
    def post(self) -> None:
        greeting = Greeting(parent=guestbook_key(), content=self.request.get("content"))
        greeting.put()
        defer(tasks.review, greeting.key)
        defer(tasks.notify_moderators, greeting.key, _queue="mail")
        self.redirect("/")
