# Ported to gae_deferred from github.com/GoogleCloudPlatform/python-docs-samples
#   appengine/standard/ndb/schema_update/models_v1.py
#   at commit 59141116ef864c0f34d549590058ca477b986c48
#   License: Apache License 2.0 (the original notice follows).
# Changes, all marked in the text below with '# gae_deferred port:':
#   - imports: google.appengine.ext.ndb -> google.cloud.ndb.
#
# Copyright 2015 Google Inc. All Rights Reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#      http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.

# gae_deferred port: google.cloud.ndb replaces google.appengine.ext.ndb.
from google.cloud import ndb


class Picture(ndb.Model):
    author = ndb.StringProperty()
    name = ndb.StringProperty(default="")
