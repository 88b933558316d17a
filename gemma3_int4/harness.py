"""Our model in lm-evaluation-harness (the optional `eval` extra): the scores the model cards quote (MMLU, ...).

The harness asks a model three things, each over a list of requests: the log-likelihood of a continuation after a
context (multiple choice), of a whole text (perplexity tasks, in windows), and a greedy generation up to a stop
string. HarnessModel answers them with our model and tokenizer: contexts start with <bos> (as transformers' Gemma
tokenizer adds it), log-likelihoods come from plain batched forwards, generations from continuous batching
(generation.generate_batch). eval.py --tasks runs it; serve.py's /v1/completions answers the harness's
local-completions model with the same numbers (logprobs and echo, as OpenAI's legacy completions API).
"""

from __future__ import annotations

import json

from .config import BOS_ID, EOS_ID
from .generation import Request, Sampling, generate_batch, score
from .tokenizer import Tokenizer

try:  # the optional `eval` extra: without it this module imports, and evaluate() says what to install
    import lm_eval
    from lm_eval.api.model import TemplateLM
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError:
    lm_eval, TemplateLM = None, object


class HarnessModel(TemplateLM):
    """lm_eval's model interface over one of our models (loader.from_pretrained) and its tokenizer."""

    def __init__(self, model, tokenizer: Tokenizer, batch_size: int = 8, max_length: int = 2048):
        super().__init__()
        self.model, self.ours, self.batch_size = model, tokenizer, batch_size
        self.max_length = min(max_length, model.config.max_seq_len)

    @property
    def eot_token_id(self) -> int:
        return EOS_ID

    @property
    def prefix_token_id(self) -> int:
        return BOS_ID

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.ours.encode(string, bos=add_special_tokens is not False)

    def tok_decode(self, ids: list[int]) -> str:
        return self.ours.decode(ids)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """requests: (key, context ids, continuation ids) -> (log-likelihood, whether greedy decoding picks it),
        the context cut from the left to fit max_length."""
        results = []
        for i in range(0, len(requests), self.batch_size):
            batch = requests[i : i + self.batch_size]
            sequences = [(context + continuation)[-(self.max_length + 1) :] for _, context, continuation in batch]
            starts = [len(s) - len(continuation) for s, (_, _, continuation) in zip(sequences, batch, strict=True)]
            for scores in score(self.model, sequences, starts):
                greedy = bool((scores.logprobs >= scores.top_logprobs[:, 0]).all())
                results.append((scores.logprobs.sum().item(), greedy))
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """A text's log-likelihood in windows of max_length tokens, each token predicted once (the harness's
        rolling windows: the first after <bos>, each later one with as much context as fits)."""
        results = []
        for (text,) in [r.args for r in requests]:
            windows = get_rolling_token_windows(self.ours.encode(text), BOS_ID, self.max_length, context_len=1)
            pieces = [(None, *make_disjoint_window(w)) for w in windows]
            results.append(sum(score for score, _ in self._loglikelihood_tokens(pieces)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy continuations, all requests through one continuous batch, each cut before its first stop string
        (and ended at <eos>)."""
        jobs = []
        for context, kwargs in [r.args for r in requests]:
            max_new = kwargs.get("max_gen_toks", 256)
            prompt = self.tok_encode(context)[-(self.max_length - max_new) :]
            jobs.append(Request(prompt, max_new, Sampling(temperature=0.0), self.ours.stop_ids))
        rows = min(self.batch_size, len(jobs))
        for _ in generate_batch(self.model, jobs, rows, self.max_length):
            pass
        texts = []
        for job, (_, kwargs) in zip(jobs, [r.args for r in requests], strict=True):
            tokens = job.tokens[:-1] if job.finish_reason == "stop" else job.tokens
            text = self.ours.decode(tokens)
            until = kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                text = text.split(stop)[0] if stop else text
            texts.append(text)
        return texts


def evaluate(
    model,
    tokenizer: Tokenizer,
    tasks: list[str],
    limit: float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 8,
    include_path: str | None = None,
) -> dict:
    """lm_eval.simple_evaluate on our model: the harness's results dict (JSON-ready). include_path: a directory of
    task YAML files of one's own, beside the harness's."""
    if lm_eval is None:
        raise ImportError("lm-evaluation-harness is not installed: pip install .[eval] (or pip install lm-eval)")
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=include_path)
    unknown = [t for t in tasks if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}: see lm_eval --tasks list")
    lm = HarnessModel(model, tokenizer, batch_size)
    results = lm_eval.simple_evaluate(
        lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=False
    )
    return json.loads(json.dumps(results, default=str))
