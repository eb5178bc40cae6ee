"""The part of absl-py's ``absl.testing.absltest`` the ported SDK test uses, on unittest."""

from __future__ import annotations

import unittest
from collections.abc import Sized


class TestCase(unittest.TestCase):
    def assertLen(self, container: Sized, expected_len: int, msg: str | None = None) -> None:
        self.assertEqual(len(container), expected_len, msg)


main = unittest.main
