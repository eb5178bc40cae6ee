"""Importable callables of every kind, for round-trip tests (plain pickle can reach these)."""

from __future__ import annotations


def add(a, b=0):
    return a + b


class Adder:
    def __init__(self, base):
        self.base = base

    def __call__(self, value):
        return self.base + value

    def method(self, value):
        return self.base * value

    @classmethod
    def make(cls, base):
        return cls(base).base

    @staticmethod
    def static(value):
        return -value


class Result:
    def __init__(self, value):
        self.value = value

    def __eq__(self, other):
        return isinstance(other, Result) and other.value == self.value

    __hash__ = None
