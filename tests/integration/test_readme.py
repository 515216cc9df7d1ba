"""The README's client example runs as printed, against a real server serving the bundled demo model."""

from __future__ import annotations

import re
import subprocess
import sys

from tests.golden import REPO
from tests.servers import RunningServer


def test_readme_example(server: RunningServer) -> None:
    readme = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert blocks, "README has no python example"
    code = blocks[0].replace("127.0.0.1:50051", server.target)
    assert len(code.strip().splitlines()) <= 12
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "'elnino'" in lines[0]
    assert len(lines) == 1 + 4 + 2  # model list, four forecasts, the (2, 1) block on two lines
