"""The package as users get it: a wheel built from this repository, installed with its `serve`
extra into a fresh virtual environment (nothing of the repository's own environment), starts the
voice server on the bundled checkpoint and serves its page."""
import json
import os
import subprocess
import sys
import urllib.request

from mindone_ext.serve.process import ServerProcess
from tests.conftest import ROOT, SHIPPED_CHECKPOINT


def test_a_wheel_in_a_fresh_venv_serves(tmp_path):
    # nothing of this environment leaks in: no PYTHONPATH, run outside the repository
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w", str(tmp_path / "dist"), ROOT],
                   check=True, timeout=600, env=clean, cwd=str(tmp_path))
    (wheel,) = os.listdir(tmp_path / "dist")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300, env=clean)
    python = str(venv / "bin" / "python")
    installed = subprocess.run([python, "-m", "pip", "install", "--quiet", f"{tmp_path / 'dist' / wheel}[serve]"],
                               capture_output=True, text=True, timeout=1800, env=clean, cwd=str(tmp_path))
    assert installed.returncode == 0, installed.stderr[-3000:]
    with ServerProcess(SHIPPED_CHECKPOINT, python=python, cwd=str(tmp_path), env=clean, replace_env=True,
                       startup_timeout=600) as server:
        assert str(venv) in server.imported_from  # the wheel's package, not this repository's
        with urllib.request.urlopen(server.url + "/") as page:
            assert b"voice chat" in page.read()
        with urllib.request.urlopen(server.url + "/static/app.js") as script:
            assert b"voiceStats" in script.read()
        request = urllib.request.Request(server.url + "/v1/chat/completions", headers={"Content-Type": "application/json"},
                                         data=json.dumps({"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 3}).encode())
        with urllib.request.urlopen(request, timeout=600) as answer:
            assert json.loads(answer.read())["usage"]["completion_tokens"] == 3
