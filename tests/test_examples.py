"""The examples run as a user runs them: as scripts, on the bundled checkpoint, without torch."""
import os
import runpy
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import INTERRUPTING_KNOB, ROOT, SHIPPED_CHECKPOINT

HIDE_TORCH = os.path.join(ROOT, "tests", "hide_torch.py")


def run_without_torch(script, *args):
    return subprocess.run([sys.executable, HIDE_TORCH, os.path.join(ROOT, script), *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


def test_torch_is_really_hidden(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text("import importlib.util\nprint(importlib.util.find_spec('torch'))\n"
                     "try:\n    import torch\nexcept ImportError:\n    print('no torch')\n")
    out = subprocess.run([sys.executable, HIDE_TORCH, str(probe)], capture_output=True, text=True)
    assert out.stdout.split() == ["None", "no", "torch"], out.stderr


def test_text_only_generation_runs_on_bundled_checkpoint_without_torch():
    done = run_without_torch("examples/qwen2_5_omni/text_only_generation.py", "--max_new_tokens", "12")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "assistant:" in done.stdout and "[12 tokens in" in done.stdout
    assert "None of PyTorch" not in done.stderr  # transformers' advice does not concern our users
    assert all(c.isprintable() or c in "\n\t" for c in done.stdout)  # random weights' control bytes escaped


HELP_WITHOUT_LIBRARIES = """
import os, runpy, sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mindspore", "torch", "transformers"):
            raise ImportError(f"{name} imported before the command line was parsed")
sys.meta_path.insert(0, Refuse())
sys.argv = [sys.argv[1], "--help"]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python SCRIPT` runs it
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("name", sorted(n[:-3] for n in os.listdir(os.path.join(ROOT, "examples", "qwen2_5_omni"))
                                        if n.endswith(".py") and n not in ("common.py", "demo_media.py")))
def test_help_answers_before_mindspore_torch_or_transformers_load(name):
    done = subprocess.run([sys.executable, "-c", HELP_WITHOUT_LIBRARIES,
                           os.path.join(ROOT, "examples", "qwen2_5_omni", f"{name}.py")],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]


MEDIA_EXAMPLES = ["universal_audio_understanding", "video_information_extracting", "screen_recording_interaction",
                  "omni_chatting_for_music", "omni_chatting_for_math", "multi_round_omni_chatting"]


@pytest.mark.parametrize("name", MEDIA_EXAMPLES)
def test_media_examples_run_without_torch(name):
    """Processor + media loading + model + generate, with torch not importable."""
    done = run_without_torch(f"examples/qwen2_5_omni/{name}.py", "--max_new_tokens", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    answers = [line for line in done.stdout.splitlines() if line.startswith("assistant:")]
    assert answers and "new tokens in" in done.stdout
    assert all(c.isprintable() or c in "\n\t" for c in done.stdout)


def test_voice_chatting_writes_a_24khz_mono_wav_without_torch(tmp_path):
    import re
    import wave

    out = tmp_path / "answer.wav"
    done = run_without_torch("examples/qwen2_5_omni/voice_chatting.py", "--output", str(out), "--max_new_tokens", "8",
                             "--talker_max_new_tokens", "40")
    assert done.returncode == 0, done.stderr[-3000:]
    # no warnings that concern nobody: the Talker's own decode graph, the release config's rope keys
    assert "compiled again" not in done.stderr and "mrope_section" not in done.stderr, done.stderr
    codes = int(re.search(r"speech: (\d+) codec tokens", done.stdout).group(1))
    with wave.open(str(out)) as f:
        assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (24000, 1, 2)
        assert codes > 0 and f.getnframes() == codes * 2 * 240  # 2 mel frames per code, 240 samples per frame
    assert not list(tmp_path.glob("*.partial"))


def test_voice_chatting_streams_chunks_that_join_into_the_output(tmp_path):
    import re
    import wave

    import numpy as np

    out = tmp_path / "answer.wav"
    done = run_without_torch("examples/qwen2_5_omni/voice_chatting.py", "--stream", "--output", str(out),
                             "--max_new_tokens", "40", "--talker_max_new_tokens", "60")
    assert done.returncode == 0, done.stderr[-3000:]
    assert re.search(r"first text token in [\d.]+ s, first speech chunk in [\d.]+ s", done.stdout)

    def samples(path):
        with wave.open(str(path)) as f:
            assert (f.getframerate(), f.getnchannels(), f.getsampwidth()) == (24000, 1, 2)
            return np.frombuffer(f.readframes(f.getnframes()), "<i2")

    chunks = sorted((tmp_path / "answer_chunks").glob("chunk_*.wav"))
    assert len(chunks) >= 2
    codes = int(re.search(r"speech: (\d+) codec tokens", done.stdout).group(1))
    joined = samples(out)
    assert codes > 0 and len(joined) == codes * 2 * 240
    np.testing.assert_array_equal(np.concatenate([samples(c) for c in chunks]), joined)


def mindspore_loading(pid, stdout):
    with open(f"/proc/{pid}/maps") as f:  # its C++ library mapped: `import mindspore` under way or done
        return "_c_expression" in f.read()


def answer_streaming(pid, stdout):
    return "assistant: " in stdout  # the question is prefilled: graphs have run


@pytest.mark.parametrize("moment", [mindspore_loading, answer_streaming],
                         ids=["while MindSpore loads", "while the answer streams"])
def test_ctrl_c_ends_voice_chatting_in_one_line_leaving_no_file(moment, tmp_path):
    """Without the examples' handlers, Ctrl-C printed a traceback while MindSpore loaded and, once a
    graph had run, killed the process silently (MindSpore's own SIGINT handler sends SIGTERM)."""
    output, stdout, stderr = tmp_path / "answer.wav", tmp_path / "stdout", tmp_path / "stderr"
    with open(stdout, "w") as out, open(stderr, "w") as err:
        process = subprocess.Popen([sys.executable, HIDE_TORCH, os.path.join(ROOT, "examples/qwen2_5_omni/voice_chatting.py"),
                                    "--stream", "--output", str(output), "--talker_max_new_tokens", "2000"],
                                   stdout=out, stderr=err, cwd=ROOT)
    deadline = time.time() + 300
    while not moment(process.pid, stdout.read_text()):
        assert process.poll() is None and time.time() < deadline, "the run ended before it could be interrupted"
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    assert process.wait(timeout=120) == 130, stderr.read_text()[-3000:]
    errors = stderr.read_text()
    assert errors.strip().splitlines()[-1] == "interrupted" and "Traceback" not in errors, errors[-3000:]
    assert not output.exists() and not [p for p in tmp_path.rglob("*") if ".partial" in p.name]


def in_session(session):
    """Pids of the live processes in `session` (a process group started with start_new_session)."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if entry.isdigit() and int(fields[3]) == session and fields[0] != "Z":
            pids.append(int(entry))
    return pids


def test_ctrl_c_ends_the_voice_client_and_the_server_it_started(tmp_path):
    """Ctrl-C in a terminal reaches the whole foreground group: the client, and the server it
    started on the bundled checkpoint (nothing listens on the default port in the tests)."""
    output = tmp_path / "answer.wav"
    process = subprocess.Popen([sys.executable, "-u", os.path.join(ROOT, "examples/qwen2_5_omni/voice_server_client.py"),
                                "--output", str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               cwd=tmp_path, start_new_session=True)
    seen = ""
    while "assistant:" not in seen:  # the server answers: the client is mid-turn
        char = process.stdout.read(1)
        assert char, process.stderr.read()[-3000:]
        seen += char
    os.killpg(process.pid, signal.SIGINT)
    errors = process.communicate(timeout=120)[1]
    assert process.returncode == 130 and errors.strip().splitlines()[-1] == "interrupted", errors[-3000:]
    assert not output.exists() and not list(tmp_path.glob("*.partial"))
    deadline = time.time() + 60
    while in_session(process.pid) and time.time() < deadline:
        time.sleep(0.2)
    assert in_session(process.pid) == []  # the server is gone too


CUT_SHORT_TURN = """
import asyncio, runpy, sys
client = runpy.run_path(sys.argv[1])

def cut_short():  # Ctrl-C after a turn's coroutine was made, while asyncio.run built its loop
    global turn, loop
    turn = client["converse"]("ws://127.0.0.1:9/v1/voice", None, {})
    loop = object.__new__(asyncio.SelectorEventLoop)
    raise KeyboardInterrupt

client["end_on_interrupt"](cut_short)
"""


def test_ctrl_c_cutting_the_voice_clients_turn_short_prints_one_line():
    """The moment above at its worst, made deterministic (a CI run of the test above met it): what
    the Ctrl-C left half done (a coroutine never awaited, an event loop half built) must not
    complain after the line."""
    client = os.path.join(ROOT, "examples/qwen2_5_omni/voice_server_client.py")
    out = subprocess.run([sys.executable, "-c", CUT_SHORT_TURN, client], capture_output=True, text=True, timeout=120)
    assert out.returncode == 130 and out.stderr.strip() == "interrupted", out.stderr[-3000:]


CTRL_C_WHILE_COMPILING = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
import common
import numpy as np
import mindspore as ms
signals = int(sys.argv[2])
""" + INTERRUPTING_KNOB + """
@ms.jit
def twice(x):
    return x * knob.scale

common.run_script(lambda: print(twice(ms.Tensor(np.ones(3, np.float32)))))
"""


@pytest.mark.parametrize("signals", [1, 2], ids=["once", "twice"])
def test_ctrl_c_while_a_graph_compiles_ends_in_one_line_and_writes_nothing(signals, tmp_path):
    """A KeyboardInterrupt raised in the Python MindSpore's compiler calls back was logged as its
    ERROR with a trace and its analysis written into the working directory (rank_0/om/); the
    interrupt now waits for the compile to return, or ends the program at a second Ctrl-C."""
    script, work = tmp_path / "compiling.py", tmp_path / "work"  # MindSpore compiles from source files only
    script.write_text(CTRL_C_WHILE_COMPILING)
    work.mkdir()
    out = subprocess.run([sys.executable, str(script), os.path.join(ROOT, "examples/qwen2_5_omni"), str(signals)],
                         capture_output=True, text=True, timeout=300, cwd=work)
    assert out.returncode == 130 and out.stderr.strip().splitlines()[-1] == "interrupted", out.stderr[-3000:]
    assert "ERROR" not in out.stderr and "analyze_fail" not in out.stderr, out.stderr[-3000:]
    assert list(work.iterdir()) == []
    if signals == 2:  # ended inside the compile: the graph never ran
        assert out.stdout == ""


def test_text_only_generation_reports_a_bad_model_path_in_one_line():
    done = run_without_torch("examples/qwen2_5_omni/text_only_generation.py", "--model_path", "/no/such/folder")
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last == "error: checkpoint folder '/no/such/folder' does not exist or is not a folder"


@pytest.mark.parametrize("args, words", [
    (["--audio", "/no/such/question.wav"], "question.wav: file not found"),
    (["--model_path", "/no/such/folder"], "checkpoint folder '/no/such/folder' does not exist"),
])
def test_voice_chatting_names_a_bad_input_in_one_line(args, words, tmp_path):
    done = run_without_torch("examples/qwen2_5_omni/voice_chatting.py", *args, "--output", str(tmp_path / "o.wav"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and words in last and not os.path.exists(tmp_path / "o.wav")


def test_bundled_checkpoint_matches_reference():
    """The shipped bf16 checkpoint loads in both implementations to the same logits."""
    import numpy as np
    import torch
    from transformers import Qwen2_5OmniForConditionalGeneration as Reference

    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    ids = np.arange(3, 30).reshape(1, -1)
    with torch.no_grad():
        want = Reference.from_pretrained(SHIPPED_CHECKPOINT, dtype=torch.float32).thinker(
            input_ids=torch.tensor(ids)).logits.numpy()
    got = Qwen2_5OmniForConditionalGeneration.from_pretrained(SHIPPED_CHECKPOINT).thinker(input_ids=ids).logits
    assert np.abs(got.asnumpy() - want).max() <= 1e-4


TORCH_AFTER_RUN = """
import os, sys
sys.path.insert(0, os.path.join(sys.argv[1], "examples", "qwen2_5_omni"))
import common
common.run(lambda: __import__("mindone_ext.models.qwen2_5_omni.processing"))
print("torch" in sys.modules, os.environ.get("USE_TORCH"))
"""


@pytest.mark.parametrize("use_torch, imported", [(None, "False 0"), ("1", "True 1")])
def test_examples_import_no_torch_through_transformers_unless_asked(use_torch, imported):
    """torch is installed here: the examples' runner keeps transformers from importing it (~2.7 s
    of each start), and a USE_TORCH the user set wins."""
    env = {k: v for k, v in os.environ.items() if k != "USE_TORCH"}
    env.update({"USE_TORCH": use_torch} if use_torch else {})
    done = subprocess.run([sys.executable, "-c", TORCH_AFTER_RUN, ROOT], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == imported.split()


def test_lora_inference_without_an_adapter_says_what_to_run_first(tmp_path):
    done = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "qwen2_5_omni", "infer_with_lora.py")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "no adapter in 'omni_lora_output': train one first" in done.stderr and "finetune_lora_in_native" in done.stderr


def test_the_existing_mindspore_scripts_flag_names_are_aliases(monkeypatch):
    """--enable_flash_attention, --bf16 / --fp16, --per_device_train_batch_size, --lora_path and
    --image_path mean what our own flags mean."""
    folder = os.path.join(ROOT, "examples", "qwen2_5_omni")
    monkeypatch.syspath_prepend(folder)
    native = runpy.run_path(os.path.join(folder, "finetune_lora_in_native_mindspore.py"), run_name="flags")
    args = native["parser"]().parse_args(["--enable_flash_attention", "--bf16", "--per_device_train_batch_size", "4",
                                          "--use_rslora"])
    assert (args.attn_implementation, args.mindspore_dtype, args.per_device_batch_size) == ("flash_attention_2",
                                                                                          "bfloat16", 4)
    assert args.use_rslora and not native["parser"]().parse_args([]).use_rslora
    trainer = runpy.run_path(os.path.join(folder, "finetune_lora_with_mindspore_trainer.py"), run_name="flags")
    monkeypatch.setattr(sys, "argv", ["x", "--fp16", "--per_device_train_batch_size", "2", "--enable_flash_attention"])
    args = trainer["parse_args"]()
    assert (args.attn_implementation, args.mindspore_dtype, args.per_device_batch_size) == ("flash_attention_2",
                                                                                          "float16", 2)
    done = subprocess.run([sys.executable, os.path.join(folder, "infer_with_lora.py"), "--lora_path", "nowhere",
                           "--image_path", "x.png"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert done.returncode == 1 and "no adapter in 'nowhere'" in done.stderr
