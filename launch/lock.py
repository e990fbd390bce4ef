"""Write a lock file from `pip freeze` output: every package pinned with `==` and the sha256 of every file the
registry (PyPI's simple JSON API, PEP 691) holds for that release, so `pip install --require-hashes` takes the
same bytes on any platform and Python the release has files for. torch (and what only a CUDA build brings) is left
out: its build is the user's choice (launch/setup.sh installs TORCH_SPEC first).

    python launch/lock.py FREEZE.txt OUT.txt --title "..." [--exclude NAME ...]

Run by launch/lock.sh; standard library only, plus pip's vendored `packaging` for file-name parsing.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.request

from pip._vendor.packaging.utils import (InvalidSdistFilename, InvalidWheelFilename, canonicalize_name,
                                         canonicalize_version, parse_sdist_filename, parse_wheel_filename)
from pip._vendor.packaging.version import InvalidVersion

INDEX = "https://pypi.org/simple"
# The torch build is the user's (CPU or CUDA); these come with it or only with a CUDA build.
ALWAYS_EXCLUDED = ("torch", "triton", "torchvision", "torchaudio", "torchcodec")
CUDA_PREFIXES = ("nvidia-", "cuda-")


def release_hashes(name: str, version: str) -> list[str]:
    """sha256 of every file of `name==version` on the index (wheels for every platform, and the sdist)."""
    url = f"{INDEX}/{canonicalize_name(name)}/"
    request = urllib.request.Request(url, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    for attempt in range(4):
        try:
            with urllib.request.urlopen(request, timeout=60) as response:
                files = json.load(response)["files"]
            break
        except OSError as e:  # a registry hiccup: retry a few times, then name the package
            if attempt == 3:
                raise SystemExit(f"lock.py: {url}: {e}; is the registry reachable?") from None
            time.sleep(2 * (attempt + 1))
    want = canonicalize_version(version)
    hashes = []
    for f in files:
        filename = f["filename"]
        try:
            if filename.endswith(".whl"):
                _, v, _, _ = parse_wheel_filename(filename)
            else:
                _, v = parse_sdist_filename(filename)
        except (InvalidWheelFilename, InvalidSdistFilename, InvalidVersion):  # old files named otherwise
            continue
        if canonicalize_version(str(v)) == want and f.get("hashes", {}).get("sha256") and not f.get("yanked"):
            hashes.append(f["hashes"]["sha256"])
    return sorted(set(hashes))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("freeze")
    parser.add_argument("out")
    parser.add_argument("--title", required=True, help="the lock's first comment line")
    parser.add_argument("--exclude", action="append", default=[], help="another package to leave out")
    args = parser.parse_args(argv)
    excluded = {canonicalize_name(n) for n in (*ALWAYS_EXCLUDED, *args.exclude)}
    pins = []
    for line in open(args.freeze, encoding="utf-8"):
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e "):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;]+)", line)
        if not m:
            raise SystemExit(f"lock.py: {args.freeze}: cannot pin {line!r} (only NAME==VERSION lines; a package "
                             "installed from a path or URL cannot be locked)")
        name, version = m.groups()
        if canonicalize_name(name) in excluded or canonicalize_name(name).startswith(CUDA_PREFIXES):
            continue
        pins.append((canonicalize_name(name), version))
    lines = [f"# {args.title}", "# Made by `bash launch/lock.sh` (do not edit by hand); installed by launch/setup.sh with",
             "# pip install --no-deps --require-hashes. torch is not here: its build (CPU or CUDA) is the user's.", ""]
    missing = []
    for i, (name, version) in enumerate(sorted(pins)):
        hashes = release_hashes(name, version)
        print(f"[lock] {i + 1}/{len(pins)} {name}=={version}: {len(hashes)} files", file=sys.stderr)
        if not hashes:
            missing.append(f"{name}=={version}")
            continue
        lines.append(f"{name}=={version} \\")
        lines += [f"    --hash=sha256:{h}" + (" \\" if j < len(hashes) - 1 else "") for j, h in enumerate(hashes)]
    if missing:
        raise SystemExit(f"lock.py: not on {INDEX}, so no hash to pin: {', '.join(missing)}")
    with open(args.out, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print(f"[lock] wrote {args.out}: {len(pins)} packages", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
