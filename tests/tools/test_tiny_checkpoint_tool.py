"""tools/tiny_checkpoint.py as a command: bad arguments are one line, an existing folder is kept."""
import os
import subprocess
import sys

from tests.conftest import ROOT

SCRIPT = os.path.join(ROOT, "tools", "tiny_checkpoint.py")


def test_a_bad_size_or_an_existing_folder_is_one_line_and_changes_nothing(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for args, words in (([str(tmp_path / "new"), "--shard-size", "12XB"], "--shard-size: cannot read '12XB' as a size"),
                        ([str(tmp_path / "mine")], "already exists; pass --overwrite")):
        done = subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, timeout=120)
        assert done.returncode == 1 and words in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep" and not (tmp_path / "new").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tiny-")]
