"""The package's metadata, built the way pip builds it: the Python range it claims is the range
its run-time dependencies support, no narrower (a test-only pin never narrows it) and no wider."""

from __future__ import annotations

import email
import importlib.metadata as md
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
PYTHONS = [f"3.{m}" for m in range(8, 16)]


def built_metadata(tmp_path: Path) -> email.message.Message:
    code = ("import sys, setuptools.build_meta as b; "
            "print(b.prepare_metadata_for_build_wheel(sys.argv[1]))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    dist_info = tmp_path / r.stdout.strip().splitlines()[-1]
    return email.message_from_string((dist_info / "METADATA").read_text())


def test_requires_python_is_what_the_runtime_dependencies_support(tmp_path):
    meta = built_metadata(tmp_path)
    ours = SpecifierSet(meta["Requires-Python"])
    for v in ("3.11", "3.12", "3.13"):
        assert v in ours, (v, str(ours))
    runtime = [Requirement(r) for r in meta.get_all("Requires-Dist") if "extra ==" not in r]
    test_only = [Requirement(r.split(";")[0]) for r in meta.get_all("Requires-Dist") if "extra == \"test\"" in r]
    assert {r.name for r in runtime} >= {"jax", "flax", "optax", "orbax-checkpoint", "grain", "transformers",
                                         "datasets", "ml-collections"}
    assert any(r.name == "torch" for r in test_only)  # the reference pin is there, and only as a test extra
    # what the installed run-time dependencies (and what they pull in for arrays and files) accept
    floors = {r.name: SpecifierSet(md.metadata(r.name).get("Requires-Python") or "")
              for r in runtime + [Requirement("jaxlib")]}
    for v in PYTHONS:
        every_dep = all(v in spec for spec in floors.values())
        assert (v in ours) == every_dep, (v, str(ours), {k: str(s) for k, s in floors.items() if v not in s})
