"""What every example shares: the command line, loading model and processor, answering a
conversation, and demo media when the user gives none. MindSpore and the model's code are
imported when a model is loaded, not before: `--help` answers at once."""
import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time

from mindone_ext.models.qwen2_5_omni.prompts import SYSTEM_PROMPT  # the prompt speech needs
from mindone_ext.utils.without_torch import transformers_without_torch

HERE = os.path.dirname(os.path.abspath(__file__))
TINY_CHECKPOINT = os.path.join(HERE, "tiny-qwen2.5-omni")
DTYPES = ("bfloat16", "float16", "float32")


def mindspore_dtype(name):
    import mindspore as ms

    return getattr(ms, name)


def printable(text):
    """Model text as it may go to a terminal: control characters (random weights produce them,
    and some move the cursor or clear the screen) shown as escapes; newlines and tabs kept."""
    return "".join(c if c.isprintable() or c in "\n\t" else c.encode("unicode_escape").decode() for c in text)


def parser(description):
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_path", default=TINY_CHECKPOINT,
                    help="a Hugging Face Qwen2.5-Omni folder (default: the bundled tiny random checkpoint)")
    ap.add_argument("--max_new_tokens", type=int, default=64)
    add_model_flags(ap)
    ap.add_argument("--device_target", choices=["CPU", "Ascend"], default=None)
    return ap


def add_model_flags(ap, dtype_help=None):
    """--mindspore_dtype and --attn_implementation, also under the existing MindSpore port's
    spellings (--bf16, --fp16, --enable_flash_attention)."""
    ap.add_argument("--mindspore_dtype", choices=DTYPES, default="float32", help=dtype_help)
    ap.add_argument("--bf16", dest="mindspore_dtype", action="store_const", const="bfloat16",
                    help="same as --mindspore_dtype bfloat16")
    ap.add_argument("--fp16", dest="mindspore_dtype", action="store_const", const="float16",
                    help="same as --mindspore_dtype float16")
    ap.add_argument("--attn_implementation", choices=["eager", "sdpa", "flash_attention_2"], default="eager",
                    help="flash_attention_2: MindSpore's fused kernel on Ascend (exact attention elsewhere)")
    ap.add_argument("--enable_flash_attention", dest="attn_implementation", action="store_const",
                    const="flash_attention_2", help="same as --attn_implementation flash_attention_2")


def end_quietly_on_interrupt():
    """From here on, Ctrl-C (or SIGTERM) ends the program with one line on stderr, `interrupted`
    (and what the interrupted code added to its KeyboardInterrupt), and exit status 130, as a shell
    expects of Ctrl-C, wherever it lands; the files written are whole or absent. Without it Python
    prints a traceback, a signal inside MindSpore's import surfaces as an ImportError, and once a
    graph has run Ctrl-C ends the process silently: MindSpore 2.7.1's graph runs install a SIGINT
    handler that sends the process SIGTERM (ccsrc/utils/signal_util.cc)."""
    signal.signal(signal.SIGINT, _raise_interrupt)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    sys.excepthook = _report_uncaught


_signalled = []
_COMPILER = os.path.join("mindspore", "common", "api.py")  # where every compile passes (jit, a loaded graph, an export)
COMPILE_POLL_SECONDS = 0.02


def _raise_interrupt(signum, frame):
    """KeyboardInterrupt where the signal lands, except inside MindSpore's compiler: an exception
    raised in the Python it calls back is reported as its own error (a trace on stderr) and its
    analysis written into the working directory (rank_0/om/analyze_fail.ir). There it is raised as
    soon as the compile returns; a second signal meanwhile ends the program at once."""
    _signalled.append(signum)
    if not _compiling(frame):
        raise KeyboardInterrupt
    if len(_signalled) > 1:
        _end_interrupted()
    _raise_after_compile(signal.SIGALRM, frame)


def _raise_after_compile(signum, frame):
    if _compiling(frame):  # looked at again every COMPILE_POLL_SECONDS
        signal.signal(signal.SIGALRM, _raise_after_compile)
        signal.setitimer(signal.ITIMER_REAL, COMPILE_POLL_SECONDS)
        return
    raise KeyboardInterrupt


def _compiling(frame):
    while frame is not None:
        if frame.f_code.co_name == "compile" and frame.f_code.co_filename.endswith(_COMPILER):
            return True
        frame = frame.f_back
    return False


def _report_uncaught(kind, value, traceback):
    if not (issubclass(kind, KeyboardInterrupt) or _signalled):
        return sys.__excepthook__(kind, value, traceback)
    if os.environ.get("MINDONE_TRACEBACK"):
        sys.__excepthook__(kind, value, traceback)
    _end_interrupted(str(value) if issubclass(kind, KeyboardInterrupt) else "")


def _end_interrupted(note=""):
    print(f"interrupted: {note}" if note else "interrupted", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(130)  # as run_script does; MindSpore's teardown can wait on work that was cut short


@contextlib.contextmanager
def on_interrupt(note):
    """An interruption inside the block ends with `interrupted: <note()>` (e.g. where to resume)."""
    try:
        yield
    except BaseException as e:
        if isinstance(e, KeyboardInterrupt) or _signalled:  # a signal inside MindSpore can surface as its error
            raise KeyboardInterrupt(note()) from e
        raise


def run(main, *args):
    """Run an example's main (without torch in transformers). A problem with what the user gave
    (a missing or corrupt file, a checkpoint folder, a prompt too long, a bad dataset) ends with
    one line naming it, not a traceback; MINDONE_TRACEBACK=1 shows the trace. So does Ctrl-C."""
    transformers_without_torch()
    end_quietly_on_interrupt()
    try:
        result = main(*args)
    except (ValueError, OSError) as e:  # MediaError, CheckpointError, DatasetError, ... are ValueErrors
        if os.environ.get("MINDONE_TRACEBACK") or _signalled:
            raise
        sys.exit(f"error: {e}")
    if _signalled:  # a signal held back while a compile finished, and main ended before it was raised
        raise KeyboardInterrupt
    return result


def run_script(main):
    """`run(main)` as a script's last step, then the process ends at once: what the example
    writes is written and closed by then, and MindSpore's teardown took ~0.3-0.6 s of
    voice_chatting.py's ~7 s (measured), as the voice server also skips it."""
    run(main)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def load(args, enable_audio_output=False):
    import mindspore as ms

    from mindone_ext import Qwen2_5OmniForConditionalGeneration, Qwen2_5OmniProcessor

    if args.device_target:
        ms.set_context(device_target=args.device_target)
    model = Qwen2_5OmniForConditionalGeneration.from_pretrained(
        args.model_path, mindspore_dtype=mindspore_dtype(args.mindspore_dtype),
        attn_implementation=args.attn_implementation, enable_audio_output=enable_audio_output)
    return model, Qwen2_5OmniProcessor.from_pretrained(args.model_path)


def load_with_speech(args):
    return load(args, enable_audio_output=True)


def demo_media():
    """Demo media (a wav, a png, an mp4 with sound), generated once into a cache folder."""
    from demo_media import demo_files

    return demo_files(os.path.join(tempfile.gettempdir(), "mindone_ext_demo_media"))


def answer(model, processor, conversation, max_new_tokens, use_audio_in_video=False):
    """Runs one conversation; prints and returns the answer text."""
    from mindone_ext import process_mm_info

    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    audios, images, videos, video_kwargs = process_mm_info(conversation, use_audio_in_video, return_video_kwargs=True)
    inputs = processor(text, audio=audios, images=images, videos=videos, use_audio_in_video=use_audio_in_video,
                       **video_kwargs)
    start = time.time()
    ids = model.generate(**inputs, use_audio_in_video=use_audio_in_video, return_audio=False,
                         max_new_tokens=max_new_tokens)
    new = ids[:, inputs["input_ids"].shape[1]:]
    reply = processor.batch_decode(new, skip_special_tokens=True, clean_up_tokenization_spaces=False)[0]
    print(f"assistant: {printable(reply)}")
    print(f"[{inputs['input_ids'].shape[1]} prompt tokens, {new.shape[1]} new tokens in {time.time() - start:.2f} s]")
    return reply


def user_turn(*media, text):
    return {"role": "user", "content": list(media) + [{"type": "text", "text": text}]}


def system_turn(text=SYSTEM_PROMPT):
    return {"role": "system", "content": [{"type": "text", "text": text}]}
