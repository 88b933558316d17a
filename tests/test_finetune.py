"""finetune.py and qat.py: the int4 checkpoint runs the fake-quantized training forward (Gemma 3 and Gemma 4,
LoRA and full), training from an int4 checkpoint starts from it exactly, gradients pass the rounding, the loss
falls, LoRA merged is LoRA applied, a resumed run ends where an uninterrupted one does, and a chat trains on the
model's replies only."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from conftest import hf_text_model, run_main
from test_gemma4 import hf_gemma4

import finetune
from gemma3_int4 import checkpoint, loader, qat, quant
from gemma3_int4.config import BOS_ID
from gemma3_int4.formats.hf import write
from gemma3_int4.loader import split_projections
from gemma3_int4.tokenizer import Tokenizer


def dense_dir(tmp_path, tokenizer_file, gemma4: str | None = None):
    """A tiny random dense checkpoint (Gemma 3, or a Gemma 4 of test_gemma4's KINDS) with our test tokenizer."""
    directory = tmp_path / "dense"
    (hf_gemma4(gemma4) if gemma4 else hf_text_model()).save_pretrained(directory)
    (directory / "tokenizer.model").write_bytes(tokenizer_file.read_bytes())
    return directory


@pytest.mark.parametrize("gemma4", [None, "e-style", "moe"], ids=["gemma3", "gemma4", "gemma4-moe"])
@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_int4_checkpoint_runs_the_training_forward(tmp_path, tokenizer_file, gemma4, lora_rank):
    source = dense_dir(tmp_path, tokenizer_file, gemma4)
    model = loader.from_pretrained(source, torch.float32, weights="dense")
    targets = ("qkv_proj", "q_proj", "o_proj", "down_proj")
    params = qat.prepare(model, lora_rank, 8.0, targets, train_embeddings=not gemma4)  # Gemma 4: embeddings frozen
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    ids = torch.randint(0, 512, (2, 24))
    for _ in range(3):  # move the weights off their starting grid (and LoRA's B off zero)
        loss, _ = finetune.summed_loss(model, ids, ids[:, 1:])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    with torch.no_grad():
        trained = model(ids)
        levels = qat.merge(model)
        unquantized = model(ids)  # the merged float weights, not rounded to the grid
    tensors = split_projections(qat.int4_tensors(model, levels), model.config)
    write(model.config, tensors, tokenizer_file.read_bytes(), tmp_path / "int4")
    int4 = loader.from_pretrained(tmp_path / "int4", torch.float32)
    assert isinstance(int4.layers[0].mlp.down_proj, quant.Int4Linear) and isinstance(int4.embed, quant.Int4Linear)
    if gemma4 == "moe":  # the experts trained on the grid too, and exported as int4
        assert isinstance(int4.layers[0].experts[0].gate_up_proj, quant.Int4Linear)
    with torch.no_grad():
        got = int4(ids)
    torch.testing.assert_close(got, trained, atol=1e-5, rtol=1e-5)
    assert (unquantized - trained).abs().max() > 100 * (got - trained).abs().max()  # the grid is what matched


def awkward_int4_dir(tmp_path, source: Path) -> Path:
    """The int4 checkpoint `source` with groups as GPTQ or a clipping round to nearest leave them: one of each row
    holding q = -8 (its largest |w| is 8 s) in a third of the rows, one whose largest |q| is 5 in another third, one
    of even q only in the rest."""
    config, tensors, _ = loader.load_checkpoint(source)
    for name in [n for n in tensors if n.endswith(".int4_data")]:
        q = quant.unpack_int4(tensors[name]).unflatten(-1, (-1, qat.G)).clone()  # (N, K/32, 32)
        q[0::3, -1, 0] = -8
        q[1::3, -1] = q[1::3, -1].clamp(-5, 5)
        q[2::3, -1] = q[2::3, -1].div(2, rounding_mode="floor") * 2
        tensors[name] = quant.pack_int4(q.flatten(-2))
    write(config, tensors, checkpoint.tokenizer_proto(source), tmp_path / "awkward")
    return tmp_path / "awkward"


@pytest.mark.parametrize("lora_rank", [0, 4], ids=["full", "lora"])
def test_int4_source_keeps_its_grid_exactly(tmp_path, tiny_int4_dir, lora_rank):
    """QAT from an int4 checkpoint starts from that very model: at step 0 every fake-quantized weight is the
    checkpoint's int4 weight, bit for bit, so the training forward is the int4 model's, and exported untrained
    every int4 tensor comes back as it was. Also for groups whose largest |q| is not 7 (q = -8, or below 7)."""
    source = awkward_int4_dir(tmp_path, tiny_int4_dir)
    int4 = loader.from_pretrained(source, torch.float32)
    model = loader.from_pretrained(source, torch.float32, weights="dense")
    qat.prepare(model, lora_rank, targets=("qkv_proj",))
    int4_layers = dict(int4.named_modules())
    for name, m in qat.int4_modules(model).items():
        assert torch.equal(m.weight, int4_layers[name].dequantize().float()), name
    ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), int4(ids), atol=1e-5, rtol=1e-5)
    tensors = split_projections(qat.int4_tensors(model, qat.merge(model)), model.config)
    _, stored, _ = loader.load_checkpoint(source)
    for name, t in stored.items():
        if name.endswith((".int4_data", ".scales")):
            assert torch.equal(tensors[name], t), name


def test_gradients_pass_the_rounding():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    qat.prepare(linear)  # full fine-tuning of one layer
    x = torch.randn(5, 64)
    linear(x).square().sum().backward()
    w_q = linear.weight.detach()  # the int4 weight the forward used
    assert not torch.equal(w_q, linear.parametrizations.weight.original.detach())
    expected = 2 * F.linear(x, w_q).T @ x  # d/dW of sum((x W^T)^2), at the quantized W
    torch.testing.assert_close(linear.parametrizations.weight.original.grad, expected)


def test_lora_merged_is_lora_applied():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48, bias=False)
    w = linear.weight.detach().clone()
    parametrize = torch.nn.utils.parametrize
    lora = qat.LoRA(48, 64, rank=4, alpha=8.0, generator=torch.Generator().manual_seed(0))
    parametrize.register_parametrization(linear, "weight", lora)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(7, 64)
    applied = F.linear(x, w) + 2.0 * F.linear(F.linear(x, lora.A), lora.B)  # LoRA's own form: x W^T + s x A^T B^T
    torch.testing.assert_close(linear(x), applied, atol=1e-5, rtol=1e-5)
    model = nn.Sequential(linear)  # merged: one weight, nothing else trained
    qat.merge(model)
    assert not parametrize.is_parametrized(linear)
    torch.testing.assert_close(linear(x), applied, atol=1e-5, rtol=1e-5)


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def text_loss(directory, tokenizer_file, text: str) -> float:
    model = loader.from_pretrained(directory, torch.float32)
    ids = torch.tensor([[BOS_ID, *Tokenizer.from_file(tokenizer_file).encode(text)]])
    with torch.no_grad():
        return F.cross_entropy(model(ids)[0, :-1], ids[0, 1:]).item()


def test_loss_falls_on_a_memorisation_task(tmp_path, tokenizer_file):
    source = dense_dir(tmp_path, tokenizer_file)
    text = "The quick brown fox jumps over the lazy dog, twice."
    write_jsonl(tmp_path / "data.jsonl", [{"text": text}])
    args = ["--model", source, "--data", tmp_path / "data.jsonl", "--out", tmp_path / "out", "--full",
            "--steps", 30, "--lr", 3e-3, "--warmup", 2, "--held-out", 0]  # fmt: skip
    result = run_main(finetune, *args)
    assert result.returncode == 0, result.stderr
    before, after = text_loss(source, tokenizer_file, text), text_loss(tmp_path / "out", tokenizer_file, text)
    assert after < before / 4, (before, after)
    assert not (tmp_path / "out.state.pt").exists()


def test_resume_continues_to_the_same_weights(tmp_path, tokenizer_file, monkeypatch):
    source = dense_dir(tmp_path, tokenizer_file)
    write_jsonl(tmp_path / "data.jsonl", [{"text": f"line {i}: " + "some words " * i} for i in range(12)])
    common = ["--model", source, "--data", tmp_path / "data.jsonl", "--lora-rank", 4, "--steps", 6, "--batch-size",
              2, "--grad-accum", 2, "--lr", 1e-2, "--warmup", 2, "--save-every", 2, "--eval-every", 3]  # fmt: skip
    assert run_main(finetune, *common, "--out", tmp_path / "whole").returncode == 0

    schedule = finetune.learning_rate

    def killed_at_step_5(step, args):
        if step == 5:
            raise KeyboardInterrupt
        return schedule(step, args)

    monkeypatch.setattr(finetune, "learning_rate", killed_at_step_5)
    killed = run_main(finetune, *common, "--out", tmp_path / "resumed")
    assert killed.returncode == 130 and not (tmp_path / "resumed").exists()
    assert torch.load(tmp_path / "resumed.state.pt", weights_only=True)["step"] == 4
    monkeypatch.setattr(finetune, "learning_rate", schedule)
    resumed = run_main(finetune, *common, "--out", tmp_path / "resumed")
    assert resumed.returncode == 0 and "at step 4" in resumed.stderr, resumed.stderr
    whole, again = checkpoint.load_weights(tmp_path / "whole")[1], checkpoint.load_weights(tmp_path / "resumed")[1]
    assert whole.keys() == again.keys()
    assert all(torch.equal(whole[k], again[k]) for k in whole)
    _, start, _ = checkpoint.load_weights(source)
    assert not torch.equal(
        whole["layers.0.attn.q_proj.int4_data"], quant.quantize_int4(start["layers.0.attn.q_proj.weight"])[0]
    )  # trained: LoRA on q


def test_chat_trains_on_the_replies_only(tokenizer_file):
    tok = Tokenizer.from_file(tokenizer_file)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"},
                {"role": "model", "content": "Goodbye!"}]  # fmt: skip
    ids, trained = finetune.chat_example(tok, messages)
    sot, eot, nl = 105, 106, tok.encode("\n")
    # Gemma's template, token by token: no system role (the system prompt opens the first user turn)
    user1 = [sot, *tok.encode("user\nBe brief.\n\nHi there"), eot, *nl]
    user2 = [sot, *tok.encode("user\nBye"), eot, *nl]
    opening = [sot, *tok.encode("model\n")]
    reply1, reply2 = tok.encode("Hello."), tok.encode("Goodbye!")
    assert ids == [BOS_ID, *user1, *opening, *reply1, eot, *nl, *user2, *opening, *reply2, eot, *nl]
    assert ids[: 1 + len(user1) + len(opening)] == tok.chat_prompt(messages[1:2], system="Be brief.")
    assert [i for i, t in zip(ids, trained, strict=True) if t] == [*reply1, eot, *reply2, eot]
    assert not trained[0] and sum(trained) == len(reply1) + len(reply2) + 2


def test_bad_data_is_one_line(tmp_path, tokenizer_file):
    (tmp_path / "data.jsonl").write_text('{"text": "fine"}\n{"messages": [{"role": "robot", "content": "x"}]}\n')
    result = run_main(finetune, "--model", dense_dir(tmp_path, tokenizer_file), "--data", tmp_path / "data.jsonl",
                      "--out", tmp_path / "out")  # fmt: skip
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'data.jsonl'}:2: a message's role is")
    assert not (tmp_path / "out").exists()


def test_the_output_carries_a_gguf_sources_chat_template(tmp_path, tokenizer_file):
    """A GGUF source holds its chat template in its metadata: the fine-tuned directory writes it (and the stop ids)
    into the tokenizer files that chat.py and transformers read."""
    import convert

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    source = dense_dir(tmp_path, tokenizer_file)
    (source / "chat_template.jinja").write_text(template)
    convert.convert(str(source), tmp_path / "source.gguf", "gguf")
    write_jsonl(tmp_path / "data.jsonl", [{"text": "A sentence or two to train on, once."}])
    args = ["--model", tmp_path / "source.gguf", "--data", tmp_path / "data.jsonl", "--out", tmp_path / "out",
            "--steps", 1, "--warmup", 0, "--held-out", 0]  # fmt: skip
    result = run_main(finetune, *args)
    assert result.returncode == 0, result.stderr
    ours, tuned = Tokenizer.from_pretrained(tmp_path / "source.gguf"), Tokenizer.from_pretrained(tmp_path / "out")
    assert tuned.chat_template == ours.chat_template == template
    assert tuned.stop_ids == ours.stop_ids
