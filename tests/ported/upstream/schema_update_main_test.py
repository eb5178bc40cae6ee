# Ported to gae_deferred from github.com/GoogleCloudPlatform/python-docs-samples
#   appengine/standard/ndb/schema_update/main_test.py
#   at commit 59141116ef864c0f34d549590058ca477b986c48
#   License: Apache License 2.0 (the original notice follows).
# Changes, all marked in the text below with '# gae_deferred port:':
#   - imports: google.appengine.ext.deferred -> gae_deferred; main/models_v1/models_v2 -> the renamed
#     modules; Python 2's builtin reload from importlib.
#   - The testbed fixture is tests/ported/conftest.py's: its taskqueue_stub is capture_tasks().
#   - test_add_entities is not ported: it only checks the page (and compares str with bytes, Python 2).
#
# Copyright 2015 Google Inc. All rights reserved.
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

# gae_deferred port: the imports below replace google.appengine.ext.deferred and the sample's
# module names; reload was a builtin in Python 2.
from importlib import reload

import pytest
import webtest

import gae_deferred as deferred
import schema_update_main as main
import schema_update_models_v1 as models_v1
import schema_update_models_v2 as models_v2


@pytest.fixture
def app(testbed):
    yield webtest.TestApp(main.app)


def test_app(app):
    response = app.get("/")
    assert response.status_int == 200


# gae_deferred port: test_add_entities is not ported (see the header).


def test_update_schema(app, testbed):
    reload(models_v1)
    test_model = models_v1.Picture(author="Test", name="Test")
    test_model.put()

    response = app.post("/update_schema")
    assert response.status_int == 200

    # Run the queued task.
    tasks = testbed.taskqueue_stub.get_filtered_tasks()
    assert len(tasks) == 1
    deferred.run(tasks[0].payload)

    # Check the updated items
    reload(models_v2)
    updated_model = test_model.key.get()
    assert updated_model.num_votes == 1
    assert updated_model.avg_rating == 5.0
