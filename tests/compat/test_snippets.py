"""Snippets users already have, run unchanged on the bundled checkpoint (tests/compat/snippets:
the existing MindSpore port's README and scripts with their `mindone.transformers` imports
renamed, transformers' model card with PyTorch swapped for MindSpore; each file's header says
exactly what differs from the original). Their model name ("Qwen/Qwen2.5-Omni-7B") and dataset
name resolve to folders in the working directory, as a download would; only their media
placeholders are replaced by real files. Each result is also checked against our own API on the
same inputs. This project's own README's Python blocks run here too, one after another as in a
notebook."""
import json
import os
import re
import runpy
import subprocess
import sys

import mindspore as ms
import numpy as np
import pytest
import soundfile as sf

from mindone_ext.bundled import CHECKPOINT
from mindone_ext.models.qwen2_5_omni.sizing import smart_resize
from tests.conftest import ROOT
from tests.reference_media import real_media as rm

SNIPPETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "snippets")
EXAMPLES = os.path.join(ROOT, "examples", "qwen2_5_omni")
VIDEO = "/path/to/video.mp4"
AUDIO_URL = "https://qianwen-res.oss-cn-beijing.aliyuncs.com/Qwen2-Audio/audio/1272-128104-0000.flac"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A folder where "Qwen/Qwen2.5-Omni-7B" (and -3B) is the bundled checkpoint, with a spoken
    question, a video whose soundtrack speaks and a picture, all made by espeak-ng and ffmpeg."""
    if rm.missing_tools():
        pytest.fail(f"these tests need {rm.missing_tools()} (apt-get install espeak-ng sox ffmpeg)")
    folder = tmp_path_factory.mktemp("compat")
    os.makedirs(folder / "Qwen")
    for name in ("Qwen2.5-Omni-7B", "Qwen2.5-Omni-3B"):
        os.symlink(CHECKPOINT, folder / "Qwen" / name)
    speech = rm.speech(str(folder), "What is drawn on the card?")
    rm.video(str(folder / "video.mp4"), 160, 120, 25, 2, audio=speech)
    rm.image(str(folder / "image.png"), 200, 150, "rgb24")
    return folder


def run_snippet(name, folder, placeholders):
    """Runs snippets/`name` in `folder` with each placeholder (which must occur) replaced;
    returns the snippet's globals."""
    with open(os.path.join(SNIPPETS, name)) as f:
        code = f.read()
    for placeholder, value in placeholders.items():
        assert placeholder in code, f"{name} no longer holds {placeholder!r}"
        code = code.replace(placeholder, str(value))
    path = folder / name
    path.write_text(code)
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        return runpy.run_path(str(path), run_name="__main__")
    finally:
        os.chdir(cwd)


def native_answer(model, processor, conversation, use_audio_in_video=False, **settings):
    """The new token ids our own API gives (numpy inputs straight from the processor)."""
    from mindone_ext import process_mm_info

    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    audios, images, videos, video_kwargs = process_mm_info(conversation, use_audio_in_video, return_video_kwargs=True)
    inputs = processor(text, audio=audios, images=images, videos=videos, use_audio_in_video=use_audio_in_video,
                       **video_kwargs)
    ids = model.generate(**inputs, use_audio_in_video=use_audio_in_video, return_audio=False, **settings)
    return ids.asnumpy()[0, inputs["input_ids"].shape[1]:]


def check_wav(path, model):
    audio, rate = sf.read(path)
    assert rate == 24000 and len(audio) > 0 and len(audio) % model.samples_per_codec_token == 0
    assert len(audio) <= 100 * model.samples_per_codec_token  # the bundled checkpoint's cap on codec tokens
    return audio


def test_mindone_single_media_speech_out(workdir):
    """Video with its soundtrack in, text and speech out; inputs converted to int32 / float32
    mindspore.Tensor by the snippet's own loop."""
    g = run_snippet("mindone_single_media.py", workdir, {VIDEO: workdir / "video.mp4"})
    assert isinstance(g["text"], list) and len(g["text"]) == 1 and isinstance(g["text"][0], str)
    assert g["inputs"]["input_ids"].dtype == ms.int32 and g["inputs"].input_features.shape[0] == 1
    check_wav(workdir / "output.wav", g["model"])
    want = native_answer(g["model"], g["processor"], g["conversation"], use_audio_in_video=True)
    np.testing.assert_array_equal(g["text_ids"][0].asnumpy(), want)


def test_mindone_text_only_in_float16_with_flash_attention(workdir):
    g = run_snippet("mindone_text_only.py", workdir, {VIDEO: workdir / "video.mp4"})
    assert g["model"].dtype == ms.float16 and g["inputs"]["pixel_values_videos"].dtype == ms.float16
    assert len(g["text"]) == 1 and isinstance(g["text"][0], str)
    want = native_answer(g["model"], g["processor"], g["conversation"], use_audio_in_video=True)
    np.testing.assert_array_equal(g["text_ids"][0].asnumpy(), want)


def test_mindone_audio_understanding(workdir):
    g = run_snippet("mindone_audio_understanding.py", workdir, {AUDIO_URL: workdir / "speech.wav"})
    # its text_ids are the whole sequence: the decoded answer starts with the prompt
    assert g["response"][0].startswith("system\nYou are a speech recognition model.\nuser\n")


def test_mindone_image_with_both_voices(workdir):
    g = run_snippet("mindone_image_and_voices.py", workdir, {"/path/to/image.jpg": workdir / "image.png"})
    assert (g["processor"].image_processor.min_pixels, g["processor"].image_processor.max_pixels) == (
        128 * 28 * 28, 768 * 28 * 28)
    # process_mm_info: 200 x 150 within the item's 360 x 420 -> 196 x 140; then the processor's
    # image budget, set above, enlarges it to at least 128 tokens of 28 x 28
    height, width = smart_resize(140, 196, 28, 128 * 28 * 28, 768 * 28 * 28)
    assert g["inputs"]["image_grid_thw"].asnumpy().tolist() == [[1, height // 14, width // 14]]
    for name in ("chelsie", "ethan"):
        check_wav(workdir / f"{name}.wav", g["model"])
    text_only = g["model"].generate(**g["inputs"], return_audio=False)
    np.testing.assert_array_equal(g["text_ids"].asnumpy(), text_only.asnumpy())  # a voice does not change the text


def run_example(script, folder, *args):
    done = subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], cwd=folder, capture_output=True,
                          text=True, timeout=900, env={**os.environ, "DEVICE_ID": "0"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def write_hub_ocr_dataset(folder, n=4):
    """An image + LaTeX set laid out as a Hub dataset repository (Parquet, datasets' Image feature)."""
    import datasets
    from PIL import Image, ImageDraw

    images = []
    for i in range(n):
        image = Image.new("RGB", (112, 56), (255, 255, 255))
        ImageDraw.Draw(image).text((4, 20), f"x^{i}+1", fill=(0, 0, 0))
        images.append(image)
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string")})
    data = datasets.Dataset.from_dict({"image": images, "text": [f"x^{i}+1" for i in range(n)]}, features=features)
    os.makedirs(folder / "data")
    data.to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))


def test_mindone_lora_commands_and_inference(workdir):
    """The existing port's documented fine-tuning commands (its flag names, a Hub-layout
    dataset), then its LoRA inference code (PeftModel, merge_and_unload): the same answer as our
    load_adapter + merge_lora."""
    write_hub_ocr_dataset(workdir / "linxy" / "LaTex_OCR")
    run_example("finetune_lora_with_mindspore_trainer.py", workdir, "--model_path", "Qwen/Qwen2.5-Omni-3B",
                "--lora_rank", "8", "--lora_alpha", "16", "--dataset_path", "linxy/LaTex_OCR", "--output_dir",
                "./outputs/lora_trainer", "--num_train_epochs", "1", "--learning_rate", "1e-5", "--save_total_limit", "1")
    assert os.path.isfile(workdir / "outputs" / "lora_trainer" / "adapter_model.safetensors")
    run_example("finetune_lora_in_native_mindspore.py", workdir, "--model_path", "Qwen/Qwen2.5-Omni-3B",
                "--dataset_path", "linxy/LaTex_OCR", "--enable_flash_attention", "--lora_rank", "8", "--lora_alpha",
                "16", "--output_dir", "./outputs/lora", "--num_train_epochs", "1")
    adapter = workdir / "outputs" / "lora"
    g = run_snippet("mindone_lora_inference.py", workdir, {"LORA_PATH": adapter, "IMAGE_PATH": workdir / "image.png"})
    assert isinstance(g["response"], str)

    from mindone_ext import Qwen2_5OmniForConditionalGeneration
    from mindone_ext.nn.lora import merge_lora

    ours = Qwen2_5OmniForConditionalGeneration.from_pretrained(CHECKPOINT, mindspore_dtype=ms.float16)
    merge_lora(ours.load_adapter(str(adapter)))
    conversation = [{"role": "system", "content": [{"type": "text", "text": SYSTEM}]},
                    {"role": "user", "content": [{"type": "text", "text": "Please convert the image content into LaTex"},
                                                 {"type": "image", "image": str(workdir / "image.png"),
                                                  "max_pixels": 360 * 420}]}]
    want = native_answer(ours, g["processor"], conversation)
    assert g["response"] == g["processor"].batch_decode([want], skip_special_tokens=True,
                                                        clean_up_tokenization_spaces=False)[0]


SYSTEM = ("You are Qwen, a virtual human developed by the Qwen Team, Alibaba Group, capable of perceiving auditory "
          "and visual inputs, as well as generating text and speech.")


def test_transformers_model_card_single_media(workdir):
    """apply_chat_template(tokenize=True): the video read at 1 frame a second (at least 4 frames,
    as transformers' video processor samples), its soundtrack as the audio, mindspore.Tensor out."""
    g = run_snippet("transformers_single_media.py", workdir, {VIDEO: workdir / "video.mp4"})
    inputs = g["inputs"]
    assert all(isinstance(v, ms.Tensor) for v in inputs.values())
    height, width = smart_resize(120, 160, 28, 128 * 28 * 28, 768 * 28 * 28)  # the video processor's budget
    assert inputs.video_grid_thw.asnumpy().tolist() == [[2, height // 14, width // 14]]  # 2 s at 1 fps: 4 frames
    np.testing.assert_allclose(inputs.video_second_per_grid.asnumpy(), [2.0])  # 2 frames a grid at fps=1
    assert inputs.input_features.shape[0] == 1 and inputs.feature_attention_mask.asnumpy().sum() > 100
    assert g["text_ids"].shape[1] > inputs.input_ids.shape[1]
    check_wav(workdir / "output.wav", g["model"])


def test_transformers_model_card_text_only_thinker(workdir):
    g = run_snippet("transformers_text_only.py", workdir, {VIDEO: workdir / "video.mp4"})
    assert type(g["model"]).__name__ == "Qwen2_5OmniThinkerForConditionalGeneration"
    assert len(g["text"]) == 1 and g["text"][0].startswith("system\n")
    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    whole = Qwen2_5OmniForConditionalGeneration.from_pretrained(CHECKPOINT)
    np.testing.assert_array_equal(g["text_ids"].asnumpy(), whole.generate(**g["inputs"], use_audio_in_video=True,
                                                                          return_audio=False).asnumpy())


def test_transformers_model_card_disable_talker(workdir):
    """model.disable_talker() after loading: the speech modules' weights gone, the same text as a
    model loaded without them, and a request for audio refused with one message."""
    g = run_snippet("transformers_disable_talker.py", workdir, {VIDEO: workdir / "video.mp4"})
    model = g["model"]
    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    text_only = Qwen2_5OmniForConditionalGeneration.from_pretrained(CHECKPOINT, mindspore_dtype="auto",
                                                                    enable_audio_output=False)
    assert not model.has_talker and not hasattr(model, "talker") and not hasattr(model, "token2wav")
    assert sorted(n for n, _ in model.parameters_and_names()) == sorted(n for n, _ in text_only.parameters_and_names())
    np.testing.assert_array_equal(g["text_ids"].asnumpy(), text_only.generate(
        **g["inputs"], use_audio_in_video=True).asnumpy())
    with pytest.raises(ValueError, match="disable_talker"):
        model.generate(**g["inputs"], use_audio_in_video=True, return_audio=True)


def test_loading_arguments_from_transformers_and_mindone():
    """mindspore_dtype="auto" is the checkpoint's own (the bundled one is bfloat16); a Thinker
    built without from_pretrained says how to get one that generates; the bundled checkpoint's
    random answers stop at 64 text tokens unless told otherwise."""
    from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniThinkerForConditionalGeneration

    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(CHECKPOINT, mindspore_dtype="auto",
                                                                enable_audio_output=False, device_map="auto")
    assert model.dtype == ms.bfloat16 and model.device == ms.get_context("device_target")
    with pytest.raises(ValueError, match="Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained"):
        Qwen2_5OmniThinkerForConditionalGeneration(model.config.thinker_config).generate(input_ids=[[1, 2]])
    ids = np.array([[1, 2, 3]])
    assert model.generate(input_ids=ids, eos_token_id=[]).shape == (1, 3 + 64)
    assert model.generate(input_ids=ids, eos_token_id=[], max_new_tokens=5).shape == (1, 3 + 5)


def readme_python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), re.S | re.M)


def prefix_kept(text_ids, inputs):
    """The new ids follow the prompt, which generate returns first."""
    ids, prompt = text_ids.asnumpy(), np.asarray(inputs["input_ids"])
    assert ids.shape[1] > prompt.shape[1]
    np.testing.assert_array_equal(ids[:, :prompt.shape[1]], prompt)


def check_media_block(g, folder):
    assert g["model"].dtype == ms.bfloat16
    for name in ("pixel_values_videos", "pixel_values", "input_features"):  # the video's sound too
        assert name in g["inputs"], name
    prefix_kept(g["text_ids"], g["inputs"])


def check_text_only_block(g, folder):
    assert not g["model"].has_talker
    prefix_kept(g["text_ids"], g["inputs"])


def check_speech_block(g, folder):
    audio, model = g["audio"], g["model"]
    assert isinstance(audio, ms.Tensor) and audio.dtype == ms.float32 and audio.ndim == 1
    assert audio.shape[0] > 0 and audio.shape[0] % model.samples_per_codec_token == 0
    prefix_kept(g["text_ids"], g["inputs"])


def check_streaming_block(g, folder):
    assert g["played"] and all(isinstance(a, ms.Tensor) and a.dtype == ms.float32 and a.ndim == 1 for a in g["played"])
    assert len(g["session"].clips) == 1  # the spoken turn, kept in the cache beside the typed one


def check_lora_block(g, folder):
    assert os.path.isfile(folder / "omni_lora" / "adapter_model.safetensors")
    with open(folder / "omni_lora" / "adapter_config.json") as f:
        config = json.load(f)
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 8, 16, 0.05)


def check_export_block(g, folder):
    """The exported folder loads, its weights the merged model's rounded to bfloat16."""
    from mindone_ext import Qwen2_5OmniForConditionalGeneration

    exported = Qwen2_5OmniForConditionalGeneration.from_pretrained(str(folder / "omni-finetuned"),
                                                                   mindspore_dtype=ms.bfloat16)
    ours = dict(g["model"].parameters_and_names())
    theirs = dict(exported.parameters_and_names())
    assert sorted(ours) == sorted(theirs)
    for name, value in theirs.items():
        want = ours[name].astype(ms.bfloat16).astype(ms.float32).asnumpy()
        np.testing.assert_array_equal(value.astype(ms.float32).asnumpy(), want, err_msg=name)


README_CHECKS = [check_media_block, check_text_only_block, check_speech_block, check_streaming_block,
                 check_lora_block, check_export_block]


def test_the_readme_python_blocks_run_one_after_another(workdir):
    """Our README's Python blocks as a user runs them, one after another in one session (a
    notebook): the model folder is the bundled checkpoint, the README's video and photo real files
    (a video whose soundtrack speaks, a picture), `microphone()` the spoken question in uneven
    pieces and `play` a list; what each block makes is checked."""
    blocks = readme_python_blocks()
    assert len(blocks) == len(README_CHECKS), "a README block was added or removed: check what it makes here"
    if not os.path.exists(workdir / "clip.mp4"):
        os.symlink(workdir / "video.mp4", workdir / "clip.mp4")
    rm.convert(str(workdir / "speech.wav"), str(workdir / "speech16k.wav"), rate=16000)  # what a microphone gives
    speech, rate = sf.read(workdir / "speech16k.wav", dtype="float32")
    assert rate == 16000

    def microphone():
        for lo in range(0, len(speech), 3001):
            yield speech[lo:lo + 3001]

    played = []
    g = {"__name__": "__main__", "microphone": microphone, "play": played.append, "played": played}
    placeholders = {'"/models/Qwen2.5-Omni-7B"': repr(CHECKPOINT), '"file:///data/photo.jpg"': repr(
        f"file://{workdir / 'image.png'}"), '"/models/omni-finetuned"': repr(str(workdir / "omni-finetuned"))}
    code = "\n".join(blocks)
    for placeholder in placeholders:
        assert placeholder in code, f"the README no longer holds {placeholder}"
    cwd = os.getcwd()
    os.chdir(workdir)
    try:
        for n, (block, check) in enumerate(zip(blocks, README_CHECKS)):
            for placeholder, value in placeholders.items():
                block = block.replace(placeholder, value)
            exec(compile(block, f"README.md python block {n + 1}", "exec"), g)
            check(g, workdir)
    finally:
        os.chdir(cwd)
