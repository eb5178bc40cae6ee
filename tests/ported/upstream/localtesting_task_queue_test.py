# Ported to gae_deferred from github.com/GoogleCloudPlatform/python-docs-samples
#   appengine/standard/localtesting/task_queue_test.py
#   at commit 229529af09666f759359d8bf5ac18d55c937e65a
#   License: Apache License 2.0 (the original notice follows).
# Changes, all marked in the text below with '# gae_deferred port:':
#   - imports: google.appengine.ext.deferred -> gae_deferred; testbed -> gae_deferred.testing.
#   - setUp: capture_tasks() (with the sample's resources/queue.yaml, here localtesting_queue.yaml)
#     replaces the testbed and its taskqueue stub; tearDown is gone: the capture ends with the test.
#   - testTaskAddedToQueue and testFiltering are not ported: they add raw taskqueue.Task objects,
#     an API gae_deferred does not replace (tests/test_testing.py filters deferred tasks).
#
# Copyright 2015 Google Inc
#
#    Licensed under the Apache License, Version 2.0 (the "License");
#    you may not use this file except in compliance with the License.
#    You may obtain a copy of the License at
#
#        http://www.apache.org/licenses/LICENSE-2.0
#
#    Unless required by applicable law or agreed to in writing, software
#    distributed under the License is distributed on an "AS IS" BASIS,
#    WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
#    See the License for the specific language governing permissions and
#    limitations under the License.

# [START taskqueue]
import operator
import os
import unittest

# gae_deferred port: gae_deferred and its testing module replace deferred, taskqueue and testbed.
import gae_deferred as deferred
from gae_deferred.testing import capture_tasks


class TaskQueueTestCase(unittest.TestCase):
    def setUp(self):
        # gae_deferred port: one capture replaces the testbed, its taskqueue stub and tearDown.
        self.taskqueue_stub = self.enterContext(
            capture_tasks(
                queue_yaml=os.path.join(os.path.dirname(__file__), "localtesting_queue.yaml")
            )
        )

    # [END taskqueue]

    # gae_deferred port: testTaskAddedToQueue and testFiltering are not ported (see the header).

    # [START deferred]
    def testTaskAddedByDeferred(self):
        deferred.defer(operator.add, 1, 2)

        tasks = self.taskqueue_stub.get_filtered_tasks()
        self.assertEqual(len(tasks), 1)

        result = deferred.run(tasks[0].payload)
        self.assertEqual(result, 3)

    # [END deferred]


if __name__ == "__main__":
    unittest.main()
