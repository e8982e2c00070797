"""The README's Python example runs as written, and its claims about the first loss hold."""
import math
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks():
    return re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)


def test_readme_opens_with_the_two_commands():
    lines = [l for l in README.read_text(encoding="utf-8").splitlines() if l.strip()]
    first_block = lines[lines.index("```bash") + 1:lines.index("```bash") + 3]
    assert first_block[0].startswith("make book") and first_block[1].startswith("make test")


def test_readme_example_trains(capsys):
    blocks = python_blocks()
    assert blocks, "README.md has no python example"
    ns = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), ns)
    history = ns["history"]
    assert math.isclose(history[0]["loss"], math.log(2), rel_tol=1e-5)
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert history[-1]["rewards/accuracies"] == 1.0 and history[-1]["rewards/margins"] > 0
    assert {"step", "loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
            "logps/chosen", "logps/rejected"} <= set(history[-1])
    assert "->" in capsys.readouterr().out
