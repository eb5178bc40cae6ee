"""The values gae_deferred starts from, each written once (as rq's ``defaults.py``): settings,
the webapp2 routes, the dashboard, the queue CLI and the test doubles read them from here.

The local stack's emulators (``gae_deferred.local``) may import them too; the core never
imports the emulators.
"""

#: The Cloud Tasks location when neither configure() nor $GAE_DEFERRED_LOCATION names one.
LOCATION = "us-central1"
#: The queue of a task deferred without ``_queue``: App Engine's implicit queue.
QUEUE = "default"
#: Where Cloud Tasks delivers a deferred task (bare, or with ``/<dotted.function>`` after it).
TASK_URL = "/_ah/queue/deferred"
#: Where the dashboard is mounted: its pages, API, cookies and links all live under it.
ADMIN_PREFIX = "/_ah/deferred-admin"
#: How long a Cloud Tasks call waits for its answer (the library's calls and the queue CLI's).
CLOUD_TASKS_TIMEOUT_SECONDS = 30.0
#: App Engine's dispatch deadline for a push task (10 minutes).
TASK_DEADLINE_SECONDS = 600.0
#: App Engine's retry parameters for what a queue.yaml queue or a task's options leave unset.
MIN_BACKOFF_SECONDS = 0.1
MAX_BACKOFF_SECONDS = 3600.0
MAX_DOUBLINGS = 16
