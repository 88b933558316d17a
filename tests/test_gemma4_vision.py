"""Gemma 4's vision (gemma4_vision.py): preprocessing against transformers' Gemma4ImageProcessorPil, and image
prompts through our Gemma4 against transformers' Gemma4ForConditionalGeneration on tiny random configs (fp32), an
E-style and a 31B-style text config; each feature of the tower shown to matter."""

import json

import pytest
import test_gemma4
import torch
from PIL import Image
from test_gemma4 import KINDS, TINY, randomize
from test_vision import odd_images, photos

from gemma3_int4 import gemma4_vision, loader
from gemma3_int4.config import SOFT_TOKEN_BUDGETS
from gemma3_int4.formats import hf as hf_format
from gemma3_int4.generation import Sampling, generate
from gemma3_int4.tokenizer import GEMMA4_IMAGE_IDS

gemma4_tokenizer = test_gemma4.gemma4_tokenizer_dir  # the fixture (pytest knows it by this name)
TOL = 1e-3
IMAGE, BOI, EOI = 500, 501, 502  # the tiny vocabulary's image soft token and its bounds
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
              head_dim=8, patch_size=16, pooling_kernel_size=3, position_embedding_size=64, use_clipped_linears=True,
              standardize=True)  # fmt: skip


def hf_processor(max_soft_tokens: int = 280):
    from transformers.models.gemma4.image_processing_pil_gemma4 import Gemma4ImageProcessorPil

    return Gemma4ImageProcessorPil(max_soft_tokens=max_soft_tokens)


def patches(pixels: torch.Tensor, patch: int = 16) -> torch.Tensor:
    """(3, H, W) -> (n, patch * patch * 3) in transformers' order (row-major patches, each row-major, RGB last)."""
    _, H, W = pixels.shape
    return pixels.view(3, H // patch, patch, W // patch, patch).permute(1, 3, 2, 4, 0).reshape(-1, 3 * patch**2)


def hf_inputs(images: list[Image.Image], max_soft_tokens: int = 70) -> dict:
    out = hf_processor(max_soft_tokens)(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_position_ids": out["image_position_ids"]}, out[
        "num_soft_tokens_per_image"
    ]


# ---------------------------------------------------------------------------------------------------
# Preprocessing


def check_preprocessing(image: Image.Image, max_soft_tokens: int) -> None:
    (inputs, counts) = hf_inputs([image], max_soft_tokens)
    ours = gemma4_vision.preprocess(image, max_soft_tokens)
    n = int(counts[0]) * 9
    assert gemma4_vision.soft_tokens(ours, gemma4_vision.Gemma4VisionConfig()) == int(counts[0])
    assert torch.equal(patches(ours), inputs["pixel_values"][0, :n])  # value for value
    assert (inputs["image_position_ids"][0, n:] == -1).all()


def test_preprocessing_matches_transformers_on_photos_at_every_budget():
    for name, image in photos().items():
        for budget in SOFT_TOKEN_BUDGETS if name == "cat" else (280,):
            check_preprocessing(image, budget)


def test_preprocessing_matches_transformers_on_odd_images(tmp_path):
    for name, path in odd_images(tmp_path).items():
        if name in ("sixteen_bit.png", "one_pixel.png", "very_large.jpg"):
            continue  # 16-bit: ours scales, transformers clips (test_vision); one pixel: below every budget's block
        check_preprocessing(gemma4_vision.load_image(path), 280)
    for size in [(37, 500), (500, 37), (2000, 20), (20, 2000), (48, 48), (49, 97), (1001, 333)]:
        check_preprocessing(photos()["cat"].resize(size), 140)


def test_resized_sizes():
    assert gemma4_vision.resized_size(480, 640) == (672, 912)  # 14 x 19 blocks: 266 soft tokens of 280
    h, w = gemma4_vision.resized_size(768, 768, 280)
    assert h == w and (h // 48) ** 2 <= 280
    assert gemma4_vision.resized_size(10, 4000, 70) == (48, 70 * 48)  # one block high, capped in length
    with pytest.raises(ValueError, match="max_soft_tokens must be one of"):
        gemma4_vision.resized_size(100, 100, 100)


# ---------------------------------------------------------------------------------------------------
# The tower and image prompts against transformers


def hf_gemma4_vision(kind: str, seed: int = 0, ids: tuple = (IMAGE, BOI, EOI), **text):
    """A random transformers Gemma4ForConditionalGeneration (float32, no audio): norms around 1, every weight,
    position table, clamp bound and standardisation vector random (the clamps bind on part of their inputs).
    ids: the image soft token and its bounds; text: the text config's changes to TINY."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration, Gemma4TextConfig, Gemma4VisionConfig

    torch.manual_seed(seed)
    published = {} if kind == "e-style" else {"use_bidirectional_attention": "vision"}  # as the 31B's config says
    text = Gemma4TextConfig(**{**TINY, **KINDS[kind], **published, **text})
    config = Gemma4Config(text_config=text, vision_config=Gemma4VisionConfig(**VISION), audio_config=None,
                          image_token_id=ids[0], boi_token_id=ids[1], eoi_token_id=ids[2])  # fmt: skip
    config._attn_implementation = "eager"
    for sub in (config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    return randomize(Gemma4ForConditionalGeneration(config).float().eval(), clamp=0.3)


def prompt(text: list[list[int]], counts: list[int]) -> list[int]:
    """Text pieces with an image between each two: <|image> + <|image|> x n + <image|>."""
    ids = list(text[0])
    for piece, n in zip(text[1:], counts, strict=True):
        ids += [BOI, *[IMAGE] * n, EOI, *piece]
    return ids


def hf_logits(hf, ids: list[int], images: list[Image.Image]) -> torch.Tensor:
    inputs, _ = hf_inputs(images)
    ids = torch.tensor([ids])
    with torch.no_grad():
        return hf(input_ids=ids, mm_token_type_ids=(ids == IMAGE).long(), **inputs).logits


def image_pair() -> list[Image.Image]:
    cat, coffee = photos()["cat"], photos()["coffee"]
    return [cat.resize((200, 150)), coffee.resize((90, 160))]  # 63 and 66 soft tokens at 70 (enlarged)


@pytest.fixture(scope="module", params=["e-style", "31b-style"])
def pair(request, tmp_path_factory):
    hf = hf_gemma4_vision(request.param)
    directory = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(directory)
    return hf, loader.from_pretrained(directory, dtype=torch.float32, weights="dense")


def our_pixels(images: list[Image.Image]) -> list[torch.Tensor]:
    return [gemma4_vision.preprocess(image, 70) for image in images]


def max_diff(ours, hf, ids: list[int], images: list[Image.Image]) -> float:
    with torch.no_grad():
        got = ours(torch.tensor([ids]), pixel_values=our_pixels(images))
    return (got - hf_logits(hf, ids, images)).abs().max().item()


def test_tower_and_embedder_match_transformers(pair):
    hf, ours = pair
    images = image_pair()
    inputs, counts = hf_inputs(images)
    with torch.no_grad():
        expected = hf.model.get_image_features(**inputs).pooler_output
        got = [ours.embed_vision(ours.vision(p)) for p in our_pixels(images)]
    assert [g.shape[0] for g in got] == [int(c) for c in counts] == [63, 66]
    for g, e in zip(got, expected, strict=True):
        assert (g - e).abs().max().item() <= TOL


def test_image_prompt_logits_match_transformers(pair):
    hf, ours = pair
    assert ours.config.vision_bidirectional == (hf.config.text_config.use_bidirectional_attention == "vision")
    ids = prompt([[2, 30, 31], [32, 33, 34], [35]], [63, 66])
    assert max_diff(ours, hf, ids, image_pair()) <= TOL


def test_greedy_tokens_match_transformers(pair):
    hf, ours = pair
    ids = prompt([[2, 30], [40, 41]], [63])
    images = image_pair()[:1]
    got = list(generate(ours, ids, 8, Sampling(temperature=0.0), pixel_values=our_pixels(images)))
    inputs, _ = hf_inputs(images)
    t = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids=t, mm_token_type_ids=(t == IMAGE).long(), **inputs, max_new_tokens=8,
                          do_sample=False)  # fmt: skip
    assert got == out[0, len(ids) :].tolist()


def test_each_feature_matters(pair, monkeypatch):
    """Switched off one at a time, each of the tower's features breaks the parity above."""
    hf, ours = pair
    ids, images = prompt([[2, 30], [40, 41]], [63]), image_pair()[:1]
    tower = ours.vision
    assert max_diff(ours, hf, ids, images) <= TOL
    table = tower.patch_embedder.position_embedding_table.data.clone()
    tower.patch_embedder.position_embedding_table.data.zero_()  # no position tables
    assert max_diff(ours, hf, ids, images) > 1e-2
    tower.patch_embedder.position_embedding_table.data.copy_(table)
    with monkeypatch.context() as m:
        m.setattr(gemma4_vision, "rotate_2d", lambda x, *rope: x)  # no axial RoPE
        assert max_diff(ours, hf, ids, images) > 1e-2
    with monkeypatch.context() as m:
        m.setattr(gemma4_vision, "rotate_2d", lambda x, cx, sx, cy, sy: gemma4_vision.apply_rope(x, *rope_1d(cx, sx)))
        assert max_diff(ours, hf, ids, images) > 1e-2  # 1D RoPE by x over the whole head: not axial
    clippable = [m for m in tower.modules() if isinstance(m, gemma4_vision.ClippableLinear)]
    for linear in clippable:
        linear.clipped = False  # the clamps off
    assert max_diff(ours, hf, ids, images) > 1e-2
    for linear in clippable:
        linear.clipped = True
    object.__setattr__(tower.config, "standardize", False)
    assert max_diff(ours, hf, ids, images) > 1e-2
    object.__setattr__(tower.config, "standardize", True)
    object.__setattr__(tower.config, "pooling_kernel_size", 1)  # no pooling: 9x the tokens, which the prompt lacks
    with pytest.raises(ValueError, match="image soft tokens"):
        max_diff(ours, hf, ids, images)
    object.__setattr__(tower.config, "pooling_kernel_size", 3)
    assert max_diff(ours, hf, ids, images) <= TOL


def rope_1d(cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Half a head's cos/sin doubled to a whole head's (the x frequencies over every dimension)."""
    return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)


def test_bidirectional_image_mask_matters(tmp_path):
    """31B-style: tokens of one image see each other both ways on the sliding layers (and only there): causal
    image tokens no longer match; nor does the bidirectional mask on an E-style model, which reads causally."""
    hf = hf_gemma4_vision("31b-style")
    hf.save_pretrained(tmp_path)
    ours = loader.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")
    ids, images = prompt([[2, 30], [40, 41]], [63]), image_pair()[:1]
    assert ours.config.vision_bidirectional and max_diff(ours, hf, ids, images) <= TOL
    ours.config.vision_bidirectional = False
    assert max_diff(ours, hf, ids, images) > 1e-2
    e_hf = hf_gemma4_vision("e-style", seed=1)
    e_hf.save_pretrained(tmp_path / "e")
    e_ours = loader.from_pretrained(tmp_path / "e", dtype=torch.float32, weights="dense")
    assert not e_ours.config.vision_bidirectional and max_diff(e_ours, e_hf, ids, images) <= TOL
    e_ours.config.vision_bidirectional = True
    assert max_diff(e_ours, e_hf, ids, images) > 1e-2


def test_cached_chunked_prefill_keeps_images_whole(pair):
    """Prefill in chunks smaller than an image (never split, generation.prefill), then decode: transformers'
    greedy tokens."""
    from gemma3_int4.generation import prefill

    hf, ours = pair
    ids = prompt([[2, 30, 31], [32], [33, 34]], [63, 66])
    expected = hf_logits(hf, ids, image_pair())[0, -1]
    ours.setup_cache(1, 256)
    with torch.no_grad():
        got = prefill(ours, torch.tensor([ids]), chunk=5, pixel_values=our_pixels(image_pair()))[0]
    assert (got - expected).abs().max().item() <= TOL


def test_images_and_soft_tokens_must_agree(pair):
    _, ours = pair
    ids = prompt([[2, 30], [40]], [62])
    with pytest.raises(ValueError, match="the prompt has 62 image soft tokens, but its 1 image"):
        ours(torch.tensor([ids]), pixel_values=our_pixels(image_pair()[:1]))


def test_int4_layout_round_trip_keeps_the_tower_float(pair, tmp_path):
    """Our int4 layout holds the tower bf16 beside the int4 language model; it loads back to the same tower."""
    hf, ours = pair
    config, tensors, above = loader.load_checkpoint(tmp_path_of(hf, tmp_path))
    tensors = loader.convert_weights(tensors, "int4", above)
    assert all(t.is_floating_point() for k, t in tensors.items() if k.startswith(("vision.", "embed_vision.")))
    hf_format.write(config, tensors, b"", tmp_path / "int4")
    hf_config = json.loads((tmp_path / "int4" / "config.json").read_text())
    assert hf_config["model_type"] == "gemma4" and hf_config["vision_config"]["standardize"]
    back = loader.from_pretrained(tmp_path / "int4", dtype=torch.float32)
    for part in ("vision", "embed_vision"):  # float, as stored (bf16 or float32): every tensor, clamps and std too
        theirs = getattr(back, part).state_dict()
        for name, t in getattr(ours, part).state_dict().items():
            assert torch.equal(theirs[name], t) or torch.equal(theirs[name], t.bfloat16().float()), name


def tmp_path_of(hf, tmp_path):
    hf.save_pretrained(tmp_path / "dense")
    return tmp_path / "dense"


def test_text_only_model_refuses_images(tmp_path):
    from test_gemma4 import hf_gemma4

    hf_gemma4("e-style").save_pretrained(tmp_path)
    ours = loader.from_pretrained(tmp_path, dtype=torch.float32, weights="dense")
    with pytest.raises(ValueError, match="no vision tower"):
        ours(torch.tensor([[2, IMAGE]]), pixel_values=[torch.zeros(3, 48, 48)])


def test_generate_with_an_image(tmp_path, gemma4_tokenizer):
    """generate.py --image on a Gemma 4 checkpoint with its vision tower (at Gemma 4's image token ids, so the
    vocabulary is the published one): transformers' greedy tokens for the prompt it builds, at the image's mark."""
    import shutil

    from conftest import run_main

    import generate as generate_script
    from gemma3_int4.tokenizer import IMAGE_MARK, Tokenizer

    image_ids = tuple(GEMMA4_IMAGE_IDS[i] for i in (1, 0, 2))  # soft, opening, closing
    hf = hf_gemma4_vision("31b-style", ids=image_ids, vocab_size=262144, max_position_embeddings=1024)
    directory = tmp_path / "gemma-4-tiny"
    hf.save_pretrained(directory)
    for f in gemma4_tokenizer.iterdir():
        shutil.copy(f, directory / f.name)
    cat = photos()["cat"].resize((200, 150))
    cat.save(tmp_path / "cat.png")
    text = f"Look: {IMAGE_MARK} What is it?"
    out = run_main(generate_script, "--model", directory, "--image", tmp_path / "cat.png", "--prompt", text, "--raw",
                   "--temperature", "0", "--max-new-tokens", "4", "--dtype", "float32", "--weights", "dense",
                   "--stats-json")  # fmt: skip
    assert out.returncode == 0, out.stderr
    tokenizer = Tokenizer.from_pretrained(directory)
    n = gemma4_vision.soft_tokens(gemma4_vision.preprocess(cat), gemma4_vision.Gemma4VisionConfig())
    ids = tokenizer.encode(text, True, 1, [n])
    assert ids.count(GEMMA4_IMAGE_IDS[1]) == n and ids[ids.index(GEMMA4_IMAGE_IDS[0]) + n + 1] == GEMMA4_IMAGE_IDS[2]
    assert json.loads(out.stderr.strip().splitlines()[-1])["prompt_tokens"] == len(ids)
    inputs = hf_processor(280)(images=[cat], return_tensors="pt")
    t = torch.tensor([ids])
    with torch.no_grad():
        expected = hf.generate(input_ids=t, mm_token_type_ids=(t == GEMMA4_IMAGE_IDS[1]).long(),
                               pixel_values=inputs["pixel_values"], image_position_ids=inputs["image_position_ids"],
                               max_new_tokens=4, do_sample=False)  # fmt: skip
    assert out.stdout.strip() == tokenizer.decode(expected[0, len(ids) :].tolist()).strip()


def test_dense_export_is_transformers_layout(tmp_path):
    """convert.py's dense output of a Gemma 4 with its vision tower is transformers' multimodal layout: it loads
    into Gemma4ForConditionalGeneration with nothing missing, every tensor the source's (bf16)."""
    from transformers import Gemma4ForConditionalGeneration

    hf = hf_gemma4_vision("e-style")
    hf.save_pretrained(tmp_path / "src")
    config, tensors, above = loader.load_checkpoint(tmp_path / "src")
    hf_format.write(config, loader.convert_weights(tensors, "dense", above), b"", tmp_path / "dense", layout="dense")
    back, info = Gemma4ForConditionalGeneration.from_pretrained(tmp_path / "dense", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    theirs = dict(back.float().state_dict())
    for name, t in hf.state_dict().items():
        assert torch.equal(theirs[name], t.bfloat16().float()), name
