"""The dashboard's handlers, one module per resource of its URLs (see ``..urls``)."""
