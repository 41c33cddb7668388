"""The README's set-up commands are what CI runs: keep the two in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def test_readme_starts_with_main_job_offline_form_and_test_command():
    blocks = _bash_blocks(README)
    main_job, offline, tests = (b.strip() for b in blocks[:3])
    assert "pip install -e ." in main_job and "fastcifar prepare &&" in main_job and "fastcifar train" in main_job
    assert "fastcifar prepare --synthetic" in offline and "fastcifar train" in offline
    assert 'pip install -e ".[dev]"' in tests and "pytest" in tests


def test_ci_runs_the_readme_install_and_test_commands():
    tests = _bash_blocks(README)[2].strip()
    install, test = re.search(r'(pip install -e "\.\[dev\]") && (.*)$', tests).groups()
    ci_lines = [l.strip() for l in CI.splitlines()]
    assert install in ci_lines, f".ci/run must run the README's install command: {install}"
    assert test in ci_lines, f".ci/run must run the README's test command: {test}"
    assert "python3 -m venv" in CI  # from scratch, in a fresh environment
