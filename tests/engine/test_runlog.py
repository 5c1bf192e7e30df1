"""log.txt in run folders: the console log, once, without progress bars."""

from __future__ import annotations

import logging
import subprocess
import sys

import yaml
from helpers import CPU_PRETRAIN_CONFIG, tiny_pretrain_overrides

from predet.cli import main as cli_main
from predet.engine.runlog import run_log


def test_pretrain_run_folder_has_the_console_log(fashiondet_tiny, tmp_path, capsys):
    run = tmp_path / "run"
    overrides = tiny_pretrain_overrides(fashiondet_tiny / "weak", run, 2, **{"train.progress": "true"})
    assert cli_main(["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), "--print-config", *overrides]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["solver"]["max_iters"] == 2 and not run.exists()
    assert cli_main(["pretrain", "--config", str(CPU_PRETRAIN_CONFIG), *overrides]) == 0
    log = (run / "log.txt").read_text()
    assert "predet.engine" in log and "\r" not in log  # the progress bar stayed on the console
    logging.getLogger("predet.test").info("after the run")
    assert "after the run" not in (run / "log.txt").read_text()  # the handler is gone again


def test_no_second_copy_when_stderr_already_goes_to_log_txt(tmp_path):
    """A sweep captures each run's output into its log.txt: lines must not appear twice."""
    code = ("import logging, sys; logging.basicConfig(level=logging.INFO)\n"
            "from predet.engine.runlog import run_log\n"
            f"with run_log({str(tmp_path)!r}) as path:\n"
            "    logging.getLogger('x').info('hello once'); print(path, file=sys.stderr)\n")
    with open(tmp_path / "log.txt", "ab") as log:
        subprocess.run([sys.executable, "-c", code], stderr=log, check=True)
    text = (tmp_path / "log.txt").read_text()
    assert text.count("hello once") == 1 and "None" in text
    with run_log(tmp_path / "direct") as path:
        logging.getLogger("y").info("to the file")
    assert "to the file" in path.read_text()
