import webapp2

from handlers import ROUTES

app = webapp2.WSGIApplication(ROUTES)
