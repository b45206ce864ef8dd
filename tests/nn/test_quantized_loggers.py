"""`moeconv.nn.quantized._bnb` keeps bitsandbytes' two noisy loggers at ERROR without resetting
every logger's cache on each call (it runs once per quantized layer)."""
from __future__ import annotations

import logging

from moeconv.nn import quantized

NOISY = ("bitsandbytes.backends.cpu.ops", "bitsandbytes.autograd._functions")


def test_loggers_silenced_and_set_only_when_changed(monkeypatch):
    logging.getLogger(NOISY[0]).setLevel(logging.WARNING)
    quantized._bnb()
    assert all(logging.getLogger(n).level == logging.ERROR for n in NOISY)
    calls = []
    monkeypatch.setattr(logging.Logger, "setLevel", lambda self, level: calls.append(self.name))
    quantized._bnb()
    assert calls == []
