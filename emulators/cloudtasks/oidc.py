"""The emulator's OIDC issuer: signs the tokens of HTTP-target tasks and serves its key.

Cloud Tasks signs an HTTP-target task's ``oidc_token`` as Google for the task's service
account; locally the emulator does the same with its own RSA key, so the app's handler
verifies real tokens (google-auth's ``verify_token``) against this issuer instead of Google::

    issuer = OidcIssuer(host="127.0.0.1", port=0, data_dir=".local/cloudtasks").start()
    token = issuer.sign(email="tasks@p.iam.gserviceaccount.com", audience="http://127.0.0.1:8080")
    issuer.certs_url   # http://127.0.0.1:PORT/oauth2/v1/certs  ({kid: PEM certificate})
    issuer.issuer      # http://127.0.0.1:PORT  (the tokens' iss)
    issuer.stop()

Also served: ``/oauth2/v3/certs`` (the same key as a JWK set) and
``/.well-known/openid-configuration``. The key is kept in ``data_dir/oidc-key.pem`` (mode
0600), so tokens verify across restarts. Signing uses google-auth's ``RSASigner`` and the
certificate ``cryptography`` (both already installed with google-auth).
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import http.server
import json
import os
import pathlib
import threading
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from google.auth import crypt, jwt

#: How long a token is valid, as Google's (one hour).
TOKEN_SECONDS = 3600
#: What the certificate answers say about caching (Google's say hours; short locally).
CERTS_MAX_AGE = 300
KEY_FILE = "oidc-key.pem"


def _load_or_create_key(data_dir: str | os.PathLike[str] | None) -> bytes:
    """The PEM private key: read from data_dir, or made (and written there, 0600)."""
    path = pathlib.Path(data_dir) / KEY_FILE if data_dir is not None else None
    if path is not None and path.is_file():
        return path.read_bytes()
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as key_file:
            key_file.write(pem)
    return pem


def _b64(number: int) -> str:
    raw = number.to_bytes((number.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


class OidcIssuer:
    """An RSA key that signs ID tokens, and an HTTP server publishing it."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self._requested_port = port
        self.port = 0
        pem = _load_or_create_key(data_dir)
        key = serialization.load_pem_private_key(pem, password=None)
        assert isinstance(key, rsa.RSAPrivateKey)
        public = key.public_key()
        der = public.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        #: Key id: a hash of the public key, as stable as the key.
        self.kid = hashlib.sha256(der).hexdigest()[:40]
        self._signer = crypt.RSASigner.from_string(pem, key_id=self.kid)
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gae-deferred local issuer")])
        now = datetime.datetime.now(datetime.UTC)
        certificate = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(public)
            .serial_number(int(self.kid[:16], 16))
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=3650))
            .sign(key, hashes.SHA256())
        )
        self.certificate_pem = certificate.public_bytes(serialization.Encoding.PEM).decode()
        numbers = public.public_numbers()
        self.jwk = {
            "kty": "RSA",
            "alg": "RS256",
            "use": "sig",
            "kid": self.kid,
            "n": _b64(numbers.n),
            "e": _b64(numbers.e),
        }
        self._server: http.server.ThreadingHTTPServer | None = None
        #: GETs of the key documents answered (an app caching the keys fetches them rarely).
        self.key_fetches = 0

    @property
    def issuer(self) -> str:
        """The ``iss`` of the tokens, and the base of the key URLs."""
        return f"http://{self.host}:{self.port}"

    @property
    def certs_url(self) -> str:
        """Google's v1 form: ``{kid: PEM certificate}`` (what google-auth's verify_token reads)."""
        return f"{self.issuer}/oauth2/v1/certs"

    def documents(self) -> dict[str, Any]:
        """What the server answers, by path."""
        return {
            "/oauth2/v1/certs": {self.kid: self.certificate_pem},
            "/oauth2/v3/certs": {"keys": [self.jwk]},
            "/.well-known/openid-configuration": {
                "issuer": self.issuer,
                "jwks_uri": f"{self.issuer}/oauth2/v3/certs",
                "response_types_supported": ["id_token"],
                "subject_types_supported": ["public"],
                "id_token_signing_alg_values_supported": ["RS256"],
                "claims_supported": ["aud", "email", "email_verified", "exp", "iat", "iss", "sub"],
            },
        }

    def sign(self, email: str, audience: str, now: float | None = None, **changes: Any) -> str:
        """An ID token for ``email`` and ``audience``, with the claims Google puts in one
        (issued at ``now``; ``changes`` replace or add claims)."""
        issued = int(time.time() if now is None else now)
        subject = str(int(hashlib.sha256(email.encode()).hexdigest()[:20], 16))
        payload = {
            "aud": audience,
            "azp": subject,
            "email": email,
            "email_verified": True,
            "exp": issued + TOKEN_SECONDS,
            "iat": issued,
            "iss": self.issuer,
            "sub": subject,
            **changes,
        }
        return jwt.encode(self._signer, payload).decode("ascii")

    def start(self) -> OidcIssuer:
        """Serve the key documents on host:port (0: any free port) in a daemon thread."""
        issuer = self

        class _Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                document = issuer.documents().get(self.path.split("?", 1)[0])
                issuer.key_fetches += 1
                body = json.dumps(document if document is not None else {"error": "not found"})
                self.send_response(200 if document is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Cache-Control", f"public, max-age={CERTS_MAX_AGE}")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, format: str, *args: Any) -> None:
                """Quiet: the stack's log has no use for key fetches."""

        self._server = http.server.ThreadingHTTPServer((self.host, self._requested_port), _Handler)
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]
        threading.Thread(target=self._server.serve_forever, name="ct-oidc", daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
