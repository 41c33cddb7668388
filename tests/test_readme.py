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


# ---- Facts the README states about the code, checked against it (each is cheap and likely to rot)


def _section(title: str) -> str:
    """The README's text under the heading that starts with `title`, up to the next heading of its level or above."""
    m = re.search(rf"^(#+) {re.escape(title)}.*$", README, re.M)
    assert m, f"README has no section {title!r}"
    end = re.compile(rf"^#{{1,{len(m.group(1))}}} ", re.M).search(README, m.end())
    return README[m.end():end.start() if end else len(README)]


def _table(text: str, first_header: str) -> list[list[str]]:
    """The rows (cells, stripped) of the markdown table whose header row starts with `first_header`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]])
    return rows


def _ticks(cell: str) -> list[str]:
    return re.findall(r"`([^`]+)`", cell)


def _synopses() -> dict[str, str]:
    """{command: its synopsis lines} from the README's code blocks without a language (```bash and
    ```python blocks are examples)."""
    out: dict[str, str] = {}
    fence, cmd = None, None
    for line in README.splitlines():
        if line.startswith("```"):
            fence, cmd = (line[3:].strip() if fence is None else None), None
        elif fence == "" and line.startswith("fastcifar "):
            cmd = line.split()[1]
            out[cmd] = out.get(cmd, "") + line.split("#")[0] + "\n"
        elif fence == "" and line.startswith(" ") and cmd:
            out[cmd] += line.split("#")[0] + "\n"
        else:
            cmd = None
    return out


def test_each_synopsis_names_exactly_the_options_of_its_command():
    import typer

    from fastcifar.cli import app

    commands = typer.main.get_command(app).commands
    synopses = _synopses()
    assert set(synopses) == set(commands), "every command has a synopsis in the README, and only those"
    for name, text in synopses.items():
        opts = {o for p in commands[name].params for o in getattr(p, "opts", []) if o.startswith("--")} - {"--help"}
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        assert named <= opts, f"README's `fastcifar {name}` synopsis names {named - opts}, which it does not take"
        assert opts <= named, f"`fastcifar {name}` takes {opts - named}, which its README synopsis leaves out"
        words = text.split()[2:]
        positional = words[:next((i for i, w in enumerate(words) if w.startswith(("[", "--"))), len(words))]
        metavars = [p.metavar for p in commands[name].params if p.param_type_name == "argument"]
        assert positional == metavars, f"`fastcifar {name}` --help shows {metavars}, its README synopsis {positional}"


def test_where_things_are_names_files_and_symbols_that_exist():
    import ast

    rows = _table(_section("Where things are"), "you look for")
    assert len(rows) > 15
    for what, where in rows:
        paths, symbols = [], []
        for t in _ticks(where):
            (paths if "/" in t else symbols).append(t)
        files = []
        for p in paths:
            if p == "fastcifar/recipes/":  # where a wheel installs recipes/, not a folder of the checkout
                continue
            found = list(ROOT.glob(p)) if "*" in p else [ROOT / p]
            assert found and all(f.exists() for f in found), f"{what}: {p} does not exist"
            files += [f for f in found if f.suffix == ".py"]
        assert files or not symbols, what
        defined, text = set(), ""
        for f in files:
            source = f.read_text()
            text += source
            for node in ast.parse(source).body:
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    defined.add(node.name)
                if isinstance(node, ast.ClassDef):
                    defined |= {f"{node.name}.{n.name}" for n in node.body if isinstance(n, ast.FunctionDef)}
                    defined |= {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
                if isinstance(node, (ast.Assign, ast.AnnAssign)):
                    targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                    defined |= {t.id for t in targets if isinstance(t, ast.Name)}
        for s in symbols:
            if s.startswith("@"):
                assert s in text, f"{what}: no {s} in {paths}"
            else:
                assert s.removesuffix("()") in defined, f"{what}: {s} is not defined in {paths}"


def test_recipe_table_lists_every_recipe_and_the_tutorial_table():
    from fastcifar.reproduce import TABLES

    names = [_ticks(row[0])[0] for row in _table(_section("Recipes"), "recipe")]
    assert sorted(names) == sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if not p.name.startswith("_"))
    # "the twelve tutorial recipes of the table above, r18_baseline .. r18_arcface_mst"
    assert tuple(names[:names.index("r18_arcface_mst") + 1]) == TABLES["tutorial"]


def test_override_keys_exist():
    from fastcifar.config import SECTIONS, valid_keys

    keys = [k for row in _table(_section("Overrides"), "key") for k in _ticks(row[0])]
    assert len(keys) > 40
    for k in keys:
        section, field = k.split(".")
        assert (field == "*" and section in SECTIONS) or k in valid_keys(), f"--set {k} is not a recipe field"


def _values(cell: str) -> list:
    """A README default cell (`linear`, None, (3/4, 4/3), 0, ...) as Python values, split at top-level commas."""
    parts, depth, cur = [], 0, ""
    for ch in cell.replace("`", "") + ",":
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
            continue
        depth += (ch == "(") - (ch == ")")
        cur += ch
    return [eval(p, {"__builtins__": {}}) if re.fullmatch(r"[\d./(), eNo]*|None|\(\)", p) else p for p in parts]


def test_augmentation_table_has_every_field_with_its_default():
    import dataclasses

    from pipelines.spec import AugSpec

    default, seen = AugSpec(), []
    for row in _table(_section("The augmentation spec"), "field"):
        names = _ticks(row[0])
        values = _values(row[1])
        assert len(values) == len(names), row
        for name, value in zip(names, values):
            assert getattr(default, name) == value, f"aug.{name}: README says {value!r}, AugSpec {getattr(default, name)!r}"
        seen += names
    assert sorted(seen) == sorted(f.name for f in dataclasses.fields(AugSpec))


def test_run_files_hold_the_fields_the_readme_lists(tmp_path):
    """A one-epoch run with every optional part on (validation split, EMA, a target) writes exactly
    the metrics.jsonl and summary.json fields "What a run writes" names, and the provenance it describes."""
    import fnmatch
    import json

    from fastcifar import train as T
    from fastcifar.data import prepare
    from helpers import QUIET, info, tiny

    prepare(tmp_path / "data", synthetic=True, n_train=300, n_test=100, log=lambda *_: None)
    r = tiny(train__epochs=1, data__val_split=0.2, train__ema_decay=0.9, train__target_acc=1.0)
    s = T.train(r, info(), out=tmp_path / "run", data_dir=tmp_path / "data", **QUIET)
    (m,) = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]

    files = {_ticks(row[0])[0]: _ticks(row[1]) for row in _table(_section("What a run writes"), "file")}
    for written, documented in ((m, files["metrics.jsonl"]), (s, files["summary.json"])):
        assert all(any(fnmatch.fnmatch(k, d) for d in documented) for k in written), \
            f"undocumented: {[k for k in written if not any(fnmatch.fnmatch(k, d) for d in documented)]}"
        assert all("*" in d or d in written for d in documented), [d for d in documented if d not in written]

    prov = " ".join(_ticks(re.search(r"\*\*Provenance\*\*(.*?)\n\n", README, re.S).group(1)))
    for k in [*s["provenance"], *s["provenance"]["data"], *(s["provenance"]["git"] or {})]:
        assert k in prov.split(), f"provenance field {k} is not in the README's Provenance paragraph"
