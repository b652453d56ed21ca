"""Every package's ``__all__`` names exactly what it exports."""

from __future__ import annotations

import importlib
import pkgutil

import pytest

import runtime

PACKAGES = sorted(
    {"runtime"}
    | {info.name for info in pkgutil.walk_packages(runtime.__path__, "runtime.") if info.ispkg}
)


@pytest.mark.parametrize("name", PACKAGES)
def test_all_matches_the_public_names(name: str) -> None:
    module = importlib.import_module(name)
    exported = getattr(module, "__all__", None)
    assert exported is not None, f"{name} has no __all__"
    assert len(exported) == len(set(exported)), f"{name}.__all__ repeats a name"
    missing = [n for n in exported if not hasattr(module, n)]
    assert not missing, f"{name}.__all__ names what it does not have: {missing}"
    public = {
        n
        for n, v in vars(module).items()
        if not n.startswith("_") and getattr(v, "__module__", "").startswith(name)
    }
    assert public <= set(exported), f"{name} exports {public - set(exported)} outside __all__"
