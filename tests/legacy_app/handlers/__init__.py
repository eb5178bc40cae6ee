"""The guestbook's request handlers."""

import webapp2

from handlers import cron, guestbook

ROUTES = [
    webapp2.Route("/", guestbook.MainPage),
    webapp2.Route("/sign", guestbook.Sign),
    webapp2.Route("/tasks/prune", cron.Prune),
]
