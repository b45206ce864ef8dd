"""The skeleton's index of quantized layers (`moeconv.stream.skeleton._QuantIndex`) answers what
the prefix scans it replaced answered, on names with empty parts and look-alike prefixes too."""
from __future__ import annotations

import random

from moeconv.stream.skeleton import _dotted_prefixes, _QuantIndex

PARTS = ["model", "layers", "0", "1", "10", "mlp", "experts", "", "a.b"]


def _name(rng: random.Random) -> str:
    return ".".join(rng.choice(PARTS) for _ in range(rng.randint(1, 5)))


def test_dotted_prefixes():
    assert list(_dotted_prefixes("a.b.c")) == ["a", "a.b"]
    assert list(_dotted_prefixes(".a..b.")) == ["", ".a", ".a.", ".a..b"]
    assert list(_dotted_prefixes("abc")) == []


def test_index_matches_the_prefix_scans():
    rng = random.Random(0)
    for _ in range(200):
        quantized = {_name(rng): {} for _ in range(rng.randint(0, 6))}
        names = sorted({_name(rng) for _ in range(40)})
        prefix = rng.choice(["model.layers", "model", "a"])
        index = _QuantIndex.build(quantized, names, prefix)
        for n in names + [_name(rng) for _ in range(40)]:
            assert any(p in index.layers for p in _dotted_prefixes(n)) == any(
                n.startswith(lp + ".") for lp in quantized)
            assert index.under.get(n, []) == [lp for lp in quantized if lp.startswith(n + ".")]
        assert index.outside == [lp for lp in quantized if not lp.startswith(prefix + ".")]
        assert index.stored == {lp: [n for n in names if n.startswith(lp + ".")] for lp in quantized}
