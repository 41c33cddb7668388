"""What surrounds a fastcifar process: torchrun's environment variables set by hand or left over,
standard streams that are closed or whose reader went away, hang-ups and signals, and the command
line itself (--help, --version, python -m fastcifar)."""

import pytest

from fastcifar import BadInput
from fastcifar import dist as fdist
from test_cli_paths import cli, one_paragraph

LAUNCH = {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


@pytest.mark.parametrize("env, message", [
    ({"WORLD_SIZE": "2"}, "needs RANK, LOCAL_RANK, MASTER_ADDR, MASTER_PORT"),
    ({"RANK": "abc"}, "RANK='abc' is not a process index"),
    ({"LOCAL_RANK": "-1"}, "LOCAL_RANK='-1' is not a process index"),
    ({"WORLD_SIZE": "0"}, "WORLD_SIZE must be at least 1"),
    ({"WORLD_SIZE": ""}, "WORLD_SIZE='' is not a process index"),
    ({"RANK": "1"}, "must be below WORLD_SIZE (1)"),
    ({**LAUNCH, "RANK": "2"}, "must be below WORLD_SIZE (2)"),
    ({**LAUNCH, "MASTER_PORT": "http"}, "MASTER_PORT='http' is not a port"),
])
def test_torchrun_variables_that_do_not_fit_are_bad_input(monkeypatch, env, message):
    for k in fdist.LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(BadInput, match="torchrun") as e:
        fdist.launch()
    assert message in str(e.value)


def test_torchrun_variables_of_one_process_or_a_full_launch_are_read(monkeypatch):
    for k in fdist.LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    assert fdist.launch() == (0, 1, 0)
    for k, v in {**LAUNCH, "RANK": "1", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    assert fdist.launch() == (1, 2, 1)


def test_train_with_a_stray_world_size_exits_2_before_writing(monkeypatch, capsys, tmp_path):
    for k in fdist.LAUNCH_VARS:
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "2")
    code, _, err = cli(monkeypatch, capsys, "train", "smoke", "--out", tmp_path / "run", "--data-dir", tmp_path / "none")
    assert code == 2 and one_paragraph(err) and "WORLD_SIZE=2 needs RANK" in err
    assert not (tmp_path / "run").exists()
