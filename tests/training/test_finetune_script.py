"""The native fine-tuning script end to end on the bundled tiny checkpoint, as a user runs it:
it learns, it survives being killed, it skips bad rows, and its adapter answers through
infer_with_lora.py."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.conftest import ROOT, SHIPPED_CHECKPOINT

EXAMPLES = os.path.join(ROOT, "examples", "qwen2_5_omni")
FINETUNE = os.path.join(EXAMPLES, "finetune_lora_in_native_mindspore.py")
sys.path.insert(0, EXAMPLES)
from demo_media import write_asr_dataset, write_ocr_dataset  # noqa: E402


def command(output_dir, dataset, *extra):
    return [sys.executable, FINETUNE, "--model_path", SHIPPED_CHECKPOINT, "--dataset_path", dataset,
            "--output_dir", str(output_dir), "--quiet", *extra]


def run(output_dir, dataset, *extra, check=True):
    done = subprocess.run(command(output_dir, dataset, *extra), capture_output=True, text=True, timeout=900)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1])
    return done


@pytest.fixture(scope="module")
def ocr_set(tmp_path_factory):
    return write_ocr_dataset(str(tmp_path_factory.mktemp("ocr")), n=16)


def test_overfits_sixteen_image_text_examples(ocr_set, tmp_path):
    summary = run(tmp_path / "out", ocr_set, "--max_steps", "40", "--per_device_batch_size", "4",
                  "--learning_rate", "2e-2", "--lora_dropout", "0", "--save_steps", "1000")
    assert summary["steps"] == 40 and summary["skipped_rows"] == {}
    assert summary["final_loss"] < 0.25 * summary["first_loss"], summary
    for name in ("adapter_model.safetensors", "adapter_config.json", "checkpoint-40"):
        assert os.path.exists(tmp_path / "out" / name)

    # the adapter answers through the inference example, merged or not, with the same text
    answers = []
    for extra in ([], ["--merge"]):
        done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "infer_with_lora.py"), "--model_path",
                               SHIPPED_CHECKPOINT, "--adapter_path", str(tmp_path / "out"), "--image",
                               os.path.join(os.path.dirname(ocr_set), "images", "5.png"), "--max_new_tokens", "12",
                               *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        answers.append([line for line in done.stdout.splitlines() if line.startswith("assistant:")][0])
    assert answers[0] == answers[1]


def test_the_demo_learns_with_its_own_defaults(tmp_path):
    """README's command as a newcomer types it: no dataset, no learning flags."""
    done = subprocess.run([sys.executable, FINETUNE, "--output_dir", str(tmp_path / "demo"), "--quiet"],
                          capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 20 and summary["final_loss"] < 0.5 * summary["first_loss"], summary


@pytest.mark.parametrize("step, stop", [(["--step", "compiled", "--lora_dropout", "0"], signal.SIGKILL),
                                        (["--step", "eager", "--lora_dropout", "0.1"], signal.SIGINT)],
                         ids=["compiled step, killed", "op-by-op step with dropout masks, Ctrl-C"])
def test_stopped_and_resumed_run_ends_where_an_uninterrupted_run_ends(ocr_set, tmp_path, step, stop):
    settings = ["--max_steps", "6", "--per_device_batch_size", "2", "--gradient_accumulation_steps", "2",
                "--learning_rate", "1e-2", "--save_steps", "2", "--warmup_steps", "2", *step]
    whole = run(tmp_path / "whole", ocr_set, *settings)

    process = subprocess.Popen(command(tmp_path / "stopped", ocr_set, *settings), stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 600
    while not os.path.exists(tmp_path / "stopped" / "checkpoint-2") and time.time() < deadline:
        assert process.poll() is None, "the run ended before it could be stopped"
        time.sleep(0.2)
    process.send_signal(stop)
    errors = process.communicate(timeout=300)[1]
    leftovers = sorted(os.listdir(tmp_path / "stopped"))
    assert "adapter_model.safetensors" not in leftovers  # the final adapter is never written by a stopped run
    if stop == signal.SIGINT:  # one line saying where to resume, nothing half-written
        newest = max((n for n in leftovers if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[1]))
        assert process.returncode == 130 and "Traceback" not in errors, errors[-3000:]
        assert errors.strip().splitlines()[-1] == (f"interrupted: {tmp_path / 'stopped' / newest} is the newest "
                                                   "checkpoint: --resume continues from it")
        assert not [n for n in leftovers if "partial" in n]
    resumed = run(tmp_path / "stopped", ocr_set, *settings, "--resume")
    assert resumed["steps"] == 6
    assert abs(resumed["final_loss"] - whole["final_loss"]) <= 1e-5
    history = [json.load(open(tmp_path / d / "trainer_state.json"))["log_history"] for d in ("whole", "stopped")]
    np.testing.assert_allclose([e["loss"] for e in history[1]], [e["loss"] for e in history[0]], atol=1e-5)


def test_bad_rows_are_skipped_and_a_missing_dataset_is_refused(ocr_set, tmp_path):
    rows = open(ocr_set).read().splitlines()[:3]
    rows += ["{broken", json.dumps({"image": "images/none.png", "text": "x"}), json.dumps({"image": "images/1.png"})]
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("\n".join(rows) + "\n")
    os.symlink(os.path.join(os.path.dirname(ocr_set), "images"), tmp_path / "images")
    summary = run(tmp_path / "out", str(dataset), "--max_steps", "1", "--per_device_batch_size", "3")
    assert summary["skipped_rows"] == {"malformed JSON": 1, "missing image file": 1, "empty answer": 1}

    done = run(tmp_path / "never", str(tmp_path / "no_such.jsonl"), check=False)
    assert done.returncode != 0 and "does not exist" in done.stderr
    assert not os.path.exists(tmp_path / "never")


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_data_parallel_equals_one_process_accumulating(ocr_set, tmp_path):
    """msrun with 2 CPU workers (MindSpore's own launcher and collectives), one sample each, against
    one process accumulating the same two samples: the same steps, hence the same adapter."""
    from mindone_ext.utils.safetensors_io import SafetensorsFile

    settings = ["--max_steps", "3", "--per_device_batch_size", "1", "--learning_rate", "1e-2", "--lora_dropout", "0",
                "--step", "compiled"]
    single = run(tmp_path / "single", ocr_set, *settings, "--gradient_accumulation_steps", "2")
    logs = tmp_path / "logs"
    done = subprocess.run(["msrun", "--worker_num", "2", "--local_worker_num", "2", "--master_port", str(free_port()),
                           "--log_dir", str(logs), "--join", "True", *command(tmp_path / "parallel", ocr_set, *settings,
                                                                              "--distributed")[1:]],
                          capture_output=True, text=True, timeout=900)
    rank0 = (logs / "worker_0.log").read_text()
    assert done.returncode == 0, rank0[-3000:] + (logs / "worker_1.log").read_text()[-2000:]
    parallel = json.loads([line for line in rank0.splitlines() if line.startswith("{")][-1])
    assert parallel["world_size"] == 2 and parallel["steps"] == 3
    assert abs(parallel["final_loss"] - single["final_loss"]) <= 1e-5
    a, b = (SafetensorsFile(str(tmp_path / d / "adapter_model.safetensors")) for d in ("single", "parallel"))
    assert sorted(a.keys()) == sorted(b.keys())
    assert max(float(np.abs(a.get(k) - b.get(k)).max()) for k in a.keys()) <= 1e-5


def test_trainer_api_script_learns_and_writes_a_peft_adapter(ocr_set, tmp_path):
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, "finetune_lora_with_mindspore_trainer.py"),
                           "--model_path", SHIPPED_CHECKPOINT, "--dataset_path", ocr_set, "--output_dir",
                           str(tmp_path / "out"), "--lora_rank", "8", "--lora_alpha", "16", "--num_train_epochs", "2",
                           "--per_device_batch_size", "4", "--learning_rate", "1e-2", "--save_steps", "4",
                           "--save_total_limit", "1"], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 8 and summary["final_loss"] < 0.75 * summary["first_loss"]
    assert sorted(n for n in os.listdir(tmp_path / "out") if n.startswith("checkpoint")) == ["checkpoint-8"]
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (8, 16, "LORA")


def test_recompute_evaluation_and_float16(ocr_set, tmp_path):
    eval_set = tmp_path / "eval.jsonl"
    eval_set.write_text("".join(open(ocr_set).readlines()[:3]))
    os.symlink(os.path.join(os.path.dirname(ocr_set), "images"), tmp_path / "images")
    settings = ["--max_steps", "2", "--per_device_batch_size", "2", "--lora_dropout", "0", "--learning_rate", "1e-2",
                "--eval_dataset_path", str(eval_set), "--eval_steps", "1", "--step", "compiled"]
    plain = run(tmp_path / "plain", ocr_set, *settings)
    recomputed = run(tmp_path / "recomputed", ocr_set, *settings, "--recompute")
    logs = [json.load(open(tmp_path / d / "trainer_state.json"))["log_history"] for d in ("plain", "recomputed")]
    assert all("eval_loss" in entry for entry in logs[0])
    # recomputing activations in the backward pass changes memory, not results
    np.testing.assert_allclose([e["loss"] for e in logs[1]], [e["loss"] for e in logs[0]], atol=1e-5)
    np.testing.assert_allclose(recomputed["eval_loss"], plain["eval_loss"], atol=1e-5)
    half = run(tmp_path / "half", ocr_set, *settings, "--mindspore_dtype", "float16")
    state = json.load(open(tmp_path / "half" / "trainer_state.json"))
    assert state["loss_scale"] > 0 and not any(e["skipped_step"] for e in state["log_history"])
    assert abs(half["first_loss"] - plain["first_loss"]) <= 0.02 * plain["first_loss"]


def test_speech_rows_and_encoder_adapters_train(tmp_path):
    """ASR rows (audio + transcript), with adapters on the audio encoder too: gradients reach them."""
    asr = write_asr_dataset(str(tmp_path / "asr"), n=4)
    summary = run(tmp_path / "out", asr, "--max_steps", "3", "--per_device_batch_size", "2", "--learning_rate", "2e-2",
                  "--prompt", "Transcribe the audio.", "--target_modules", "llm+audio", "--lora_dropout", "0")
    assert summary["skipped_rows"] == {} and summary["final_loss"] < summary["first_loss"]
    from mindone_ext.utils.safetensors_io import SafetensorsFile

    adapter = SafetensorsFile(str(tmp_path / "out" / "adapter_model.safetensors"))
    audio_b = [k for k in adapter.keys() if ".audio_tower." in k and k.endswith("lora_B.weight")]
    assert audio_b and all(np.abs(adapter.get(k)).max() > 0 for k in audio_b)  # B starts at zero: it was trained
