"""`python -m mindone_ext.doctor`: a verdict per stage against the exact float32 path, on whatever
device it finds, and a failing verdict when a stage is wrong."""
import json
import os
import subprocess
import sys

import numpy as np

from mindone_ext import doctor
from mindone_ext.nn.device import EXACT_PRECISION

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_help_answers_without_loading_mindspore():
    code = "import sys, runpy; sys.argv = ['doctor', '--help']\ntry: runpy.run_module('mindone_ext.doctor', run_name='__main__')\n" \
           "except SystemExit: pass\nassert 'mindspore' not in sys.modules"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert "--dtype" in done.stdout


def test_every_stage_passes_here_and_the_report_says_what_ran():
    done = subprocess.run([sys.executable, "-m", "mindone_ext.doctor", "--dtype", "float16", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] and report["versions"]["mindspore"]
    # on a card every op computes in its own dtype (no float16 or HF32 stand-in for float32)
    assert report["precision"] == (EXACT_PRECISION if report["versions"]["device"] == "Ascend" else None)
    rows = {(r["stage"], r["attention"]): r for r in report["stages"]}
    for stage in doctor.STAGES:
        row = rows[(stage, "eager")]
        assert row["verdict"] == "ok" and 0 <= row["error"] <= doctor.TOLERANCE["float16"] and row["seconds"] > 0
    # half precision really is compared: fp16 rounding leaves a visible, bounded error
    assert max(rows[(s, "eager")]["error"] for s in doctor.STAGES) > 1e-5
    if report["versions"]["device"] == "Ascend":  # flash attention runs and is judged there
        assert all(rows[(s, "flash_attention_2")]["verdict"] == "ok" for s in doctor.ATTENTION_STAGES)
    else:
        assert rows[("(attention stages)", "flash_attention_2")]["verdict"].startswith("not run")


def test_a_wrong_or_broken_stage_fails_the_verdict(monkeypatch, capsys):
    right = doctor.STAGES["talker"]
    monkeypatch.setitem(doctor.STAGES, "talker", lambda m, x: 1.1 * np.asarray(right(m, x)))

    def broken(m, x):
        raise RuntimeError("kernel launch failed\nmore detail")

    monkeypatch.setitem(doctor.STAGES, "BigVGAN", broken)
    assert doctor.main(["--dtype", "float32"]) == 1
    out = capsys.readouterr().out
    lines = {line.split("  ")[0]: line for line in out.splitlines()}
    assert "FAIL: error" in lines["talker"]
    assert "FAIL: RuntimeError: kernel launch failed" in lines["BigVGAN"] and "more detail" not in out
    assert "ok" in lines["audio encoder"] and "some stages FAIL" in out
