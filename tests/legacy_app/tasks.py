"""Work the guestbook defers (it used google.appengine.ext.deferred; now gae_deferred).

A greeting's review and its mail run at the same time, on two queues: each change to the
greeting is a transaction, so neither overwrites the other's.
"""

from google.cloud import ndb

BANNED_WORDS = {"viagra", "casino"}


class MailRelayError(Exception):
    """The mail relay turned a message away."""


@ndb.transactional()
def review(key: ndb.Key) -> None:
    """Publishes a greeting unless it contains a banned word (on the default queue)."""
    greeting = key.get()
    greeting.published = not BANNED_WORDS & set(greeting.content.lower().split())
    greeting.put()


def notify_moderators(key: ndb.Key) -> None:
    """Mails the moderators about a new greeting (on the mail queue, which never retries)."""
    if _count_mail_attempt(key) == 1:
        # Our relay greylists: it refuses the first message about each greeting, and an admin
        # retries it from the dashboard.
        raise MailRelayError(f"451 greylisted, try again later (greeting {key.id()})")
    _mark_notified(key)


@ndb.transactional()
def _count_mail_attempt(key: ndb.Key) -> int:
    greeting = key.get()
    greeting.mail_attempts += 1
    greeting.put()
    return greeting.mail_attempts


@ndb.transactional()
def _mark_notified(key: ndb.Key) -> None:
    greeting = key.get()
    greeting.moderators_notified = True
    greeting.put()
