"""The guestbook's Datastore models: greetings under one guestbook entity (an entity group)."""

from google.cloud import ndb

DEFAULT_GUESTBOOK_NAME = "default_guestbook"


def guestbook_key(guestbook_name: str = DEFAULT_GUESTBOOK_NAME) -> ndb.Key:
    return ndb.Key("Guestbook", guestbook_name)


class Greeting(ndb.Model):
    content = ndb.TextProperty()
    date = ndb.DateTimeProperty(auto_now_add=True)
    #: Set by tasks.review.
    published = ndb.BooleanProperty(default=False)
    #: Set by tasks.notify_moderators once the mail went out.
    moderators_notified = ndb.BooleanProperty(default=False)
    mail_attempts = ndb.IntegerProperty(default=0)

    @classmethod
    def latest(cls, limit: int = 20) -> list["Greeting"]:
        # An ancestor query sorted by date: index.yaml's Greeting index serves it.
        return cls.query(ancestor=guestbook_key()).order(-cls.date).fetch(limit)
