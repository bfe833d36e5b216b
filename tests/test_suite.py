"""How `make test` runs this suite: pytest-xdist with ``--dist loadgroup`` keeps a module's
tests on one worker and every test of the session's micro pipeline on one worker
(tests/conftest.py), and hands the groups out longest first."""
from __future__ import annotations

import pytest


def test_every_test_belongs_to_its_group_and_the_pipeline_goes_first(request):
    """pytest 9.2 with pytest-xdist 3.8 dropped every group without a word (xdist issue #1386):
    the micro pipeline then ran once per worker and the suite took minutes longer. A worker's
    test ids carry their group ("...@test_docs"); this one reads them."""
    if not getattr(request.config.option, "loadgroup", False):  # set on the workers of --dist loadgroup
        pytest.skip("only under pytest-xdist's --dist loadgroup (`make test`)")
    items = request.session.items
    groups = [item.nodeid.rpartition("@")[2] if "@" in item.nodeid else None for item in items]
    expected = ["pipeline" if "pipeline" in item.fixturenames else item.module.__name__ for item in items]
    assert groups == expected, [item.nodeid for item, g, e in zip(items, groups, expected) if g != e][:5]
    order = [(g != "pipeline", item.get_closest_marker("slow") is None) for item, g in zip(items, groups)]
    assert order == sorted(order), "the pipeline's tests first, then the other end-to-end ones, then the rest"
