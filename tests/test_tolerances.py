"""Every float comparison in the suite names an absolute tolerance.

A relative tolerance alone allows no rounding at all for a value near zero:
``assert_allclose(..., rtol=1e-12)`` (``atol`` defaults to 0) failed on a fresh
machine for a Gram entry of 0.004 off by 4e-15 (issue 16). ``numpy.allclose``
and ``numpy.isclose`` default to ``atol=1e-8``, which a test that sets ``rtol``
has likely not thought about either. ``pytest.approx`` keeps an absolute
tolerance of 1e-12 beside ``rel`` and is left alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _missing_atol(tree: ast.AST) -> list[int]:
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        keywords = {k.arg for k in node.keywords}
        needs = name == "assert_allclose" or (
            name in ("allclose", "isclose") and "rtol" in keywords
        )
        if needs and "atol" not in keywords and len(node.args) < 4:  # atol may be positional
            lines.append(node.lineno)
    return lines


def test_every_allclose_names_its_atol() -> None:
    found = [
        f"{path.relative_to(TESTS)}:{line}"
        for path in sorted(TESTS.rglob("*.py"))
        for line in _missing_atol(ast.parse(path.read_text(encoding="utf-8")))
    ]
    assert not found, "give these an atol on the scale of the values compared: " + ", ".join(found)


def test_the_check_sees_a_relative_only_comparison() -> None:
    bad = ast.parse("np.testing.assert_allclose(a, b, rtol=1e-12)\nnp.isclose(a, b, rtol=1e-3)")
    good = ast.parse("np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)\nnp.isclose(a, b)")
    assert _missing_atol(bad) == [1, 2] and _missing_atol(good) == []
