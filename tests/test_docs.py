"""The documentation's commands work as written: README's and getting started's job commands parse (and the first
run runs and prints what README shows), README's results table is the one the model card generates, and README
stays a landing page."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PAGES = [REPO / "README.md", REPO / "docs" / "getting-started.md"]


def bash_blocks(page: Path) -> list[str]:
    """The ```bash blocks of a page, continuation lines joined."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.DOTALL)
    return [b.replace("\\\n", " ") for b in blocks]


def commands(page: Path, prefix: str) -> list[str]:
    found = []
    for block in bash_blocks(page):
        for line in block.splitlines():
            at = line.find(prefix)
            if at >= 0:
                found.append(line[at + len(prefix):].split("#")[0].strip())
    return found


def test_readme_is_a_landing_page():
    assert len((REPO / "README.md").read_text().splitlines()) <= 150


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_documented_job_commands_parse(page):
    """Each `python -m jobs.answer ...` a page shows is a valid command: its flags exist and go together."""
    import shlex

    from jobs.answer import parse_args

    found = commands(page, "python -m jobs.answer ")
    assert found, f"{page.name} shows no job command"
    for cmd in found:
        cfg = parse_args(shlex.split(cmd))  # argparse exits (SystemExit) on a flag that is gone or a bad pair
        assert cfg.input and cfg.output


def test_readme_results_table_is_generated_from_the_card(tmp_path):
    import json

    from models.card import MODEL_DIR, update_readme

    copy = tmp_path / "README.md"
    copy.write_text((REPO / "README.md").read_text())
    assert not update_readme(json.loads((MODEL_DIR / "card.json").read_text()), copy), \
        "README's results table is stale: python -m models.card --readme"


def test_readme_first_run_prints_what_it_shows(tmp_path, joined_ray):
    """README's first block, run as written (in a scratch copy of the paths it names): twelve rows, the two broken
    ones with the errors shown, and the answers shown (one near-tie may differ on another CPU class)."""
    readme = (REPO / "README.md").read_text()
    block = bash_blocks(REPO / "README.md")[1]
    shown = re.search(r"this printed:\n\n```\n(.*?)```", readme, flags=re.DOTALL).group(1).splitlines()
    (tmp_path / "tests" / "data").mkdir(parents=True)
    (tmp_path / "tests" / "data" / "sample.parquet").write_bytes((REPO / "tests/data/sample.parquet").read_bytes())
    env = {**os.environ, "PYTHONPATH": str(REPO), "QA_MODEL": str(REPO / "models" / "minilm-squad")}
    done = subprocess.run(["bash", "-c", block.replace("python ", f"{sys.executable} ")], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("q")]
    assert len(printed) == len(shown) == 12
    assert printed[10:] == shown[10:]  # the broken rows: no answer, the error
    answer = re.compile(r"^(q\d+) \| .* -> (.*) [0-9.]+ ?$")
    same = sum(answer.match(a).groups() == answer.match(b).groups() for a, b in zip(printed[:10], shown[:10]))
    assert same >= 9, "\n".join(printed)

    # Getting started's ways of reading an output, run as written on this committed one.
    page = (REPO / "docs" / "getting-started.md").read_text()
    reading = page[page.index("## Reading the output"):page.index("## Options that matter")]
    (tmp_path / "out").rename(tmp_path / "out-sample-parent")
    (tmp_path / "out-sample-parent" / "sample").rename(tmp_path / "out")
    python = re.search(r"```python\n(.*?)```", reading, flags=re.DOTALL).group(1)
    done = subprocess.run([sys.executable, "-c", python + "\nprint(answers.num_rows, len(df))"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.split() == ["12", "12"], done.stdout + done.stderr
    duckdb = pytest.importorskip("duckdb")
    sql = re.search(r"```sql\n(.*?)```", reading, flags=re.DOTALL).group(1)
    sql = "\n".join(line for line in sql.splitlines() if not line.startswith("--"))
    statements = [x.strip() for x in sql.split(";") if x.strip()]
    here = os.getcwd()
    try:
        os.chdir(tmp_path)  # the page's paths are relative
        con = duckdb.connect()
        counts = [len(con.sql(x).fetchall()) if x.upper().startswith("SELECT") else con.sql(x) for x in statements]
    finally:
        os.chdir(here)
    counts = [c for c in counts if isinstance(c, int)]
    assert len(counts) == 2, statements
    assert counts[0] == 12 and counts[-1] == 12, counts


def test_results_pages_are_generated_from_the_card(tmp_path):
    import json

    from models.card import MODEL_DIR, write_results_pages

    card = json.loads((MODEL_DIR / "card.json").read_text())
    for page in write_results_pages(card, tmp_path):
        kept = REPO / "docs" / "results" / page.name
        assert kept.exists() and kept.read_text() == page.read_text(), \
            f"{kept} is stale: python -m models.card --results-pages docs/results"
