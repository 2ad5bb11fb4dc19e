"""Is the Python that will build .venv one that pyproject.toml's requires-python admits?

Run by the Makefile before it creates the venv, with that very Python, so a
user learns which Python was found and what to do, instead of a pip resolver
error minutes later. Standard library only (it runs before anything is installed).
"""

import re
import sys
from pathlib import Path

spec = ""
for line in (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text().splitlines():
    if line.startswith("requires-python"):
        spec = line.split("=", 1)[1].strip().strip('"')
bounds = dict(re.findall(r"(>=|<)\s*(\d+\.\d+)", spec))
low = tuple(int(x) for x in bounds[">="].split("."))
high = tuple(int(x) for x in bounds["<"].split("."))
found = sys.version_info[:2]
supported = low <= found < high
print(f"Python {found[0]}.{found[1]} at {sys.executable}: "
      + ("supported" if supported else f"not supported (refinery needs {spec})"))
sys.exit(0 if supported else 1)
