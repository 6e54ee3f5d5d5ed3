"""What the README, the docs and the messages tell a user to run exists in the pinned packages."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *sorted((ROOT / "configs").glob("*.yaml")),
         *sorted((ROOT / "adrpo_diffusion").rglob("*.py"))]


def test_hub_commands_are_those_of_the_pinned_hf_cli():
    """huggingface_hub 1.x removed `huggingface-cli`; every `hf <command>` we print must exist, with its options."""
    assert not [str(p.relative_to(ROOT)) for p in TEXTS if "huggingface-cli" in p.read_text()]
    used = {}
    for path in TEXTS:
        for command, rest in re.findall(r"\bhf (auth login|download|upload)\b([^`\n)]*)", path.read_text()):
            used.setdefault(command, set()).update(re.findall(r"--[a-z-]+", rest))
    assert {"auth login", "download"} <= set(used)
    hf = shutil.which("hf", path=str(Path(sys.executable).parent))
    for command, options in used.items():
        help_text = subprocess.run([hf, *command.split(), "--help"], capture_output=True, text=True, check=True).stdout
        assert all(option in help_text for option in options), (command, options)


def test_every_install_line_pins_the_tested_versions():
    """`pip install ... -e .` anywhere in the docs installs with constraints-ci.txt, so the numbers quoted reproduce."""
    lines = [line.strip() for path in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
             for line in path.read_text().splitlines() if re.search(r"pip install .*(-e|torch==)", line)]
    assert lines and [line for line in lines if "-c constraints-ci.txt" not in line] == []


def test_license_file_matches_the_package_metadata():
    assert "Apache License" in (ROOT / "LICENSE").read_text()
    assert 'license = { text = "Apache-2.0" }' in (ROOT / "pyproject.toml").read_text()
