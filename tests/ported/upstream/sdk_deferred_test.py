# Ported to gae_deferred from github.com/GoogleCloudPlatform/appengine-python-standard
#   tests/google/appengine/ext/deferred/deferred_test.py
#   at commit 5232ba8de8d0162e293b5527d709d6c498ed308f
#   License: Apache License 2.0 (the original notice follows).
# Changes, all marked in the text below with '# gae_deferred port:':
#   - imports: gae_deferred replaces google.appengine.ext.deferred; capture_tasks() replaces the
#     API proxy, Datastore and taskqueue stubs; google.cloud.ndb replaces db (RetryCount is an
#     ndb model: key_name= is id=, get_by_key_name is get_by_id); absltest is a small stand-in
#     (absltest_compat.py) for the absl-py package.
#   - DeferredTest.setUp: one capture_tasks() replaces the stubs.
#   - The handler helpers send X-AppEngine-QueueName with the task name: Cloud Tasks always does,
#     and gae_deferred's handler needs both. They send the task's own name, not a made-up one:
#     gae_deferred signs each task body together with its task's name, and refuses a body
#     replayed as another task.
#   - Where gae_deferred differs on purpose, the assertion says what it does instead:
#     task URLs end in the function's name; _target is Cloud Tasks routing, not a Host header;
#     X-AppEngine-* headers in _headers are dropped with a warning (Cloud Tasks sets those);
#     cloudpickle serializes lambdas, nested functions and nested classes, which legacy refused;
#     payloads too big for a task spill to gae_deferred's own Datastore records.
#   - testXSRFHeaderCheckInProduction is not ported: it tests the legacy REMOTE_ADDR check, which
#     gae_deferred replaces with signed payloads (tests/test_task_handler.py).
#
#!/usr/bin/env python
#
# Copyright 2007 Google LLC
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
#

"""Unit test for the deferred module."""

import base64
import datetime
import operator
import os
import pickle

import six

# gae_deferred port: these imports replace google.appengine's deferred, db, the API proxy and
# its stubs, and absl-py's absltest.
import absltest_compat as absltest
from google.cloud import ndb

import gae_deferred as deferred
from gae_deferred import spillover
from gae_deferred.testing import capture_tasks




def setUpModule():


  os.environ["HTTP_HOST"] = "my-app.appspot.com"
  os.environ["DEFAULT_VERSION_HOSTNAME"] = "my-app.appspot.com"


def tearDownModule():
  del os.environ["HTTP_HOST"]
  del os.environ["DEFAULT_VERSION_HOSTNAME"]


calls = []


def SerializableFunction(a, b):
  calls.append(("SerializableFunction", a, b))
  return a + b


class SerializableClass(object):

  def __init__(self, a):
    calls.append(("SerializableClass", a))
    self.a = a

  def __call__(self, b):
    calls.append(("SerializableClass object", self.a, b))
    return self.a + b

  def Test(self, b):
    calls.append(("SerializableClass.Test", self.a, b))
    return self.a + b

  @classmethod
  def ClsTest(cls, a, b):
    calls.append(("SerializableClass.ClsTest", a, b))
    return a + b

  @staticmethod
  def DoesntWork(a, b):
    calls.append(("SerializableClass.DoesntWork", a, b))
    return a + b


# gae_deferred port: an ndb model, as db has no Python 3 library.
class RetryCount(ndb.Model):
  count = ndb.IntegerProperty(required=True)


class SerializableRetryClass(object):

  def __init__(self):
    RetryCount(id="count", count=0).put()  # gae_deferred port: ndb spelling
    calls.append(("SerializableRetryClass",))

  def __call__(self, val):
    # gae_deferred port: ndb spelling of the two db calls below.
    retry_count = RetryCount.get_by_id("count")
    if retry_count is None:
      retry_count = RetryCount(id="count", count=0)

    attempts = retry_count.count
    calls.append(("SerializableRetryClass object", attempts, val))
    if attempts == 0:
      retry_count.count += 1
      retry_count.put()
      raise deferred.SingularTaskFailure
    return val


def OuterFunction(a):

  def InnerFunction(b):
    return a + b

  return InnerFunction


def ClassGenerator(a):

  class Foo(object):

    def Bar(self, b):
      return a + b

  return Foo


def RecordCall(s):
  calls.append(("RecordCall", len(s)))


def ExecuteHandlerWithXSRF(task):
  """Execute the task with the correct headers to get past the XSRF protection.

  Args:
    task: A dict as returned from
      google.appengine.api.taskqueue.taskqueue_stub.QueryTasksResponseToDict

  Returns:
    The webapp.Response object.
  """
  wsgi_environ = {
      "HTTP_X_APPENGINE_TASKNAME": task["name"],  # gae_deferred port: the task's own name
      "HTTP_X_APPENGINE_QUEUENAME": "default",  # gae_deferred port: sent by Cloud Tasks
      "SERVER_SOFTWARE": "Development/1.0: unittest",
  }
  return ExecuteHandler(task, wsgi_environ)


def ExecuteHandler(task, wsgi_environ_overrides):
  """Execute the task with the correct headers to get past the XSRF protection.

  Args:
    task: A dict as returned from
      google.appengine.api.taskqueue.taskqueue_stub.QueryTasksResponseToDict
    wsgi_environ_overrides: a dict containing keys to modify in the wsgi environ
      passed to the deferred webapp handler.

  Returns:
    response: a string containing body of the response
    status: HTTP status code of enum type http.HTTPStatus
    headers: a dict containing response headers
  """
  body = base64.b64decode(task["body"])
  body_file = six.BytesIO(body)
  wsgi_environ = {
      "wsgi.input": body_file,
      "CONTENT_LENGTH": len(body),
      "REQUEST_METHOD": "POST",
  }
  wsgi_environ.update(wsgi_environ_overrides)
  deferred_handler = deferred.Handler()
  return deferred_handler.post(wsgi_environ)


class SerializationTest(absltest.TestCase):

  def setUp(self):
    calls[:] = []

  def testFunction(self):
    deferred.run(deferred.serialize(SerializableFunction, 1, 2))
    self.assertEqual(calls, [("SerializableFunction", 1, 2)])

  def testClass(self):
    deferred.run(deferred.serialize(SerializableClass, 1))
    self.assertEqual(calls, [("SerializableClass", 1)])

  def testCallableObject(self):
    data = deferred.serialize(SerializableClass(1), 2)
    self.assertEqual(calls, [("SerializableClass", 1)])
    deferred.run(data)
    self.assertEqual(calls, [("SerializableClass", 1),
                             ("SerializableClass object", 1, 2)])

  def testInstanceMethod(self):
    data = deferred.serialize(SerializableClass(1).Test, 2)
    self.assertEqual(calls, [("SerializableClass", 1)])
    deferred.run(data)
    self.assertEqual(calls, [("SerializableClass", 1),
                             ("SerializableClass.Test", 1, 2)])

  def testClassMethod(self):
    deferred.run(deferred.serialize(SerializableClass.ClsTest, 1, 2))
    self.assertEqual(calls, [("SerializableClass.ClsTest", 1, 2)])

  def testBuiltin(self):
    self.assertEqual(deferred.run(deferred.serialize(operator.add, 1, 2)), 3)
    now = datetime.datetime.now()
    self.assertEqual(
        deferred.run(deferred.serialize(now.isoformat)), now.isoformat())

  def testStaticMethod(self):
    if six.PY2:
      self.assertRaises(pickle.PicklingError, deferred.serialize,
                        SerializableClass.DoesntWork, 1, 2)
    else:
      deferred.run(deferred.serialize(SerializableClass.DoesntWork, 1, 2))
      self.assertEqual(calls, [("SerializableClass.DoesntWork", 1, 2)])

  # gae_deferred port: cloudpickle serializes what legacy refused; these three tests assert it.
  def testLambda(self):
    self.assertEqual(
        deferred.run(deferred.serialize(lambda a, b: a + b, 1, 2)), 3)

  def testNestedFunction(self):
    self.assertEqual(deferred.run(deferred.serialize(OuterFunction(1), 2)), 3)

  def testNestedClass(self):
    foo = deferred.run(deferred.serialize(ClassGenerator(1)))
    self.assertEqual(foo.Bar(2), 3)


class DeferredTest(absltest.TestCase):

  def setUp(self):
    calls[:] = []

    # gae_deferred port: one capture replaces the app id, the API proxy and both stubs.
    self.task_queue = self.enterContext(capture_tasks())

  def testDefer(self):
    deferred.defer(SerializableClass(4), 4)
    task1 = deferred.defer(
        SerializableClass(5), 2, _name="foo", _countdown=10, _target="backend")
    tasks = self.task_queue.GetTasks("default")
    self.assertLen(tasks, 2)
    self.assertEqual(deferred.run(base64.b64decode(tasks[0]["body"])), 8)
    # gae_deferred port: task URLs end in the function's name, for the logs.
    self.assertEqual(tasks[0]["url"],
                     "/_ah/queue/deferred/sdk_deferred_test.SerializableClass.__call__")
    self.assertEqual(deferred.run(base64.b64decode(tasks[1]["body"])), 7)
    self.assertEqual(tasks[1]["name"], "foo")
    self.assertEqual(tasks[0]["name"], "task1")
    self.assertEqual(tasks[1]["name"], task1.name)

    # gae_deferred port: _target is Cloud Tasks' App Engine routing, not a Host header.
    self.assertEqual(self.task_queue.tasks[1].routing, {"service": "backend"})

  def testDeferHeaders(self):
    task = deferred.defer(
        SerializableClass(5), 2, _headers={"X-AppEngine-Fail-Fast": "true"})
    tasks = self.task_queue.GetTasks("default")
    self.assertLen(tasks, 1)
    self.assertEqual(deferred.run(base64.b64decode(tasks[0]["body"])), 7)
    # gae_deferred port: the URL names the function; X-AppEngine-* headers are Cloud Tasks' to
    # set, so this one is dropped (with a warning) instead of sent.
    self.assertEqual(tasks[0]["url"],
                     "/_ah/queue/deferred/sdk_deferred_test.SerializableClass.__call__")
    self.assertEqual(tasks[0]["name"], "task1")
    self.assertNotIn("X-AppEngine-Fail-Fast", task.headers)

  def testDeferHeadersOverwriting(self):
    task = deferred.defer(
        SerializableClass(5), 2, _headers={"Content-Type": "text/plain"})
    tasks = self.task_queue.GetTasks("default")
    self.assertLen(tasks, 1)
    self.assertEqual(deferred.run(base64.b64decode(tasks[0]["body"])), 7)
    # gae_deferred port: the URL names the function.
    self.assertEqual(tasks[0]["url"],
                     "/_ah/queue/deferred/sdk_deferred_test.SerializableClass.__call__")
    self.assertEqual(tasks[0]["name"], "task1")
    self.assertEqual("text/plain", task.headers["Content-Type"])

  def testHandler(self):
    deferred.defer(SerializableClass(4), 4)
    tasks = self.task_queue.GetTasks("default")
    self.assertLen(tasks, 1)

    response = ExecuteHandlerWithXSRF(tasks[0])

    self.assertEqual(response[1].value, 200)
    self.assertEqual(calls, [("SerializableClass", 4),
                             ("SerializableClass object", 4, 4)])

  def testHandlerWithSingularFailure(self):
    deferred.defer(SerializableRetryClass(), 4)
    tasks = self.task_queue.GetTasks("default")
    self.assertLen(tasks, 1)

    response = ExecuteHandlerWithXSRF(tasks[0])
    self.assertEqual(response[1].value, 408)
    self.assertEqual(calls, [("SerializableRetryClass",),
                             ("SerializableRetryClass object", 0, 4)])

    response = ExecuteHandlerWithXSRF(tasks[0])
    self.assertEqual(response[1].value, 200)
    self.assertEqual(calls, [("SerializableRetryClass",),
                             ("SerializableRetryClass object", 0, 4),
                             ("SerializableRetryClass object", 1, 4)])

  def testXSRFHeaderCheckInDevAppserver(self):
    deferred.defer(SerializableClass(4), 4)
    tasks = self.task_queue.GetTasks("default")
    self.assertLen(tasks, 1)

    extra_wsgi_environ = {}
    response = ExecuteHandler(tasks[0], extra_wsgi_environ)
    self.assertEqual(response[1].value, 403)
    self.assertEqual(calls, [("SerializableClass", 4)])


    extra_wsgi_environ["SERVER_SOFTWARE"] = "Development/1.0"
    response = ExecuteHandler(tasks[0], extra_wsgi_environ)
    self.assertEqual(response[1].value, 403)
    self.assertEqual(calls, [("SerializableClass", 4)])


    # gae_deferred port: the task's own name (bodies are signed with it).
    extra_wsgi_environ["HTTP_X_APPENGINE_TASKNAME"] = tasks[0]["name"]
    # gae_deferred port: the queue name comes with the task name, as Cloud Tasks sends both.
    extra_wsgi_environ["HTTP_X_APPENGINE_QUEUENAME"] = "default"
    response = ExecuteHandler(tasks[0], extra_wsgi_environ)
    self.assertEqual(response[1].value, 200)
    self.assertEqual(calls, [("SerializableClass", 4),
                             ("SerializableClass object", 4, 4)])

  # gae_deferred port: testXSRFHeaderCheckInProduction is not ported (see the header).

  def testOversize(self):
    # gae_deferred port: the payload is random (a repetitive one compresses below the limit) and
    # the task carries a reference to gae_deferred's spilled record instead of a pickled
    # run_from_datastore call; the rest is the original test.
    deferred.defer(RecordCall, os.urandom(2 * 100 * 1024))
    tasks = self.task_queue.GetTasks("default")
    self.assertLen(tasks, 1)

    key = self.task_queue.tasks[0].payload_id
    self.assertIsInstance(key, str)
    entity = spillover.get(key)
    self.assertNotEqual(entity, None)

    response = ExecuteHandlerWithXSRF(tasks[0])
    self.assertEqual(response[1].value, 200)
    self.assertEqual(calls, [("RecordCall", 2 * 100 * 1024)])

    self.assertEqual(spillover.get(key), None)


if __name__ == "__main__":
  absltest.main()
