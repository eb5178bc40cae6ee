"""A stand-in for a user's existing webapp2 app with its own handlers module and routes."""
