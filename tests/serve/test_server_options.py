"""The server's command line: loopback by default, no exposure without an API key, the bundled
checkpoint when no model is named, transformers imported without torch."""
import os
import subprocess
import sys

import pytest

from mindone_ext.bundled import CHECKPOINT as BUNDLED
from mindone_ext.serve.__main__ import parse_args
from mindone_ext.serve.options import ServeOptions


def test_binds_to_loopback_by_default_and_needs_a_key_elsewhere(capsys, monkeypatch):
    monkeypatch.delenv("MINDONE_API_KEY", raising=False)
    args = parse_args(["--model_path", "m"])
    assert (args.host, args.port, args.api_key) == ("127.0.0.1", 8000, None)
    assert parse_args(["--model_path", "m", "--host", "::1"]).api_key is None
    with pytest.raises(SystemExit):
        parse_args(["--model_path", "m", "--host", "0.0.0.0"])
    assert "exposes the service" in capsys.readouterr().err
    assert parse_args(["--model_path", "m", "--host", "0.0.0.0", "--api_key", "k"]).api_key == "k"
    monkeypatch.setenv("MINDONE_API_KEY", "from-env")
    assert parse_args(["--model_path", "m", "--host", "0.0.0.0"]).api_key == "from-env"


def test_no_model_path_serves_the_bundled_checkpoint_with_short_spoken_answers(tmp_path):
    args = parse_args([])
    assert args.model_path == BUNDLED and args.talker_max_new_tokens == 100
    assert parse_args(["--model_path", BUNDLED, "--talker_max_new_tokens", "7"]).talker_max_new_tokens == 7
    assert parse_args(["--model_path", str(tmp_path)]).talker_max_new_tokens == ServeOptions().talker_max_new_tokens


def test_a_checkpoint_whose_voices_cannot_be_read_is_refused_with_the_command_to_convert(tiny_checkpoint):
    """Its speakers only in spk_dict.pt and no torch: the server exits naming the conversion."""
    import subprocess
    import sys

    from tests.conftest import ROOT

    code = ("import runpy, sys\nfrom tests.hide_torch import hide_torch\nhide_torch()\n"
            f"sys.argv = ['serve', '--model_path', {tiny_checkpoint!r}, '--port', '0']\n"
            "runpy.run_module('mindone_ext.serve', run_name='__main__')")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "spk_dict.pt needs torch to be read" in done.stderr and "convert_spk_dict_pt2np.py" in done.stderr
    assert "--no_audio_output" in done.stderr


def test_limits_out_of_range_are_refused_before_the_model_loads(capsys):
    for argv, words in ((["--max_active", "-1"], "max_active and max_queue must be >= 0"),
                        (["--max_queue", "-2"], "max_active and max_queue must be >= 0"),
                        (["--cache_memory_mb", "0"], "cache_memory_mb must be > 0"),
                        (["--engine", "fast"], "invalid choice")):
        with pytest.raises(SystemExit):
            parse_args(["--model_path", "m", *argv])
        assert words in capsys.readouterr().err, argv
    args = parse_args(["--model_path", "m", "--max_active", "0", "--cache_memory_mb", "512.5"])
    assert (args.options.max_active, args.options.cache_memory_mb) == (0, 512.5)
    assert args.options.talker_max_new_tokens == args.talker_max_new_tokens


SERVER_IMPORTS = """
import os, runpy, sys
sys.argv = ["serve", "--model_path", os.path.join(sys.argv[1], "no such folder")]
try:
    runpy.run_module("mindone_ext.serve", run_name="__main__")
except SystemExit as end:
    print(end.code)
print("transformers" in sys.modules, "torch" in sys.modules, os.environ.get("USE_TORCH"))
"""


@pytest.mark.parametrize("use_torch, imported", [(None, "True False 0"), ("1", "True True 1")])
def test_the_server_imports_no_torch_through_transformers_unless_asked(tmp_path, use_torch, imported):
    """torch is installed here, as it need not be for users (a dev requirement): the server runs
    transformers as on their machines (~2.7 s less of each start), and a USE_TORCH the user set
    wins. The model's modules (and transformers) are imported before the folder is checked."""
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    env.update({"USE_TORCH": use_torch} if use_torch else {})
    done = subprocess.run([sys.executable, "-c", SERVER_IMPORTS, str(tmp_path)], capture_output=True, text=True,
                          timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "not a folder" in done.stdout.splitlines()[-2]
    assert done.stdout.split()[-3:] == imported.split()
