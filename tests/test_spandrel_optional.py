"""ignn_triton.spandrel without spandrel installed: importable, and install() names the extra.
(The integration itself is tested against the real spandrel by .ci/spandrel: tests_spandrel/.)"""
import sys

import pytest


def test_install_without_spandrel_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "spandrel", None)  # what an absent package looks like
    import ignn_triton.spandrel
    with pytest.raises(ImportError, match=r'pip install "ignn-triton\[spandrel\]"'):
        ignn_triton.spandrel.install()
