"""Tokens no honest issuer makes, for the HTTP-target refusal tests (tests/test_http_target.py,
tests/e2e/test_e2e_http_target.py)."""

from __future__ import annotations

import base64
import json
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.auth import crypt, jwt


def foreign_token(claims: dict[str, Any], kid: str) -> str:
    """``claims`` signed with a fresh RSA key of its own, under key id ``kid`` (a forgery)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return jwt.encode(crypt.RSASigner.from_string(pem, key_id=kid), claims).decode()


def unsigned_token(claims: dict[str, Any]) -> str:
    """``claims`` with ``alg: none`` and no signature."""

    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}."
