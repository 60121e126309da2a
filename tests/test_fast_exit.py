"""Engine processes end at multiprocessing's exit report (qwen_vl.model_executor.exit): same exit
code, atexit callbacks and buffered output kept, only the interpreter's teardown skipped."""

import multiprocessing

import pytest

from qwen_vl.model_executor.exit import install_fast_exit


class TornDown:
    """Writes its file when the interpreter's teardown destroys it."""

    def __init__(self, path: str):
        self.path = path

    def __del__(self, _open=open):  # builtins may be gone by then
        with _open(self.path, "w") as f:
            f.write("torn down")


KEPT = []


def child(marker: str, outcome: str, installed_file: str) -> None:
    import atexit
    import sys
    from pathlib import Path

    KEPT.append(TornDown(marker + ".teardown"))
    Path(installed_file).write_text(str(install_fast_exit()))
    atexit.register(lambda: Path(marker).write_text("atexit ran"))
    sys.stdout.write("buffered, not yet flushed")
    if outcome == "raise":
        raise RuntimeError("engine failed")
    if outcome == "exit3":
        raise SystemExit(3)


@pytest.mark.parametrize(("name", "outcome", "code"), [
    ("EngineCore", "return", 0), ("EngineCore_DP1", "exit3", 3), ("VllmWorker-0", "raise", 1),
    ("UserProcess", "exit3", 3),
])
def test_exit_code_and_atexit_survive(tmp_path, capfd, name, outcome, code):
    marker, installed = tmp_path / "marker", tmp_path / "installed"
    process = multiprocessing.get_context("spawn").Process(
        target=child, args=(str(marker), outcome, str(installed)), name=name)
    process.start()
    process.join(60)
    assert process.exitcode == code
    assert installed.read_text() == str(name != "UserProcess")
    assert marker.read_text() == "atexit ran"
    # Only a process left alone goes through the interpreter's teardown.
    assert (tmp_path / "marker.teardown").exists() == (name == "UserProcess")
    assert "buffered, not yet flushed" in capfd.readouterr().out


def test_not_in_the_main_process():
    assert install_fast_exit() is False
