"""The README's Python example must run as written."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_example_runs(capsys):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README.md lost its Python example"
    exec(compile(blocks[0], "README.md", "exec"), {})
    assert "spatial_similarity:layer2" in capsys.readouterr().out
