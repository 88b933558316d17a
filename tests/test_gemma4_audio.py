"""Gemma 4's audio (gemma4_audio.py): WAV reading, log-mel features against transformers'
Gemma4AudioFeatureExtractor, and audio prompts through our Gemma4 against transformers'
Gemma4ForConditionalGeneration on a tiny random config (fp32); the local window and the logit cap shown to matter."""

import io
import json
import struct
import wave

import numpy as np
import pytest
import test_gemma4
import torch
from test_gemma4 import KINDS, TINY, randomize

from gemma3_int4 import gemma4_audio, loader
from gemma3_int4.generation import Sampling, generate

gemma4_tokenizer = test_gemma4.gemma4_tokenizer_dir  # the fixture (pytest knows it by this name)
TOL = 1e-3
AUDIO, BOA, EOA = 503, 504, 505  # the tiny vocabulary's audio soft token and its bounds
AUDIO_CONFIG = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    subsampling_conv_channels=[128, 8],
    output_proj_dims=24,
    attention_logit_cap=0.5,
)  # fmt: skip  (a cap the random logits reach)


def hf_features(samples: np.ndarray) -> np.ndarray:
    """transformers' extractor, its valid frames only."""
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    out = Gemma4AudioFeatureExtractor()([samples], return_tensors="np")
    return out["input_features"][0][out["input_features_mask"][0]]


def speech_like(seconds: float, seed: int = 0) -> np.ndarray:
    """Noise shaped by a few tones, in [-1, 1] at 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * 16_000)) / 16_000
    tones = sum(np.sin(2 * np.pi * f * t) / (i + 2) for i, f in enumerate((220, 440, 1250, 3100)))
    return (0.3 * tones + 0.05 * rng.standard_normal(t.shape)).astype(np.float32)


# ---------------------------------------------------------------------------------------------------
# Features and WAV files


@pytest.mark.parametrize(
    "name, samples",
    [
        ("speech", speech_like(2.3)),
        ("silence", np.zeros(16_000, np.float32)),
        ("clipping", np.clip(speech_like(1.0) * 20, -1, 1)),
        ("very short", speech_like(0.03)),  # 480 samples: 2 frames
        ("long", speech_like(31.5)),  # past 30 s: the first 30 s, as transformers keeps
    ],
)
def test_log_mel_matches_transformers(name, samples):
    ours, expected = gemma4_audio.log_mel(samples).numpy(), hf_features(samples)
    assert ours.shape == expected.shape and ours.shape[0] > 0
    assert np.abs(ours - expected).max() <= 1e-4, name


def test_too_short_for_a_frame():
    assert gemma4_audio.log_mel(np.zeros(100, np.float32)).shape == (0, 128)


def wav_bytes(samples: np.ndarray, rate: int, channels: int = 1, kind: str = "int16") -> bytes:
    """A WAV file: int16 through the stdlib's wave, float32 and 24-bit written by hand."""
    frames = np.repeat(samples[:, None], channels, axis=1)
    if kind == "int16":
        buf = io.BytesIO()
        with wave.open(buf, "wb") as w:
            w.setnchannels(channels), w.setsampwidth(2), w.setframerate(rate)
            w.writeframes((frames * 32767).round().astype("<i2").tobytes())
        return buf.getvalue()
    if kind == "float32":
        tag, bits, body = 3, 32, frames.astype("<f4").tobytes()
    else:  # 24-bit PCM
        ints = (frames * (2**23 - 1)).round().astype("<i4").reshape(-1)
        tag, bits, body = 1, 24, b"".join(struct.pack("<i", int(v))[:3] for v in ints)
    fmt = struct.pack("<HHIIHH", tag, channels, rate, rate * channels * bits // 8, channels * bits // 8, bits)
    chunks = b"fmt " + struct.pack("<I", len(fmt)) + fmt + b"data" + struct.pack("<I", len(body)) + body
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


@pytest.mark.parametrize("kind", ["int16", "float32", "int24"])
def test_wav_files_of_each_kind_read_back(tmp_path, kind):
    samples = speech_like(0.5) * 0.9
    (tmp_path / "a.wav").write_bytes(wav_bytes(samples, 16_000, channels=2, kind=kind))
    got = gemma4_audio.load_audio(tmp_path / "a.wav")  # stereo: the channels' mean
    assert got.dtype == np.float32 and got.shape == samples.shape
    assert np.abs(got - samples).max() <= (1e-4 if kind == "int16" else 1e-6)


def test_resampling_to_16_khz(tmp_path):
    t = np.arange(44_100) / 44_100
    (tmp_path / "tone.wav").write_bytes(wav_bytes(np.sin(2 * np.pi * 1000 * t).astype(np.float32), 44_100))
    got = gemma4_audio.load_audio(tmp_path / "tone.wav")
    expected = np.sin(2 * np.pi * 1000 * np.arange(16_000) / 16_000)
    assert got.shape == (16_000,) and np.abs(got - expected)[100:-100].max() < 1e-3


def test_bad_audio_files_fail_in_one_line(tmp_path):
    with pytest.raises(FileNotFoundError, match="audio not found: .*missing.wav"):
        gemma4_audio.load_audio(tmp_path / "missing.wav")
    (tmp_path / "song.mp3").write_bytes(b"ID3\x03\x00" + bytes(100))
    with pytest.raises(ValueError, match="song.mp3: not a WAV file \\(audio must be WAV"):
        gemma4_audio.load_audio(tmp_path / "song.mp3")
    (tmp_path / "cut.wav").write_bytes(wav_bytes(speech_like(0.1), 16_000)[:30])
    with pytest.raises(ValueError, match="cut.wav: a WAV file without its fmt or data chunk"):
        gemma4_audio.load_audio(tmp_path / "cut.wav")


# ---------------------------------------------------------------------------------------------------
# The tower and audio prompts against transformers


def hf_gemma4_audio(seed: int = 0, kind: str = "e-style", ids: tuple = (AUDIO, BOA, EOA), **text):
    """A random transformers Gemma4ForConditionalGeneration with an audio tower only (float32): norms around 1,
    weights, per-dim scales random, the clamps binding on part of their inputs. ids: the audio soft token and its
    bounds; text: the text config's changes to TINY."""
    from transformers import Gemma4AudioConfig, Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig

    torch.manual_seed(seed)
    config = Gemma4Config(text_config=Gemma4TextConfig(**{**TINY, **KINDS[kind], **text}), vision_config=None,
                          audio_config=Gemma4AudioConfig(**AUDIO_CONFIG), audio_token_id=ids[0], boa_token_id=ids[1],
                          eoa_token_index=ids[2])  # fmt: skip
    for sub in (config, config.text_config, config.audio_config):
        sub._attn_implementation = "eager"
    return randomize(Gemma4ForConditionalGeneration(config).float().eval(), clamp=0.5)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    hf = hf_gemma4_audio()
    directory = tmp_path_factory.mktemp("audio")
    hf.save_pretrained(directory)
    return hf, loader.from_pretrained(directory, dtype=torch.float32, weights="dense")


def hf_audio_inputs(samples: np.ndarray) -> dict:
    from transformers.models.gemma4.feature_extraction_gemma4 import Gemma4AudioFeatureExtractor

    out = Gemma4AudioFeatureExtractor()([samples], return_tensors="pt")
    return {"input_features": out["input_features"], "input_features_mask": out["input_features_mask"]}


def prompt(n: int) -> list[int]:
    return [2, 30, BOA, *[AUDIO] * n, EOA, 31, 32]


def max_diff(ours, hf, samples: np.ndarray) -> float:
    features = gemma4_audio.log_mel(samples)
    ids = prompt(gemma4_audio.soft_tokens(features.shape[0]))
    with torch.no_grad():
        got = ours(torch.tensor([ids]), pixel_values=[features])
        expected = hf(input_ids=torch.tensor([ids]), **hf_audio_inputs(samples)).logits
    return (got - expected).abs().max().item()


def test_tower_matches_transformers(pair):
    hf, ours = pair
    samples = speech_like(1.7)
    inputs = hf_audio_inputs(samples)
    with torch.no_grad():
        out = hf.model.get_audio_features(**inputs)
        expected = out.pooler_output[out.attention_mask]
        got = ours.embed_audio(ours.audio(gemma4_audio.log_mel(samples)))
    assert got.shape == expected.shape and got.shape[0] == gemma4_audio.soft_tokens(170)  # 43: one per 40 ms
    assert (got - expected).abs().max().item() <= TOL


def test_audio_prompt_logits_and_greedy_tokens_match_transformers(pair):
    hf, ours = pair
    samples = speech_like(1.1, seed=1)
    assert max_diff(ours, hf, samples) <= TOL
    features = gemma4_audio.log_mel(samples)
    ids = prompt(gemma4_audio.soft_tokens(features.shape[0]))
    got = list(generate(ours, ids, 6, Sampling(temperature=0.0), pixel_values=[features]))
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor([ids]), **hf_audio_inputs(samples), max_new_tokens=6, do_sample=False)
    assert got == out[0, len(ids) :].tolist()


def test_window_and_logit_cap_matter(pair):
    """transformers' chunked attention is each frame's window of 12 here: a wider window, no logit cap, no
    relative positions or no clamps each break the parity."""
    hf, ours = pair
    samples = speech_like(1.1, seed=2)
    attn = [layer.self_attn for layer in ours.audio.layers]
    assert max_diff(ours, hf, samples) <= TOL
    for a in attn:
        a.window, a.offset = 20, a.offset - 8  # the same relative positions, 8 more frames back
    assert max_diff(ours, hf, samples) > 1e-2
    for a in attn:
        a.window, a.offset = 12, a.offset + 8
        a.cap = 1e6
    assert max_diff(ours, hf, samples) > 1e-2
    for a in attn:
        a.cap = ours.config.audio_config.attention_logit_cap
        a.offset = 1  # relative positions one step off
    assert max_diff(ours, hf, samples) > 1e-2
    for a in attn:
        a.offset = 0
    clippable = [m for m in ours.audio.modules() if hasattr(m, "clipped")]
    for m in clippable:
        m.clipped = False
    assert max_diff(ours, hf, samples) > 1e-2
    for m in clippable:
        m.clipped = True
    assert max_diff(ours, hf, samples) <= TOL


def test_audio_and_soft_tokens_must_agree(pair):
    _, ours = pair
    features = gemma4_audio.log_mel(speech_like(0.5))
    with pytest.raises(ValueError, match="the prompt has 3 audio soft tokens, but its 1 audio"):
        ours(torch.tensor([prompt(3)]), pixel_values=[features])


def test_model_without_audio_tower_refuses_audio(tmp_path):
    from test_gemma4 import hf_gemma4

    hf_gemma4("e-style").save_pretrained(tmp_path)
    ours = loader.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")
    with pytest.raises(ValueError, match="no audio tower"):
        ours(torch.tensor([[2, AUDIO]]), pixel_values=[torch.zeros(4, 128)])


def test_generate_with_audio(tmp_path, gemma4_tokenizer):
    """generate.py --audio on a checkpoint with an audio tower (at Gemma 4's audio token ids, so with the published
    vocabulary and a text config without per-layer embeddings): transformers' greedy tokens for its prompt."""
    import shutil

    from conftest import run_main

    import generate as generate_script
    from gemma3_int4.tokenizer import AUDIO_MARK, GEMMA4_AUDIO_IDS, Tokenizer

    audio_ids = tuple(GEMMA4_AUDIO_IDS[i] for i in (1, 0, 2))  # soft, opening, closing
    hf = hf_gemma4_audio(kind="31b-style", ids=audio_ids, vocab_size=262144)
    directory = tmp_path / "gemma-4-tiny"
    hf.save_pretrained(directory)
    for f in gemma4_tokenizer.iterdir():
        shutil.copy(f, directory / f.name)
    samples = speech_like(0.9, seed=3)
    (tmp_path / "a.wav").write_bytes(wav_bytes(samples, 16_000, kind="float32"))
    text = f"Listen: {AUDIO_MARK} What is it?"
    out = run_main(generate_script, "--model", directory, "--audio", tmp_path / "a.wav", "--prompt", text, "--raw",
                   "--temperature", "0", "--max-new-tokens", "4", "--dtype", "float32", "--weights", "dense",
                   "--stats-json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    tokenizer = Tokenizer.from_pretrained(directory)
    n = gemma4_audio.soft_tokens(gemma4_audio.log_mel(samples).shape[0])
    ids = tokenizer.encode(text, True, audio_tokens=[n])
    assert ids.count(GEMMA4_AUDIO_IDS[1]) == n and ids[ids.index(GEMMA4_AUDIO_IDS[0]) + n + 1] == GEMMA4_AUDIO_IDS[2]
    assert json.loads(out.stderr.strip().splitlines()[-1])["prompt_tokens"] == len(ids)
    with torch.no_grad():
        expected = hf.generate(input_ids=torch.tensor([ids]), **hf_audio_inputs(samples), max_new_tokens=4,
                               do_sample=False)  # fmt: skip
    assert out.stdout.strip() == tokenizer.decode(expected[0, len(ids) :].tolist()).strip()
    # errors, in one line: a container other than WAV, a model without an audio tower
    (tmp_path / "a.mp3").write_bytes(b"ID3" + bytes(64))
    out = run_main(generate_script, "--model", directory, "--audio", tmp_path / "a.mp3", "--prompt", "x")
    assert out.returncode == 1 and "not a WAV file" in out.stderr and len(out.stderr.strip().splitlines()) == 1


def gemma4_with_media(directory, tokenizer_dir) -> None:
    """Save in `directory` a random Gemma 4 (float32, 31B-style text, the published vocabulary, so at Gemma 4's
    media token ids) with a vision and an audio tower, and the tokenizer of tokenizer_dir."""
    import shutil

    from test_gemma4_vision import VISION
    from transformers import (
        Gemma4AudioConfig,
        Gemma4Config,
        Gemma4ForConditionalGeneration,
        Gemma4TextConfig,
        Gemma4VisionConfig,
    )

    torch.manual_seed(0)
    text = Gemma4TextConfig(**{**TINY, **KINDS["31b-style"], "vocab_size": 262144, "max_position_embeddings": 1024})
    config = Gemma4Config(text_config=text, vision_config=Gemma4VisionConfig(**VISION),
                          audio_config=Gemma4AudioConfig(**AUDIO_CONFIG))  # fmt: skip
    randomize(Gemma4ForConditionalGeneration(config).float().eval(), clamp=0.5).save_pretrained(directory)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, directory / f.name)


def noise_image():
    """A 150x100 image of noise (260 soft tokens at the default budget)."""
    from PIL import Image

    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (100, 150, 3), dtype=np.uint8))


def test_batched_rows_with_and_without_media_decode_as_each_alone(tmp_path, gemma4_tokenizer):
    """Continuous batching on Gemma 4: a row with an image, one with a recording and one of text only share a
    Batch of two rows (the third joining as the first finishes, while the second decodes); each gets the tokens it
    gets alone. Media or masks leaking between rows would change them."""
    from gemma3_int4.generation import Request, audio_inputs, generate_batch, image_inputs
    from gemma3_int4.tokenizer import Tokenizer

    directory = tmp_path / "gemma-4-tiny-it"
    gemma4_with_media(directory, gemma4_tokenizer)
    ours = loader.from_pretrained(directory, dtype=torch.float32, weights="dense")
    tokenizer = Tokenizer.from_pretrained(directory)
    pixels, image_counts = image_inputs(ours, [noise_image()])
    features, audio_counts = audio_inputs([speech_like(0.6)])
    greedy = Sampling(temperature=0.0)
    asks = [  # (message, media, new tokens)
        ({"role": "user", "content": "What is this?", "images": 1}, pixels, 3),
        ({"role": "user", "content": "What do you hear?", "audio": audio_counts}, features, 9),
        ({"role": "user", "content": "Say something."}, None, 5),
    ]
    requests = [Request(tokenizer.chat_prompt([message], tokens_per_image=image_counts), n, greedy,
                        pixel_values=media) for message, media, n in asks]  # fmt: skip
    done = list(generate_batch(ours, requests, rows=2, context=512))
    assert [r.prompt for r in done] == [requests[0].prompt, requests[2].prompt, requests[1].prompt]
    for request in requests:
        alone = generate(ours, request.prompt, request.max_new_tokens, greedy, pixel_values=request.pixel_values)
        assert request.tokens == list(alone)


def test_chat_with_an_image_and_audio(tmp_path, gemma4_tokenizer):
    """chat.py's /image and /audio on a Gemma 4 with both towers: each reply is generate()'s for the whole
    transcript's chat prompt with every image and recording (themselves checked against transformers above),
    the second turn reading the first's media from the cache; the script runs the same commands."""
    from conftest import run_main

    import chat
    from gemma3_int4.generation import audio_inputs, image_inputs
    from gemma3_int4.tokenizer import GEMMA4_AUDIO_IDS, Tokenizer

    directory = tmp_path / "gemma-4-tiny-it"
    gemma4_with_media(directory, gemma4_tokenizer)
    image = noise_image()
    image.save(tmp_path / "a.png")
    (tmp_path / "a.wav").write_bytes(wav_bytes(speech_like(0.6), 16_000))

    ours = loader.from_pretrained(directory, dtype=torch.float32, weights="dense")
    tokenizer = Tokenizer.from_pretrained(directory)
    conversation = chat.Conversation(ours, tokenizer, Sampling(temperature=0.0), 1024, max_new_tokens=3)
    conversation.attach(tmp_path / "a.png")
    conversation.attach(tmp_path / "a.wav", "audio")
    media = [p for _, _, p, _ in conversation.attached]
    "".join(conversation.ask("What is this?"))
    transcript = conversation.ids
    "".join(conversation.ask("And then?"))  # the image and the recording are in the cache by now
    pixels, image_counts = image_inputs(ours, [image])
    features, audio_counts = audio_inputs([gemma4_audio.load_audio(tmp_path / "a.wav")])
    assert torch.equal(media[0], pixels[0]) and torch.equal(media[1], features[0])
    message = {"role": "user", "content": "What is this?", "images": 1, "audio": audio_counts}
    first = tokenizer.chat_prompt([message], tokens_per_image=image_counts)
    assert first.count(GEMMA4_AUDIO_IDS[1]) == audio_counts[0] > 0
    second = transcript + tokenizer.turn("user", "And then?") + tokenizer.model_turn()
    for prompt in (first, second):  # each reply: what generate() says to the whole transcript, media and all
        expected = list(generate(ours, prompt, 3, Sampling(temperature=0.0), tokenizer.stop_ids,
                                 pixel_values=pixels + features))  # fmt: skip
        said = [t for t in expected if t not in tokenizer.stop_ids]
        assert conversation.ids[: len(prompt)] == prompt and conversation.ids[len(prompt) :][: len(said)] == said
    stdin = f"/image {tmp_path / 'a.png'}\n/audio {tmp_path / 'a.wav'}\nWhat is this?\nAnd then?\n"
    out = run_main(chat, "--model", directory, "--temperature", "0", "--max-new-tokens", "3", "--dtype", "float32",
                   "--weights", "dense", stdin=stdin)  # fmt: skip
    assert out.returncode == 0 and "audio a.wav attached" not in out.stdout, out.stderr
