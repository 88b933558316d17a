"""The vision half against transformers: SigLIP tower + projector, image prompts (mask, soft tokens), loading
gaunernst's multimodal int4 layout, and preprocessing against Gemma3ImageProcessor on real and odd images."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import hf_multimodal_model, int4_checkpoint, run_main
from PIL import Image

import generate as generate_script
from gemma3_int4 import cpu_kernels, loader, vision
from gemma3_int4.attention import attention_mask, image_index, same_image_mask
from gemma3_int4.config import IMAGE_TOKEN_ID, TEXT_VOCAB_SIZE, VISION_MODULES
from gemma3_int4.generation import prefill
from gemma3_int4.tokenizer import IMAGE_MARK, Tokenizer, place_images

ROOT = Path(__file__).resolve().parents[1]
SOI, EOI = 255999, 256000  # <start_of_image>, <end_of_image> (inside the tiny multimodal vocabulary of 262208)


def image_prompt(text_ids: list[list[int]], tokens_per_image: int) -> list[int]:
    """text, image, text, image, ..., text: as the processor lays it out (the text ids are random stand-ins)."""
    ids = []
    for i, piece in enumerate(text_ids):
        ids += piece
        if i < len(text_ids) - 1:
            ids += [SOI] + [IMAGE_TOKEN_ID] * tokens_per_image + [EOI]
    return ids


def hf_logits(hf, ids: list[int], pixel_values: torch.Tensor) -> torch.Tensor:
    input_ids = torch.tensor([ids])
    token_type_ids = (input_ids == IMAGE_TOKEN_ID).long()  # the processor's: 1 at image soft tokens
    with torch.no_grad():
        logits = hf(input_ids=input_ids, pixel_values=pixel_values, token_type_ids=token_type_ids).logits
    return logits[..., :TEXT_VOCAB_SIZE]  # we mask the padding rows of the vocabulary to -inf; transformers does not


def max_diff(ours: torch.Tensor, expected: torch.Tensor) -> float:
    return (ours[..., :TEXT_VOCAB_SIZE] - expected).abs().max().item()


@pytest.fixture(scope="module")
def multimodal(tmp_path_factory):
    """(HF reference, our model) on the same tiny multimodal network: int4 language model in gaunernst's
    sharded layout (dequantized on the HF side), bf16 vision tower; 4 soft tokens per image."""
    hf = hf_multimodal_model(tokens_per_image=4)
    directory = tmp_path_factory.mktemp("mm") / "gemma-3-tiny-mm-it-int4"
    int4_checkpoint(hf, directory, max_shard_bytes=2_000_000)
    return hf, loader.from_pretrained(directory, dtype=torch.float32), directory


def random_pixels(n: int, size: int = 28, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_checkpoint_layout_is_gaunernsts(multimodal):
    _, _, directory = multimodal
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    assert len(set(index.values())) > 1  # sharded
    assert "language_model.model.layers.0.self_attn.q_proj.weight.int4_data" in index
    assert "vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight" in index
    assert "vision_tower.vision_model.embeddings.patch_embedding.weight" in index
    assert "multi_modal_projector.mm_input_projection_weight" in index


def test_vision_tower_and_projector_match_transformers(multimodal):
    hf, ours, _ = multimodal
    px = random_pixels(2)
    with torch.no_grad():
        expected = hf.get_image_features(pixel_values=px)
        expected = expected.pooler_output if hasattr(expected, "pooler_output") else expected
        got = ours.projector(ours.vision(px))
    assert got.shape == (2, 4, 64)
    assert (got - torch.as_tensor(expected).reshape(got.shape)).abs().max().item() < 1e-4


@pytest.mark.parametrize("layout", ["one image", "two images", "image past the window"])
def test_image_prompt_logits_match_transformers(multimodal, layout):
    hf, ours, _ = multimodal
    g = torch.Generator().manual_seed(1)
    words = lambda n: torch.randint(0, 500, (n,), generator=g).tolist()
    pieces = {"one image": [[2, *words(3)], words(6)], "two images": [[2, *words(2)], words(5), words(4)],
              "image past the window": [[2, *words(12)], words(9), words(3)]}[layout]  # fmt: skip
    ids = image_prompt(pieces, 4)
    px = random_pixels(len(pieces) - 1, seed=2)
    expected = hf_logits(hf, ids, px)
    with torch.no_grad():
        got = ours(torch.tensor([ids]), pixel_values=px)
    assert max_diff(got, expected) < 1e-3


@pytest.mark.parametrize("native_bf16", [True, False])
def test_the_tower_computes_in_float32_where_bf16_matmuls_are_slow(multimodal, native_bf16, monkeypatch):
    """A bf16 model on a CPU without native bf16 matmuls (AVX2): its vision tower and projector in float32, the
    language model in bf16; its image prompt's logits then match transformers' float32 as closely as bf16 allows."""
    hf, _, directory = multimodal
    monkeypatch.setattr(cpu_kernels, "CPU_HAS_BF16", native_bf16)
    ours = loader.from_pretrained(directory, dtype=torch.bfloat16)
    tower = torch.bfloat16 if native_bf16 else torch.float32
    assert {p.dtype for m in (ours.vision, ours.projector) for p in m.parameters()} == {tower}
    assert ours.norm.weight.dtype == torch.bfloat16
    g = torch.Generator().manual_seed(1)
    ids = image_prompt([[2, *torch.randint(0, 500, (3,), generator=g).tolist()], [5, 6, 7]], 4)
    px = random_pixels(1, seed=2)
    with torch.no_grad():
        got = ours(torch.tensor([ids]), pixel_values=px)
    assert max_diff(got.float(), hf_logits(hf, ids, px)) < 0.2


def test_image_longer_than_the_sliding_window(tmp_path):
    """16 soft tokens and a window of 8: an image's tokens still see each other both ways, across the window."""
    hf = hf_multimodal_model(tokens_per_image=16, seed=3)
    int4_checkpoint(hf, tmp_path / "ckpt")
    ours = loader.from_pretrained(tmp_path / "ckpt", dtype=torch.float32)
    ids = image_prompt([[2, 7, 8, 9, 10, 11], [12, 13, 14], [15, 16]], 16)
    px = random_pixels(2, seed=4)
    expected = hf_logits(hf, ids, px)
    with torch.no_grad():
        got = ours(torch.tensor([ids]), pixel_values=px)
        # chunked prefill through the cache: chunks of 5 would cut the images, so they stretch to keep them whole
        ours.setup_cache(1, 64)
        last = prefill(ours, torch.tensor([ids]), chunk=5, pixel_values=px)
    assert max_diff(got, expected) < 1e-3
    assert max_diff(last, expected[:, -1]) < 1e-3


def test_cached_prefill_then_greedy_decoding_match_transformers(multimodal):
    hf, ours, _ = multimodal
    ids = image_prompt([[2, 40, 41], [42, 43, 44], [45]], 4)
    px = random_pixels(2, seed=5)
    from gemma3_int4.generation import Sampling, generate

    ours.setup_cache(1, 64)
    got = list(generate(ours, ids, 8, Sampling(temperature=0), pixel_values=px))
    input_ids = torch.tensor([ids])
    with torch.no_grad():
        out = hf.generate(input_ids=input_ids, pixel_values=px, token_type_ids=(input_ids == IMAGE_TOKEN_ID).long(),
                          max_new_tokens=8, do_sample=False, eos_token_id=None)  # fmt: skip
    assert got == out[0, len(ids) :].tolist()


def test_image_mask_one_and_two_images():
    """Causal everywhere, except that tokens of one image see each other both ways; a window limits how far
    back any token looks, but not how far ahead an image token sees into its own image (as transformers)."""
    is_image = torch.tensor([[0, 1, 1, 1, 0, 0, 1, 1, 0]], dtype=torch.bool)
    images = image_index(is_image)
    assert images.tolist() == [[-1, 0, 0, 0, -1, -1, 1, 1, -1]]
    pos = torch.arange(9)[None]  # (B, T)
    full = attention_mask(pos, pos, same_image=same_image_mask(images, images))[0, 0]
    assert full[1, 3] and full[3, 1] and full[6, 7] and full[7, 6]  # within an image: both ways
    assert not full[3, 6] and full[6, 3]  # images: causal between them
    assert not full[0, 1] and full[4, 1] and not full[4, 5]  # text: causal
    windowed = attention_mask(pos, pos, 2, same_image_mask(images, images))[0, 0]
    assert windowed[1, 3] and not windowed[3, 1]  # ahead in its image: yes; 2 back: outside the window
    assert windowed[4, 3] and not windowed[4, 2]


def test_image_tokens_and_images_must_agree(multimodal):
    _, ours, _ = multimodal
    ids = torch.tensor([image_prompt([[2, 5], [6]], 4)])
    with pytest.raises(ValueError, match="4 image soft tokens, but 2 image"):
        ours(ids, pixel_values=random_pixels(2))
    with pytest.raises(ValueError, match=r"shape \(num_images, 3, 28, 28\)"):
        ours(ids, pixel_values=random_pixels(1, size=32))


def test_text_only_model_refuses_images(tiny_int4_dir):
    model = loader.from_pretrained(tiny_int4_dir, dtype=torch.float32)
    with pytest.raises(ValueError, match="no vision tower"):
        model(torch.tensor([[2, 5]]), pixel_values=random_pixels(1))


def test_prompt_assembly(tokenizer_file):
    tok = Tokenizer.from_file(tokenizer_file)
    image = [SOI, *[IMAGE_TOKEN_ID] * 256, EOI]
    # images before the text unless the text marks them; each wrapped in "\n\n" as the processor does
    assert place_images("Describe.", 2) == f"{IMAGE_MARK}{IMAGE_MARK}Describe."
    ids = tok.encode(place_images("Describe.", 1), bos=True, num_images=1)
    assert ids == [2, *tok.encode("\n\n"), *image, *tok.encode("\n\nDescribe.")]
    ids = tok.encode(f"Compare {IMAGE_MARK} with {IMAGE_MARK}.", num_images=2)
    assert ids == [*tok.encode("Compare \n\n"), *image, *tok.encode("\n\n with \n\n"), *image, *tok.encode("\n\n.")]
    with pytest.raises(ValueError, match="marks 1 image place"):
        tok.encode(f"a {IMAGE_MARK} b", num_images=2)
    # chat: after "user\n" (and after the system prompt), like transformers' chat template
    chat = tok.chat_prompt([{"role": "user", "content": "Hi", "images": 1}], system="Be brief.")
    assert chat[: 2 + len(tok.encode("user\nBe brief.\n\n\n\n"))] == [2, 105, *tok.encode("user\nBe brief.\n\n\n\n")]
    assert chat.count(IMAGE_TOKEN_ID) == 256


# ---------------------------------------------------------------------------------------------------
# Preprocessing against transformers' Gemma3ImageProcessor (the slow, PIL-based one; no pan-and-scan).


def photos() -> dict[str, Image.Image]:
    skimage_data = pytest.importorskip("skimage.data")
    return {"cat": Image.fromarray(skimage_data.chelsea()), "astronaut": Image.fromarray(skimage_data.astronaut()),
            "coffee": Image.fromarray(skimage_data.coffee())}  # fmt: skip


def odd_images(tmp_path: Path) -> dict[str, Path]:
    """Files of every awkward kind, made from a real photo."""
    cat = photos()["cat"]
    files = {}

    def save(name, image, **kw):
        files[name] = tmp_path / name
        image.save(files[name], **kw)

    save("gray.png", cat.convert("L"))
    save("gray_alpha.png", cat.convert("LA"))
    rgba = cat.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(cat.size))
    save("rgba.png", rgba)
    palette = cat.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    save("palette_transparent.png", palette, transparency=0)
    save("cmyk.jpg", cat.convert("CMYK"))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save("exif_rotated.jpg", cat, exif=exif)
    save("one_pixel.png", Image.new("RGB", (1, 1), (200, 30, 90)))
    save("very_large.jpg", cat.resize((6000, 4000)), quality=80)
    save("tall.png", cat.resize((30, 900)))
    save("sixteen_bit.png", Image.fromarray(np.asarray(cat.convert("L"), dtype=np.uint16) * 257))
    return files


def hf_pixels(image: Image.Image) -> torch.Tensor:
    """transformers' processor with the settings of Gemma 3's preprocessor_config.json (896x896)."""
    from transformers import Gemma3ImageProcessorPil  # what Gemma3ImageProcessor is without torchvision

    processor = Gemma3ImageProcessorPil(size={"height": 896, "width": 896}, do_pan_and_scan=False)
    return processor(images=[image], return_tensors="pt")["pixel_values"][0]


def test_preprocessing_matches_transformers_on_photos():
    for name, image in photos().items():
        ours = vision.preprocess(image)
        assert ours.shape == (3, 896, 896) and ours.dtype == torch.float32
        assert torch.equal(ours, hf_pixels(image)), name


def test_preprocessing_matches_transformers_on_odd_images(tmp_path):
    from PIL import ImageOps

    for name, path in odd_images(tmp_path).items():
        ours = vision.preprocess(path)
        with Image.open(path) as image:  # the processor on the image as opened, turned upright
            image = ImageOps.exif_transpose(image)
            if name == "sixteen_bit.png":  # the processor clips 16-bit values to white: ours scales them, as the
                image = Image.fromarray((np.asarray(image) // 257).astype(np.uint8))  # 8-bit image they came from
            assert torch.equal(ours, hf_pixels(image)), name
    upright = vision.load_image(tmp_path / "exif_rotated.jpg")
    assert upright.size == (photos()["cat"].height, photos()["cat"].width)


def test_bad_images_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="image not found: .*missing.png"):
        vision.load_image(tmp_path / "missing.png")
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(ValueError, match="notes.png: not an image file"):
        vision.load_image(tmp_path / "notes.png")
    buf = io.BytesIO()
    photos()["cat"].save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="truncated.png: cannot read the image"):
        vision.load_image(tmp_path / "truncated.png")


# ---------------------------------------------------------------------------------------------------
# generate.py --image


def run_generate(*args):
    return run_main(generate_script, *args)


def test_generate_with_images(multimodal, tokenizer_file, tmp_path):
    _, _, directory = multimodal
    (directory / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    photos()["cat"].save(tmp_path / "cat.png")
    out = run_generate("--model", directory, "--image", tmp_path / "cat.png", "--image", tmp_path / "cat.png",
                       "--prompt", f"Compare {IMAGE_MARK} and {IMAGE_MARK}.", "--temperature", "0",
                       "--max-new-tokens", "5", "--stats-json", "--dtype", "float32")  # fmt: skip
    assert out.returncode == 0, out.stderr
    stats = json.loads(out.stderr.strip().splitlines()[-1])
    assert stats["prompt_tokens"] > 2 * 6 and stats["new_tokens"] == 5
    # errors: a missing image, too few marks, a text-only model
    out = run_generate("--model", directory, "--image", tmp_path / "nope.png", "--prompt", "x")
    assert out.returncode == 1 and "image not found" in out.stderr and "Traceback" not in out.stderr
    out = run_generate("--model", directory, "--image", tmp_path / "cat.png", "--prompt", f"{IMAGE_MARK}{IMAGE_MARK}")
    assert out.returncode == 1 and "marks 2 image place(s)" in out.stderr


def test_generate_image_with_text_only_model(tiny_int4_dir, tmp_path):
    photos()["cat"].save(tmp_path / "cat.png")
    out = run_generate("--model", tiny_int4_dir, "--image", tmp_path / "cat.png", "--prompt", "x")
    assert out.returncode == 1 and "text-only model" in out.stderr and "Traceback" not in out.stderr


def test_dense_checkpoint_saved_by_transformers(tmp_path):
    """A dense multimodal checkpoint as transformers writes it loads with its vision tower, weights kept dense."""
    hf = hf_multimodal_model(seed=6)
    hf.save_pretrained(tmp_path / "dense")
    ours = loader.from_pretrained(tmp_path / "dense", dtype=torch.float32, weights="dense")
    assert ours.config.vision_config.tokens_per_image == 4
    ids = image_prompt([[2, 30, 31], [32, 33]], 4)
    px = random_pixels(1, seed=7)
    with torch.no_grad():
        assert max_diff(ours(torch.tensor([ids]), pixel_values=px), hf_logits(hf, ids, px)) < 1e-4


def test_transformers_4_layout_loads_the_same(multimodal, tmp_path):
    """transformers 4.5x saved multimodal checkpoints as model.language_model.*, model.vision_tower.*, ..."""
    from safetensors.torch import load_file, save_file

    _, ours, directory = multimodal
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    renamed = {}
    for shard in directory.glob("*.safetensors"):
        for k, v in load_file(shard).items():
            renamed[k.replace("language_model.model.", "model.language_model.", 1) if k.startswith("language_model.")
                    else f"model.{k}"] = v  # fmt: skip
    save_file(renamed, tmp_path / "model.safetensors")
    again = loader.from_pretrained(tmp_path, dtype=torch.float32)
    assert again.state_dict().keys() == ours.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), ours.state_dict().values(), strict=True))


def test_gguf_export_leaves_out_the_vision_tower(multimodal, tokenizer_file, tmp_path):
    """llama.cpp keeps the vision tower in a separate mmproj file: the GGUF holds the language model only."""
    from gemma3_int4.formats import gguf as gguf_format
    from gemma3_int4.loader import load_checkpoint

    _, _, directory = multimodal
    config, tensors, _ = load_checkpoint(directory)
    assert any(name.startswith("vision.") for name in tensors)
    with pytest.warns(UserWarning, match="vision tower is not written"):
        gguf_format.write(config, tensors, tokenizer_file.read_bytes(), tmp_path / "mm.gguf")
    _, back, _ = load_checkpoint(tmp_path / "mm.gguf")
    assert set(back) == {name for name in tensors if not name.startswith(VISION_MODULES)}
