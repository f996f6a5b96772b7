"""Token2Wav on codes as they arrive, against the whole-answer Token2Wav on the same noise."""
import numpy as np
import pytest
from mindspore import Tensor

from mindone_ext.generation.decode import bucket
from mindone_ext.models.qwen2_5_omni.dit import block_window, window_attention
from mindone_ext.models.qwen2_5_omni.token2wav_stream import NoiseFrames, StreamChunking, Token2WavStream, synthesise
from tests.conftest import max_abs_diff, snr_db
from tests.models.qwen2_5_omni.test_vocoder import record_batches

CODES = np.random.default_rng(5).integers(0, 8000, size=(1, 60))  # 120 mel frames = 5 DiT blocks



@pytest.fixture(scope="module")
def whole(our_model):
    speaker = our_model.speakers["Ethan"]
    t2w = our_model.token2wav
    mel = t2w.sample_mel(CODES, speaker.cond, speaker.ref_mel, seed=3).asnumpy()[0].T
    return mel, t2w(CODES, speaker.cond, speaker.ref_mel, seed=3).asnumpy()


def stream(model, chunking, pieces_of=1, noise=None):
    speaker = model.speakers["Ethan"]
    s = Token2WavStream(model.token2wav, speaker.cond, speaker.ref_mel, chunking, noise=noise, seed=3)
    pieces = [p for i in range(0, CODES.shape[1], pieces_of) for p in s.push(CODES[:, i:i + pieces_of])]
    return s, pieces + s.finish()


@pytest.mark.parametrize("chunking, pieces_of, min_snr", [
    (StreamChunking(chunk_blocks=2, vocoder_lookahead=False), 1, 60),
    (StreamChunking(chunk_blocks=1, past_blocks=1, future_blocks=1, vocoder_lookahead=False), 5, 45),  # one DiT block
    (StreamChunking(chunk_blocks=2, past_blocks=0, future_blocks=2, vocoder_lookahead=False), 7, 30),  # no past
])
def test_streamed_audio_matches_the_whole_answer(our_model, whole, chunking, pieces_of, min_snr):
    whole_mel, whole_wav = whole
    s, pieces = stream(our_model, chunking, pieces_of)
    assert len(pieces) >= 2
    wav = np.concatenate(pieces)
    assert wav.dtype == np.float32 and wav.shape == whole_wav.shape
    assert snr_db(s.mel, whole_mel) >= min_snr
    assert snr_db(wav, whole_wav) >= min_snr
    # without look-ahead the vocoder's chunk joins are exact: the pieces equal the vocoder on the streamed mel at once
    at_once = our_model.token2wav.code2wav_bigvgan_model(Tensor(s.mel.T[None])).asnumpy()
    assert max_abs_diff(wav, at_once) <= 1e-5


@pytest.mark.parametrize("chunking, pieces_of, chunk_frames, min_snr", [
    (StreamChunking(), 1, [24, 48, 48], 45),  # the defaults: chunks of 1, 2 blocks, then the rest
    (StreamChunking(chunk_blocks=2, past_blocks=0, future_blocks=2), 7, [48, 72], 30),
])
def test_look_ahead_plays_whole_chunks_and_changes_only_the_samples_before_a_join(our_model, whole, chunking,
                                                                                   pieces_of, chunk_frames, min_snr):
    """With look-ahead each chunk's piece is all its frames, and the provisional frames after a
    chunk reach only the samples of the `vocoder_context` frames before its join: every other
    sample equals the vocoder on the final mel at once."""
    whole_mel, whole_wav = whole
    s, pieces = stream(our_model, chunking, pieces_of)
    hop = our_model.token2wav.code2wav_bigvgan_model.hop
    assert [len(p) // hop for p in pieces] == chunk_frames
    wav = np.concatenate(pieces)
    assert wav.shape == whole_wav.shape and snr_db(s.mel, whole_mel) >= min_snr and snr_db(wav, whole_wav) >= min_snr
    at_once = our_model.token2wav.code2wav_bigvgan_model(Tensor(s.mel.T[None])).asnumpy()
    near = np.zeros(len(s.mel), bool)
    for join in np.cumsum(chunk_frames)[:-1]:
        near[join - chunking.vocoder_context:join] = True
    near = np.repeat(near, hop)
    assert max_abs_diff(wav[~near], at_once[~near]) <= 1e-5
    assert max_abs_diff(wav[near], at_once[near]) > 1e-5  # the provisional frames were heard
    assert snr_db(wav[near], at_once[near]) >= min_snr


@pytest.mark.parametrize("lookahead", [True, False])
def test_the_waveform_does_not_depend_on_how_codes_are_grouped(our_model, lookahead):
    """Codes pushed one by one (a synthesis per chunk) or many at a time (several chunks solved in
    one call, as a busy voice server does): the same waveform, so an answer sounds the same alone
    as among others."""
    chunking = StreamChunking(vocoder_lookahead=lookahead)
    _, one_by_one = stream(our_model, chunking)
    for pieces_of in (7, 30, 60):
        _, grouped = stream(our_model, chunking, pieces_of)
        assert max_abs_diff(np.concatenate(grouped), np.concatenate(one_by_one)) <= 1e-5


def test_chunks_grow_after_the_first(our_model):
    assert [StreamChunking().blocks(n) for n in range(6)] == [1, 2, 4, 8, 16, 16]
    assert [StreamChunking(chunk_blocks=3, max_chunk_blocks=3).blocks(n) for n in range(3)] == [3, 3, 3]
    assert StreamChunking(chunk_blocks=4, max_chunk_blocks=2).blocks(3) == 4  # never below the first
    speaker = our_model.speakers["Ethan"]
    hop = our_model.token2wav.code2wav_bigvgan_model.hop
    for chunking, first_ready, first_frames in ((StreamChunking(), 23, 24),
                                                (StreamChunking(chunk_blocks=2, vocoder_lookahead=False), 35, 24)):
        s = Token2WavStream(our_model.token2wav, speaker.cond, speaker.ref_mel, chunking, seed=3)
        ready = {i: pieces for i in range(CODES.shape[1]) for pieces in [s.push(CODES[:, i:i + 1])] if pieces}
        # the first chunk (1 block = 12 codes; 2 blocks) waits for one block of codes after it
        # (24 codes; 36 codes), then plays all of it with look-ahead, all but the vocoder's
        # context without (24 frames either way)
        first = min(ready)
        assert first == first_ready and len(ready[first][0]) == first_frames * hop
        assert s.finish() and len(s.mel) == 120


def scheduled_windows(model, codes, chunking):
    """The ODE windows a stream makes for `codes` codec tokens arriving one by one (nothing solved:
    each window's frames are taken as zeros)."""
    speaker = model.speakers["Ethan"]
    s = Token2WavStream(model.token2wav, speaker.cond, speaker.ref_mel, chunking, seed=0)
    made = []
    for i in range(codes):
        s.add(np.zeros((1, 1), np.int64))
        if i == codes - 1:
            s.end()
        for w in s.windows():
            made.append(w)
            s.take_mel([(np.zeros((w.end - w.start, s.mel.shape[1]), np.float32), s.mel[:0])])
    return s, made


def test_windows_tile_the_answer_and_a_finished_rest_joins_the_last(our_model):
    block, past, future = 24, 48, 24
    chunking = StreamChunking()
    sizes = [chunking.blocks(n) * block for n in range(8)]  # 24, 48, 96, 192, 384, 384, ...
    # every answer length from one code to past the fourth chunk's window, by single codes
    for codes in range(1, (sum(sizes[:4]) + past + future) // 2 + 14):
        s, windows = scheduled_windows(our_model, codes, chunking)
        total = 2 * codes
        assert [w.start for w in windows] == [0] + [w.end for w in windows[:-1]] and windows[-1].end == total
        for n, w in enumerate(windows):
            last = min(w.end + future, total)
            assert w.first == max(0, w.start - past) and len(w.row.noise) == last - w.first <= w.length
            final = n == len(windows) - 1
            # only the last window is longer than its chunk, by at most the future context it needs no more
            assert w.end - w.start <= sizes[n] + (future if final else 0)
            stream_length = next(size for size in s.lengths if size >= last - w.first)
            assert w.length == (min(stream_length, bucket(last - w.first, 2 * block)) if final else stream_length)
        # the rest after the last but one window did not fit that window's chunk and its future
        if len(windows) > 1:
            assert total - windows[-2].start > sizes[len(windows) - 2] + future
    # the bench's 10 s answer (497 codes): 1352 frames solved (first chunks of 2 blocks: 1344, and
    # 1464 with chunks of at most 8 blocks and the tail padded to a chunk's window); the whole
    # answer solves 1024 (bucket)
    _, windows = scheduled_windows(our_model, 497, chunking)
    assert [w.length for w in windows] == [48, 96, 168, 264, 456, 320]
    _, windows = scheduled_windows(our_model, 497, StreamChunking(chunk_blocks=2, max_chunk_blocks=8))
    assert sum(w.length for w in windows) == 1440  # the tail's padding alone: its 130 frames in 144, not 168


def test_a_chunk_longer_than_the_answer_is_the_whole_answer(our_model, whole):
    _, pieces = stream(our_model, StreamChunking(chunk_blocks=8), pieces_of=4)
    assert len(pieces) == 1
    assert max_abs_diff(pieces[0], whole[1]) <= 1e-5


def test_codes_past_the_dit_table_are_dropped_as_in_the_whole_answer(our_model, whole):
    speaker = our_model.speakers["Ethan"]
    s = Token2WavStream(our_model.token2wav, speaker.cond, speaker.ref_mel, StreamChunking(chunk_blocks=8), seed=3)
    mixed = np.insert(CODES, [5, 40], [8300, 8447], axis=1)
    wav = np.concatenate(s.push(mixed) + s.finish())
    assert max_abs_diff(wav, whole[1]) <= 1e-5


def test_padded_frames_never_reach_real_ones():
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 2, 72, 16)).astype(np.float32) for _ in range(3))
    for back, ahead in ((1, 0), (0, 0), (0, 1), (2, 1)):
        exact = window_attention(*(Tensor(a[:, :, :30]) for a in (q, k, v)), block_window(30, 24, back, ahead), 0.25)
        padded = window_attention(Tensor(q), Tensor(k), Tensor(v), block_window(30, 24, back, ahead, 72), 0.25)
        assert max_abs_diff(padded.asnumpy()[:, :30], exact.asnumpy()) <= 1e-6
        # a mask per row: rows of 30 and 50 frames in one padded batch, each as if alone
        rows = window_attention(Tensor(q), Tensor(k), Tensor(v), block_window([30, 50], 24, back, ahead, 72), 0.25)
        longer = window_attention(*(Tensor(a[1:, :, :50]) for a in (q, k, v)), block_window(50, 24, back, ahead), 0.25)
        assert max_abs_diff(rows.asnumpy()[:1, :30], exact.asnumpy()[:1]) <= 1e-6
        assert max_abs_diff(rows.asnumpy()[1:, :50], longer.asnumpy()) <= 1e-6


def test_noise_frames_are_one_draw_and_checked():
    whole = np.random.default_rng(9).standard_normal((1, 50, 8)).astype(np.float32)
    frames = NoiseFrames(8, seed=9)
    np.testing.assert_array_equal(np.concatenate([frames[slice(30, 50)], frames[slice(0, 30)]], 1),
                                  np.concatenate([whole[:, 30:], whole[:, :30]], 1))
    given = NoiseFrames(8, noise=whole)
    with pytest.raises(ValueError, match="noise has 50 frames; the answer needs at least 60"):
        given[slice(40, 60)]
    with pytest.raises(ValueError, match=r"noise must be \(1, frames, 8\)"):
        NoiseFrames(8, noise=whole[0])


def test_bad_chunking_and_pushing_after_finish(our_model):
    with pytest.raises(ValueError, match="chunk_blocks must be >= 1"):
        StreamChunking(chunk_blocks=0)
    speaker = our_model.speakers["Ethan"]
    s = Token2WavStream(our_model.token2wav, speaker.cond, speaker.ref_mel)
    assert s.finish() == []
    with pytest.raises(ValueError, match="finished"):
        s.push(CODES[:, :3])


@pytest.mark.parametrize("compiled_vocoder", [False, True])
def test_streams_made_together_equal_each_made_alone(our_model, monkeypatch, compiled_vocoder):
    """The voice server's way: several answers' windows solved as one batch (rows with their own
    speaker, noise and frame count) and, op by op, their vocoder spans of equal width as one batch
    (compiled, each window runs through the one graph)."""
    t2w, speakers = our_model.token2wav, our_model.speakers
    monkeypatch.setattr(t2w.vocoder, "compiled", compiled_vocoder)
    rng = np.random.default_rng(11)
    # a third answer with codes past the DiT's table: fewer frames, so its last window shares a
    # batch with the others' at another frame count
    plan = [("Ethan", rng.integers(0, 8000, 60), 3), ("Chelsie", rng.integers(0, 8000, 60), 4),
            ("Ethan", np.insert(rng.integers(0, 8000, 54), [3, 20, 21, 30, 40, 50], 8400), 5)]

    def streams():
        return [Token2WavStream(t2w, speakers[name].cond, speakers[name].ref_mel, seed=seed) for name, _, seed in plan]

    alone = []
    for s, (_, codes, _) in zip(streams(), plan):
        alone.append(np.concatenate([p for c in codes for p in s.push([c])] + s.finish()))
    rows, solve_rows = [], t2w.solve_rows
    monkeypatch.setattr(t2w, "solve_rows", lambda r, *a, **k: rows.append(len(r)) or solve_rows(r, *a, **k))
    widths = [] if compiled_vocoder else record_batches(t2w.vocoder, monkeypatch)
    together, got = streams(), [[], [], []]
    for i in range(60):
        for s, (_, codes, _) in zip(together, plan):
            s.add([codes[i]])
        for pieces, made in zip(got, synthesise(together)):
            pieces += made
    for s in together:
        s.end()
    for pieces, made in zip(got, synthesise(together)):
        pieces += made
    for want, pieces in zip(alone, got):
        assert max_abs_diff(np.concatenate(pieces), want) <= 1e-5
    assert 3 in rows and 2 in rows  # every answer's last window in one batch; the first two answers' earlier ones
    assert compiled_vocoder or any(shape[0] == 2 for shape in widths)  # equal spans of two answers in one batch
    assert all(s.drained for s in together)


def test_one_answer_with_too_little_noise_fails_alone(our_model):
    speaker = our_model.speakers["Ethan"]
    short = Token2WavStream(our_model.token2wav, speaker.cond, speaker.ref_mel, noise=np.zeros((1, 30, 80), np.float32))
    fine = Token2WavStream(our_model.token2wav, speaker.cond, speaker.ref_mel, seed=1)
    for s in (short, fine):
        s.add(CODES[0, :40])
    failed, made = synthesise([short, fine])
    assert isinstance(failed, ValueError) and "noise has 30 frames" in str(failed)
    assert len(made) == 1 and made[0].size > 0


def test_a_speakers_voice_is_computed_once(our_model):
    t2w, speaker = our_model.token2wav, our_model.speakers["Chelsie"]
    voice = t2w.speaker_voice(speaker.ref_mel)
    assert t2w.speaker_voice(speaker.ref_mel) is voice  # kept for the speaker's next answers
    fresh = t2w.speaker_voice(speaker.ref_mel.copy())  # another array: computed, and equal
    assert fresh is not voice and max_abs_diff(fresh.asnumpy(), voice.asnumpy()) == 0
    unguided = t2w.speaker_voice(speaker.ref_mel, guidance_scale=0)
    assert unguided.shape[0] == 1 and voice.shape[0] == 2


def test_a_speakers_voice_is_stored_once_per_machine(our_model, tmp_path, monkeypatch):
    """A new process (here: the kept voices forgotten) reads the voice instead of running ECAPA,
    bit for bit; another encoder weight is another voice, computed."""
    monkeypatch.setenv("MINDONE_EXT_GRAPH_CACHE", str(tmp_path))
    t2w, speaker = our_model.token2wav, our_model.speakers["Ethan"]
    embed = t2w.code2wav_dit_model.input_embed
    runs = []
    compute = embed.reference_voice
    monkeypatch.setattr(embed, "reference_voice", lambda *a, **k: runs.append(1) or compute(*a, **k))
    monkeypatch.setattr(t2w, "_voices", [])
    voice = t2w.speaker_voice(speaker.ref_mel)
    monkeypatch.setattr(t2w, "_voices", [])
    read = t2w.speaker_voice(speaker.ref_mel)
    assert len(runs) == 1 and read is not voice
    assert read.dtype == voice.dtype and max_abs_diff(read.asnumpy(), voice.asnumpy()) == 0
    weight = embed.spk_encoder.weights()[-1]
    kept = weight.asnumpy()
    try:
        weight.set_data(Tensor(kept + 1))
        monkeypatch.setattr(t2w, "_voices", [])
        other = t2w.speaker_voice(speaker.ref_mel)
    finally:
        weight.set_data(Tensor(kept))
    assert len(runs) == 2 and max_abs_diff(other.asnumpy(), voice.asnumpy()) > 0
