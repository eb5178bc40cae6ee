"""The dashboard on Cloud Run (docs/cloud-run.md): IAP for either of Cloud Run's audience forms,
and no App Engine header admits anyone."""

from __future__ import annotations

import json

import pytest
from google.auth import jwt

import gae_deferred
from gae_deferred import HttpTarget
from gae_deferred.webapp2 import _admin_auth
from tests.dashboard.support import CertsResponse, P, iap_claims, iap_signer

AUDIENCES = {
    "load balancer backend service": "/projects/123/global/backendServices/456",
    "IAP on the Cloud Run service": "/projects/123/locations/us-central1/services/worker",
}


@pytest.mark.parametrize("audience", list(AUDIENCES.values()), ids=list(AUDIENCES))
def test_the_dashboard_admits_iap_users_for_cloud_runs_audience(app, monkeypatch, audience):
    signer, public_pem = iap_signer("key-1")

    def local_keys():
        return lambda url, method="GET", **kwargs: CertsResponse(
            json.dumps({"key-1": public_pem}).encode()
        )

    monkeypatch.setattr(_admin_auth, "iap_transport", local_keys)
    gae_deferred.configure(
        local_mode=False,
        iap_audience=audience,
        http_target=HttpTarget(
            "https://worker-abc123-ew.a.run.app", "tasks@p.iam.gserviceaccount.com"
        ),
    )

    def status(claims):
        headers = {"x-goog-iap-jwt-assertion": jwt.encode(signer, claims).decode()}
        return app.get(P, headers=headers, expect_errors=True).status_int

    assert status(iap_claims(audience, "ops@example.com")) == 200
    assert status(iap_claims("/projects/123/apps/test-project", "ops@example.com")) == 403
    # Cloud Run is not App Engine (no GAE_ENV): App Engine's admin header proves nothing.
    admin_header = {"X-Appengine-User-Is-Admin": "1", "X-Appengine-User-Email": "ops@example.com"}
    assert app.get(P, headers=admin_header, expect_errors=True).status_int == 403
