"""The GPU environment pins the same versions as the CPU constraints, so both sides run the same code."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def pins(text: str) -> dict[str, str]:
    return {m[1].lower(): m[2] for m in re.finditer(r"^[\s-]*([A-Za-z0-9_.\-]+)(?:\[[\w,]+\])?==([^\s#]+)", text, re.M)}


def test_environment_yml_matches_constraints():
    locked = pins((ROOT / "constraints.txt").read_text())
    conda = pins((ROOT / "environment.yml").read_text())
    assert conda, "environment.yml pins nothing"
    assert {name: version for name, version in conda.items() if locked.get(name) != version} == {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        requirement = line.split("#")[0].strip()
        if requirement:
            name = re.match(r"[A-Za-z0-9_.\-]+", requirement)[0].lower()
            assert name in conda, f"{requirement} missing from environment.yml"
