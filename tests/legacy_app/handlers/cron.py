"""cron.yaml's jobs."""

import datetime

import webapp2
from google.cloud import ndb
from models import Greeting


class Prune(webapp2.RequestHandler):
    def get(self) -> None:
        # App Engine strips this header from requests that do not come from its cron service.
        if self.request.headers.get("X-Appengine-Cron") != "true":
            self.abort(403)
        # ndb keeps naive datetimes, in UTC.
        now = datetime.datetime.now(datetime.UTC).replace(tzinfo=None)
        cutoff = now - datetime.timedelta(days=30)
        old = Greeting.query(Greeting.date < cutoff).fetch(keys_only=True)
        ndb.delete_multi(old)
        self.response.write(f"deleted {len(old)} greetings")
