"""README.md and docs/*.md say what the code does: their links resolve, every command they show
parses, their tables name what exists, and the README's set-up commands are what CI runs."""

import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
CI = (ROOT / ".ci" / "run").read_text()
PAGES = {p.relative_to(ROOT).as_posix(): p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]}
DOCS = [name for name in PAGES if name.startswith("docs/")]


def _doc(name: str) -> str:
    return PAGES[f"docs/{name}"]


def _bash_blocks(text):
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def _prose(text: str) -> str:
    """The text without fenced code blocks (their `#` lines are comments, not headings)."""
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


def test_readme_is_a_start_page():
    assert len(README.splitlines()) <= 250, "README.md is the start page: the reference goes in docs/"
    assert re.search(r"^## Results$", README, re.M)


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


# ---- links


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in re.findall(r"^#{1,6} (.+)$", _prose(text), re.M):
        s = _slug(h)
        out.add(s if s not in seen else f"{s}-{seen[s]}")
        seen[s] = seen.get(s, 0) + 1
    return out


def _links(text: str) -> list[str]:
    return re.findall(r"\]\(([^)\s]+)\)", re.sub(r"`[^`\n]*`", "", _prose(text)))


@pytest.mark.parametrize("page", PAGES)
def test_every_link_and_anchor_resolves(page):
    for link in _links(PAGES[page]):
        if link.startswith(("http://", "https://")):
            continue  # the web is not reachable from the tests
        path, _, anchor = link.partition("#")
        target = (ROOT / page).parent / path if path else ROOT / page
        assert target.resolve().is_relative_to(ROOT) and target.exists(), f"{page}: {link} does not exist"
        if anchor:
            assert target.suffix == ".md", f"{page}: {link} has an anchor into a file without headings"
            assert anchor in _anchors(target.read_text()), f"{page}: {link}: no heading makes #{anchor}"


def test_the_anchor_rule_is_githubs():
    assert _slug("The data store: `fastcifar prepare`") == "the-data-store-fastcifar-prepare"
    assert _slug("TrivialAugment and RandAugment (`aug.policy`)") == "trivialaugment-and-randaugment-augpolicy"
    assert _anchors("# A\n```\n# not a heading\n```\n## A\n") == {"a", "a-1"}


def test_every_docs_page_is_linked_from_the_readme_and_the_index():
    for page in DOCS:
        name = page.removeprefix("docs/")
        if name != "README.md":
            assert name in _links(_doc("README.md")), f"docs/README.md does not link {name}"
        assert page in _links(README) or name == "README.md", f"README.md does not link {page}"


def test_no_page_speaks_of_how_fastcifar_was_developed():
    told = re.compile(r"previous run|earlier the same day|pack-dali|\.dali\d|four pieces|MiB per call|\bsessions?\b"
                      r"|issue \d|this project|(?:19|20)\d\d-\d\d-\d\d", re.I)
    for page, text in PAGES.items():
        if page == "README.md":  # the date a measurement was made is its caption (bench/tables.py prints
            # it above the tables) and a cell of the Results table, never prose
            text = re.sub(r"^Measured on .*$", "", text, flags=re.M)
            results = _section(text, "Results")
            text = text.replace(results, re.sub(r"^(\|.*)\| (?:19|20)\d\d-\d\d-\d\d \|", r"\1| |", results, flags=re.M))
        found = told.findall(text)
        assert not found, f"{page}: {found}"



def test_results_table_says_when_where_and_how_each_figure_was_measured():
    """Each row of the README's Results table is either measured (a machine, a date, a command) or
    says "not yet measured"; the CPU row's date and versions are those of bench/cpu_bench.json."""
    import json

    meta = json.loads((ROOT / "bench" / "cpu_bench.json").read_text())["meta"]
    rows = _table(_section(README, "Results"), "result")
    assert len(rows) >= 4
    for result, figure, where, date, command in rows:
        assert "`fastcifar " in command, result
        if figure.startswith("not yet measured"):
            assert where == date == "—", result
        else:
            assert re.fullmatch(r"(?:19|20)\d\d-\d\d-\d\d", date) and where not in ("", "—"), result
    (cpu,) = [r for r in rows if "on a CPU" in r[0]]
    assert cpu[3] == meta["time"][:10], f"the CPU row's date is {cpu[3]}, cpu_bench.json's {meta['time']}"
    assert f"torch {meta['torch'].split('+')[0]}" in cpu[2] and f"DALI {meta['dali']}" in cpu[2]
    assert f"{meta['cpu_cores']} CPU cores" in cpu[2]
    (gpu,) = [r for r in rows if "on a GPU" in r[0]]
    results = (ROOT / "bench" / "RESULTS.md").read_text()
    runs = results[results.index("\n## Runs\n") + 9:]  # a pasted doctor block brings its own "## " heading
    assert gpu[1].startswith("not yet measured") == (re.search(r"^#+ ", runs, re.M) is None), \
        "the GPU row says not yet measured exactly while bench/RESULTS.md holds no run"


# ---- commands


def _app():
    import typer

    from fastcifar.cli import app

    return typer.main.get_command(app)


def _shell_commands(text: str) -> list[list[str]]:
    """Each command line of the ```bash blocks as words (continuations joined, comments dropped,
    split at && ; |)."""
    out = []
    for block in _bash_blocks(text):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            cmd: list[str] = []
            for w in words + [";"]:
                if w in ("&&", ";", "|", "||"):
                    out.append(cmd) if cmd else None
                    cmd = []
                else:
                    cmd.append(w)
    return out


def _fastcifar_args(words: list[str]) -> list[str] | None:
    """The arguments after `fastcifar` (or `-m fastcifar`), or None for another program."""
    if words and words[0] == "fastcifar":
        return words[1:]
    if "-m" in words and words[words.index("-m") + 1:words.index("-m") + 2] == ["fastcifar"]:
        return words[words.index("-m") + 2:]
    return None


def _check_sets(args: list[str], where: str):
    from fastcifar.config import Recipe, apply_overrides

    sets = [args[i + 1] for i, a in enumerate(args[:-1]) if a == "--set"]
    try:
        apply_overrides(Recipe(), [s for s in sets if not re.fullmatch(r"[^=]+=([A-Z_]+|.*\.\.\.)", s)])
    except Exception as e:  # BadInput: an unknown key or a value of the wrong type
        raise AssertionError(f"{where}: {e}") from None


def test_every_shell_command_shown_parses():
    """Each `fastcifar ...` line of a bash block parses as its command would parse it (options,
    types, choices, required arguments), and its --set keys and values fit the recipe's fields."""
    group = _app()
    seen = set()
    for page, text in PAGES.items():
        for words in _shell_commands(text):
            args = _fastcifar_args(words)
            if args is None:
                continue
            where = f"{page}: {shlex.join(words)}"
            if args[0].startswith("-"):
                assert set(args) <= {o for p in group.params for o in p.opts}, where
                continue
            assert args[0] in group.commands, where
            command = group.commands[args[0]]
            try:
                command.make_context(args[0], list(args[1:]))
            except Exception as e:  # click's UsageError, BadParameter, MissingParameter
                raise AssertionError(f"{where}: {e}") from None
            _check_sets(args, where)
            seen.add(args[0])
    assert {"prepare", "train", "eval", "bench", "report", "export", "predict", "reproduce"} <= seen


def test_a_broken_shell_command_fails_the_parse():
    command = _app().commands["train"]
    with pytest.raises(Exception, match="--nope"):
        command.make_context("train", ["smoke", "--nope"])
    with pytest.raises(AssertionError, match="train.epochs expects an int"):
        _check_sets(["train", "smoke", "--set", "train.epochs=many"], "")


def test_every_inline_command_names_options_its_command_takes():
    """`fastcifar CMD --opt ...` in running text: CMD exists and takes each --opt; --set KEY=VALUE fits."""
    group = _app()
    for page, text in PAGES.items():
        for span in re.findall(r"`(fastcifar [^`]+)`", _prose(text)):
            words = span.split()
            where = f"{page}: `{span}`"
            if words[1].startswith("-"):
                assert words[1] in {o for p in group.params for o in p.opts}, where
                continue
            assert words[1] in group.commands, where
            opts = {o for p in group.commands[words[1]].params for o in getattr(p, "opts", [])}
            for w in words[2:]:
                if w.startswith("-"):
                    assert w.split("=")[0] in opts, f"{where}: `fastcifar {words[1]}` takes no {w}"
            _check_sets(words[1:], where)


def test_every_set_shown_fits_a_recipe_field():
    from fastcifar.config import Recipe, apply_overrides

    for page, text in PAGES.items():
        for item in re.findall(r"--set ([a-z_]+\.[a-z0-9_]+=[^\s`)]+)", text):
            if not re.fullmatch(r"[^=]+=([A-Z_]+|.*\.\.\.)", item):  # placeholders: N, RUN_DIR, ...
                apply_overrides(Recipe(), [item])


def _synopses() -> dict[str, str]:
    """{command: its synopsis lines} from the code blocks without a language across README and docs
    (```bash and ```python blocks are examples)."""
    out: dict[str, str] = {}
    for page, text in PAGES.items():
        fence, cmd = None, None
        for line in text.splitlines():
            if line.startswith("```"):
                fence, cmd = (line[3:].strip() if fence is None else None), None
            elif fence == "" and line.startswith("fastcifar "):
                cmd = line.split()[1]
                assert cmd not in out, f"a second synopsis of `fastcifar {cmd}` in {page}"
                out[cmd] = line.split("#")[0] + "\n"
            elif fence == "" and line.startswith(" ") and cmd:
                out[cmd] += line.split("#")[0] + "\n"
            else:
                cmd = None
    return out


def test_each_synopsis_names_exactly_the_options_of_its_command():
    commands = _app().commands
    synopses = _synopses()
    assert set(synopses) == set(commands), "every command has one synopsis in the docs, and only those"
    for name, text in synopses.items():
        opts = {o for p in commands[name].params for o in getattr(p, "opts", []) if o.startswith("--")} - {"--help"}
        named = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text))
        assert named <= opts, f"the `fastcifar {name}` synopsis names {named - opts}, which it does not take"
        assert opts <= named, f"`fastcifar {name}` takes {opts - named}, which its synopsis leaves out"
        words = text.split()[2:]
        positional = words[:next((i for i, w in enumerate(words) if w.startswith(("[", "--"))), len(words))]
        metavars = [p.metavar for p in commands[name].params if p.param_type_name == "argument"]
        assert positional == metavars, f"`fastcifar {name}` --help shows {metavars}, its synopsis {positional}"


# ---- Facts the docs state about the code, checked against it (each is cheap and likely to rot)


def _section(text: str, title: str) -> str:
    """The text under the heading that starts with `title`, up to the next heading of its level or above."""
    m = re.search(rf"^(#+) {re.escape(title)}.*$", text, re.M)
    assert m, f"no section {title!r}"
    end = re.compile(rf"^#{{1,{len(m.group(1))}}} ", re.M).search(text, m.end())
    return text[m.end():end.start() if end else len(text)]


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


def test_code_map_names_files_and_symbols_that_exist():
    import ast

    rows = _table(_doc("code-map.md"), "you look for")
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


def test_readme_map_names_folders_that_exist():
    for folder, _ in _table(_section(README, "Where things are"), "folder"):
        assert (ROOT / _ticks(folder)[0]).is_dir(), folder


@pytest.mark.parametrize("page", ["README.md", "docs/recipes.md"])
def test_recipe_tables_list_every_recipe_and_the_tutorial_table(page):
    from fastcifar.reproduce import TABLES

    names = [_ticks(row[0])[0] for row in _table(PAGES[page], "recipe")]
    assert sorted(names) == sorted(p.stem for p in (ROOT / "recipes").glob("*.py") if not p.name.startswith("_"))
    # "the twelve tutorial recipes, r18_baseline .. r18_arcface_mst"
    assert tuple(names[:names.index("r18_arcface_mst") + 1]) == TABLES["tutorial"]


def test_readme_recipe_figures_are_the_recipes_own():
    """The tutorial's figure in the README's short table is the one the recipe's docstring quotes."""
    from fastcifar.config import load

    for row in _table(_section(README, "Recipes"), "recipe"):
        figure = re.fullmatch(r"\d+\.\d\d%", row[2])
        if figure:
            assert figure.group() in load(str(ROOT / "recipes" / f"{_ticks(row[0])[0]}.py"))[1]["description"], row


def test_override_keys_exist():
    from fastcifar.config import SECTIONS, valid_keys

    keys = [k for row in _table(_doc("overrides.md"), "key") for k in _ticks(row[0])]
    assert len(keys) > 40
    for k in keys:
        section, field = k.split(".")
        assert (field == "*" and section in SECTIONS) or k in valid_keys(), f"--set {k} is not a recipe field"


def _values(cell: str) -> list:
    """A default cell (`linear`, None, (3/4, 4/3), 0, ...) as Python values, split at top-level commas."""
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

    from fastcifar.pipelines.spec import AugSpec

    default, seen = AugSpec(), []
    for row in _table(_section(_doc("pipelines.md"), "The augmentation spec"), "field"):
        names = _ticks(row[0])
        values = _values(row[1])
        assert len(values) == len(names), row
        for name, value in zip(names, values):
            assert getattr(default, name) == value, f"aug.{name}: the docs say {value!r}, AugSpec {getattr(default, name)!r}"
        seen += names
    assert sorted(seen) == sorted(f.name for f in dataclasses.fields(AugSpec))


def test_run_files_hold_the_fields_the_docs_list(tmp_path):
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

    training = _doc("training.md")
    files = {_ticks(row[0])[0]: _ticks(row[1]) for row in _table(_section(training, "What a run writes"), "file")}
    for written, documented in ((m, files["metrics.jsonl"]), (s, files["summary.json"])):
        assert all(any(fnmatch.fnmatch(k, d) for d in documented) for k in written), \
            f"undocumented: {[k for k in written if not any(fnmatch.fnmatch(k, d) for d in documented)]}"
        assert all("*" in d or d in written for d in documented), [d for d in documented if d not in written]

    prov = " ".join(_ticks(re.search(r"\*\*Provenance\*\*(.*?)\n\n", training, re.S).group(1)))
    for k in [*s["provenance"], *s["provenance"]["data"], *(s["provenance"]["git"] or {})]:
        assert k in prov.split(), f"provenance field {k} is not in the Provenance paragraph of docs/training.md"
