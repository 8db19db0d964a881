"""The playground's vendored libraries are the files VENDOR.md records (sha256), with their licences beside them."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

VENDOR = Path(__file__).parents[2] / "serve" / "ui" / "vendor"


def test_vendored_files_match_their_recorded_checksums():
    rows = re.findall(r"^\| `([^`]+)` \|.*\| `([0-9a-f]{64})` \|", (VENDOR / "VENDOR.md").read_text(), re.MULTILINE)
    assert {name for name, _ in rows} == {p.name for p in VENDOR.iterdir() if p.suffix in (".js", ".css")}
    for name, digest in rows:
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name
    for licence in ("LICENSE.htm", "LICENSE.preact", "LICENSE.uPlot"):
        assert (VENDOR / licence).stat().st_size > 500
