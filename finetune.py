"""Fine-tune a model for int4: quantization-aware training (qat.py), with LoRA or in full, on a JSONL file.

    python finetune.py --data chats.jsonl --out ./tuned-int4                  # LoRA rank 8 on the default model
    python finetune.py --model ./gemma-3-1b-it-int4 --data notes.jsonl --full --steps 500 --out ./tuned-int4

Each line of --data is a chat or a text:
  {"messages": [{"role": "user", "content": "..."}, {"role": "model", "content": "..."}, ...]}
      ("assistant" is "model"; a first "system" message is the system prompt): trained on the model's replies
      (and their end of turn) only, the tokens laid out as chat.py's transcript holds them;
  {"text": "..."}: trained on every token, in windows of --seq-len tokens that each start with <bos>.
The forward pass sees every int4 weight on its int4 grid (qat.py), so the output, our int4 checkpoint (convert.py
turns it into the other formats), runs exactly the model that was trained. A held-out share of the examples
gives the held-out loss. Every --save-every steps the training state is written (atomically) to OUT.state.pt; a
run started again with the same arguments resumes from it, and continues to the same weights.
"""

from __future__ import annotations

from gemma3_int4 import hugepages  # noqa: F401  (first: it configures torch's allocator, see hugepages.py)

# isort: split
import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from tqdm import tqdm

from gemma3_int4 import checkpoint, files, hf_tokenizer, loader, qat
from gemma3_int4.checkpoint import DEFAULT_MODEL
from gemma3_int4.cli import device_arg, one_line_warnings, positive_float, positive_int
from gemma3_int4.config import BOS_ID
from gemma3_int4.formats import hf
from gemma3_int4.loader import split_projections
from gemma3_int4.tokenizer import Tokenizer

LORA_TARGETS = "qkv_proj,q_proj,k_proj,v_proj,o_proj,gate_up_proj,down_proj"  # every projection of a block


class Example(NamedTuple):
    ids: list[int]
    trained: list[bool]  # trained[i]: ids[i] is a target of the loss (predicted from ids[:i])


# The data


def chat_example(tokenizer: Tokenizer, messages: list[dict]) -> Example:
    """A conversation as chat.py's transcript holds it: <bos>, each user turn (the system prompt in the first),
    and each reply after the opened model turn, closed by <end_of_turn> and a newline. The replies and their
    <end_of_turn> are trained: what the model says, and when it stops."""
    system = messages[0]["content"] if messages and messages[0].get("role") == "system" else None
    ids, trained, first = [BOS_ID], [False], True
    for m in messages[system is not None :]:
        role = {"assistant": "model"}.get(m.get("role"), m.get("role"))
        if role == "user":
            turn = tokenizer.turn("user", m["content"], system=system if first else None)
            ids, trained, first = ids + turn, trained + [False] * len(turn), False
        elif role == "model":
            opening, reply, closing = tokenizer.model_turn(), tokenizer.plain(m["content"]), tokenizer.encode("\n")
            ids += [*opening, *reply, tokenizer.end_of_turn, *closing]
            trained += [False] * len(opening) + [True] * (len(reply) + 1) + [False] * len(closing)
        else:
            raise ValueError(f"a message's role is 'system' (first only), 'user', 'model' or 'assistant', not {role!r}")
    return Example(ids, trained)


def text_examples(tokenizer: Tokenizer, text: str, seq_len: int) -> list[Example]:
    ids = tokenizer.encode(text)
    return [Example([BOS_ID, *ids[i : i + seq_len - 1]], [False] + [True] * len(ids[i : i + seq_len - 1]))
            for i in range(0, len(ids), seq_len - 1)]  # fmt: skip


def read_examples(path: Path, tokenizer: Tokenizer, seq_len: int) -> list[Example]:
    """Every line of a JSONL file as examples of at most seq_len tokens (a longer chat is cut; one left with
    nothing to train is dropped). Errors name the line."""
    examples = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if isinstance(record, dict) and isinstance(record.get("text"), str):
                examples += text_examples(tokenizer, record["text"], seq_len)
            elif isinstance(record, dict) and isinstance(record.get("messages"), list):
                ids, trained = chat_example(tokenizer, record["messages"])
                if any(trained[:seq_len]):
                    examples.append(Example(ids[:seq_len], trained[:seq_len]))
            else:
                raise ValueError('not {"messages": [...]} nor {"text": "..."}')
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}:{n}: {'not JSON' if isinstance(e, json.JSONDecodeError) else e}") from None
    return examples


def split(examples: list[Example], held_out: float, seed: int) -> tuple[list[Example], list[Example]]:
    """A shuffled `held_out` share of the examples (at least one, if held_out > 0) set aside for the held-out loss."""
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    n = math.ceil(held_out * len(examples)) if held_out > 0 else 0
    if len(examples) - n < 1:
        raise ValueError(f"{len(examples)} example(s): none left to train on after holding out {n}")
    return [examples[i] for i in order[n:]], [examples[i] for i in order[:n]]


def micro_batch(examples: list[Example], k: int, batch_size: int, seed: int) -> list[Example]:
    """The k-th micro-batch of a run: the examples in a fresh shuffled order each epoch, a function of (k, seed)
    only, so that a resumed run reads what the uninterrupted one would have."""
    batch = []
    for i in range(k * batch_size, (k + 1) * batch_size):
        epoch, j = divmod(i, len(examples))
        order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 1 + epoch))
        batch.append(examples[order[j]])
    return batch


def collate(batch: list[Example], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """-> ids (B, T) padded at the end, and the targets (B, T - 1): ids[:, 1:], -100 where not trained."""
    T = max(len(e.ids) for e in batch)
    ids = torch.tensor([e.ids + [0] * (T - len(e.ids)) for e in batch])
    trained = torch.tensor([e.trained + [False] * (T - len(e.ids)) for e in batch])
    return ids.to(device), ids[:, 1:].masked_fill(~trained[:, 1:], -100).to(device)


# The training


def summed_loss(model, ids: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The summed cross-entropy of the trained targets, and how many there are."""
    logits = model(ids)[:, :-1]  # (B, T - 1, V): each position predicts the next token
    loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
    return loss, int((targets != -100).sum())


@torch.no_grad()
def held_out_loss(model, examples: list[Example], batch_size: int, device: torch.device) -> float:
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        loss, n = summed_loss(model, *collate(examples[i : i + batch_size], device))
        total, count = total + loss.item(), count + n
    return total / max(count, 1)


def learning_rate(step: int, args: argparse.Namespace) -> float:
    """Linear warm-up over the first --warmup steps, then down to 0 at the last step: cosine or linear."""
    if step <= args.warmup:
        return args.lr * step / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.5 * (1 + math.cos(math.pi * progress)) if args.schedule == "cosine" else 1 - progress)


RESUMED_ARGUMENTS = ("model", "data", "full", "freeze_embeddings", "no_qat", "lora_rank", "lora_alpha",
                     "lora_targets", "seq_len", "batch_size", "grad_accum", "steps", "lr", "warmup", "schedule",
                     "weight_decay", "held_out", "seed")  # fmt: skip


def save_state(path: Path, step: int, model, optimizer, args: argparse.Namespace) -> None:
    state = {
        "step": step,
        "trained": {name: p.detach().cpu() for name, p in model.named_parameters() if p.requires_grad},
        "optimizer": optimizer.state_dict(),
        "arguments": {k: str(getattr(args, k)) for k in RESUMED_ARGUMENTS},
    }
    with files.atomic_output(path, overwrite=True) as tmp:
        torch.save(state, tmp)


def load_state(path: Path, model, optimizer, args: argparse.Namespace) -> int:
    """Restore a saved training state into the model and optimizer -> the step it was saved after."""
    state = torch.load(path, weights_only=True)
    changed = [k for k in RESUMED_ARGUMENTS if state["arguments"].get(k) != str(getattr(args, k))]
    if changed:
        raise ValueError(f"{path} was saved by a run with other arguments ({', '.join(changed)}): remove it to "
                         "start over, or resume with the same arguments")  # fmt: skip
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in state["trained"].items():
            params[name].copy_(t)
    optimizer.load_state_dict(state["optimizer"])
    return state["step"]


def train(model, params: list, train_set: list[Example], held_out: list[Example], args, state: Path) -> None:
    """AdamW over args.steps optimizer steps of args.grad_accum micro-batches each, from the saved state if any."""
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    start = load_state(state, model, optimizer, args) if state.exists() else 0
    if start:
        print(f"resuming from {state} at step {start}", file=sys.stderr)
    device = torch.device(args.device)
    bar = tqdm(total=args.steps, initial=start, desc="finetune", unit="step", disable=None)
    for step in range(start + 1, args.steps + 1):
        t0, tokens = time.perf_counter(), 0
        batches = [micro_batch(train_set, (step - 1) * args.grad_accum + m, args.batch_size, args.seed)
                   for m in range(args.grad_accum)]  # fmt: skip
        count = sum(int(sum(e.trained[1:])) for batch in batches for e in batch)  # the step's trained targets
        total = 0.0
        for batch in batches:
            ids, targets = collate(batch, device)
            loss, _ = summed_loss(model, ids, targets)
            (loss / count).backward()  # the mean over the whole step's targets
            total, tokens = total + loss.item(), tokens + ids.numel()
        torch.nn.utils.clip_grad_norm_(params, args.max_grad_norm)
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, args)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        bar.update()
        bar.set_postfix(loss=f"{total / count:.4f}", tok_s=f"{tokens / (time.perf_counter() - t0):.0f}")
        if held_out and (step % args.eval_every == 0 or step == args.steps):
            bar.write(f"step {step}: held-out loss {held_out_loss(model, held_out, args.batch_size, device):.4f}")
        if step % args.save_every == 0 and step < args.steps:
            save_state(state, step, model, optimizer, args)
    bar.close()


def finetune(args: argparse.Namespace) -> None:
    files.check_destination(args.out)  # before the slow part
    tokenizer = Tokenizer.from_pretrained(args.model)
    examples = read_examples(args.data, tokenizer, args.seq_len)
    if not examples:
        raise ValueError(f"{args.data}: no examples")
    train_set, held_out = split(examples, args.held_out, args.seed)
    model = loader.from_pretrained(args.model, torch.float32, args.device, weights="dense")
    targets = () if args.full else tuple(args.lora_targets.split(","))
    rank = 0 if args.full else args.lora_rank
    params = qat.prepare(model, rank, args.lora_alpha, targets, args.seed, not args.no_qat, not args.freeze_embeddings)
    model.train()
    state = args.out.with_name(args.out.name + ".state.pt")
    train(model, params, train_set, held_out, args, state)
    levels = qat.merge(model)
    tensors = split_projections(qat.int4_tensors(model, levels), model.config)
    source = checkpoint.resolve(args.model)
    proto = checkpoint.tokenizer_proto(source)
    # the tokenizer files transformers and chat.py read, with the source's chat template and stop ids (a GGUF's too)
    text_files = hf_tokenizer.tokenizer_files(proto, tokenizer.chat_template, checkpoint.adds_bos(source),
                                              list(tokenizer.stop_ids), model.config.max_seq_len)  # fmt: skip
    hf.write(model.config, tensors, proto, args.out, "int4", checkpoint.companion_files(source), text_files=text_files)
    files.remove(state)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"the checkpoint to start from (default {DEFAULT_MODEL})")
    p.add_argument("--data", required=True, type=Path, help="a JSONL file of chats or texts (see above)")
    p.add_argument("--out", required=True, type=Path, help="the int4 checkpoint directory to write")
    p.add_argument("--full", action="store_true", help="train every weight, not LoRA adapters")
    p.add_argument("--lora-rank", type=positive_int, default=8, help="LoRA's rank (default 8)")
    p.add_argument("--lora-alpha", type=positive_float, default=16.0, help="LoRA's alpha: B @ A is scaled by "
                   "alpha / rank (default 16)")  # fmt: skip
    p.add_argument("--lora-targets", default=LORA_TARGETS,
                   help="the linear layers LoRA adapts, by name (default: every projection)")  # fmt: skip
    p.add_argument("--freeze-embeddings", action="store_true", help="with --full: leave the embedding (the output "
                   "head) as it is: most of a small model's weights, and its costliest gradient")  # fmt: skip
    p.add_argument("--no-qat", action="store_true", help="plain fine-tuning, rounded to int4 only at the end "
                   "(what QAT is compared with)")  # fmt: skip
    p.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    p.add_argument("--batch-size", type=positive_int, default=4, help="examples per micro-batch (default 4)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (default 1)")
    p.add_argument("--seq-len", type=positive_int, default=512, help="the longest example, in tokens (default 512)")
    p.add_argument("--lr", type=positive_float, default=2e-4, help="the peak learning rate (default 2e-4)")
    p.add_argument("--warmup", type=int, default=10, help="warm-up steps (default 10)")
    p.add_argument("--schedule", choices=["cosine", "linear"], default="cosine", help="after the warm-up")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's (default 0)")
    p.add_argument("--max-grad-norm", type=positive_float, default=1.0, help="gradient clipping (default 1)")
    p.add_argument("--held-out", type=float, default=0.05, help="share of the examples held out (default 0.05)")
    p.add_argument("--eval-every", type=positive_int, default=50, help="held-out loss every N steps (default 50)")
    p.add_argument("--save-every", type=positive_int, default=50, help="training state every N steps (default 50)")
    p.add_argument("--seed", type=int, default=0, help="data order and LoRA's initialisation (default 0)")
    p.add_argument("--device", type=device_arg, default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default cuda if there is a GPU)")  # fmt: skip
    args = p.parse_args(argv)
    if not 0 <= args.held_out < 1 or args.warmup < 0 or args.seq_len < 2:
        p.error("--held-out must be in [0, 1), --warmup at least 0 and --seq-len at least 2")
    files.handle_signals()
    one_line_warnings()
    try:
        finetune(args)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, files.Terminated) as e:
        print(f"[interrupted{f' by {e}' if str(e) else ''}: run again to resume]", file=sys.stderr)
        return files.exit_code(e)
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
