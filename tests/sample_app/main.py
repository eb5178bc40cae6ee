"""The sample app's WSGI app: its own routes plus gae_deferred's task handler and dashboard."""

import webapp2

from gae_deferred.webapp2 import deferred_routes
from handlers import routes

app = webapp2.WSGIApplication(routes() + deferred_routes())
