"""lm-evaluation-harness on our model (harness.py, eval.py --tasks) and through serve.py (/v1/completions with
logprobs and echo, the harness's local-completions model), on local tasks written here: the harness's accuracy is
the one our own log-likelihoods give, its generations are ours, and in-process and served log-likelihoods agree."""

import json

import pytest
import torch
from conftest import hf_text_model, run_main
from test_server import post, serving

import eval as eval_script
from gemma3_int4 import hf_tokenizer, loader
from gemma3_int4.config import BOS_ID
from gemma3_int4.generation import Sampling, generate
from gemma3_int4.tokenizer import Tokenizer

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")  # the served model's tokenizer, on the harness's side

QUESTIONS = [
    ("The sky is", ["blue", "green", "loud"], 0),
    ("Two and two make", ["four", "five", "a fish"], 0),
    ("Python is a", ["language", "snake", "planet"], 1),
    ("Water boils at", ["100 degrees", "the door", "night"], 0),
    ("The opposite of up is", ["down", "left", "sideways"], 0),
    ("A week has", ["seven days", "three hours", "no end"], 0),
]
PROMPTS = ["The first word is", "Once upon a time", "def main():", "Numbers: 1, 2,", "Hello", "In the beginning"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer_file):
    """A tiny dense checkpoint with our tokenizer, and transformers' tokenizer files for the served harness."""
    directory = tmp_path_factory.mktemp("harness") / "tiny"
    hf_text_model().save_pretrained(directory)
    proto = tokenizer_file.read_bytes()
    (directory / "tokenizer.model").write_bytes(proto)
    for name, text in hf_tokenizer.tokenizer_files(proto, None, True, [1, 106], 256).items():
        (directory / name).write_text(text)
    return directory


@pytest.fixture(scope="module")
def ours(tiny_dir):
    return loader.from_pretrained(tiny_dir, torch.float32), Tokenizer.from_pretrained(tiny_dir)


def loglikelihood(model, tok: Tokenizer, context: str, continuation: str) -> float:
    """Our own: the continuation's tokens (those the whole text has after the context's) scored by one forward."""
    whole, head = tok.encode(context + continuation, bos=True), tok.encode(context, bos=True)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole]))[0], dim=-1)
    return sum(logprobs[i - 1, whole[i]].item() for i in range(len(head), len(whole)))


def greedy_text(model, tok: Tokenizer, prompt: str, n: int) -> str:
    tokens = list(generate(model, tok.encode(prompt, bos=True), n, Sampling(temperature=0), tok.stop_ids))
    return tok.decode([t for t in tokens if t not in tok.stop_ids]).split("\n")[0]


@pytest.fixture(scope="module")
def tasks(tmp_path_factory, ours):
    """A multiple-choice task and a generation task, whose first half of targets are our own greedy generations."""
    model, tok = ours
    directory = tmp_path_factory.mktemp("tasks")
    (directory / "mc.jsonl").write_text("".join(json.dumps({"question": q, "choices": c, "answer": a}) + "\n"
                                                for q, c, a in QUESTIONS))  # fmt: skip
    targets = [greedy_text(model, tok, p, 6) if i < 3 else "not this" for i, p in enumerate(PROMPTS)]
    (directory / "gen.jsonl").write_text("".join(json.dumps({"prompt": p, "target": t}) + "\n"
                                                 for p, t in zip(PROMPTS, targets, strict=True)))  # fmt: skip
    common = "dataset_path: json\ntest_split: test\n"
    (directory / "tiny_mc.yaml").write_text(
        f"task: tiny_mc\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'mc.jsonl'}\n"
        "output_type: multiple_choice\ndoc_to_text: '{{question}}'\ndoc_to_choice: choices\ndoc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    (directory / "tiny_gen.yaml").write_text(
        f"task: tiny_gen\n{common}dataset_kwargs:\n  data_files:\n    test: {directory / 'gen.jsonl'}\n"
        "output_type: generate_until\ndoc_to_text: '{{prompt}}'\ndoc_to_target: '{{target}}'\n"
        "generation_kwargs:\n  until: ['\\n']\n  max_gen_toks: 6\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n"
    )
    return directory


def test_eval_script_scores_the_tasks_as_we_do(tiny_dir, ours, tasks, tmp_path):
    model, tok = ours
    scores = [[loglikelihood(model, tok, q, " " + c) for c in choices] for q, choices, _ in QUESTIONS]
    picked = [max(range(len(s)), key=s.__getitem__) for s in scores]
    accuracy = sum(p == a for p, (_, _, a) in zip(picked, QUESTIONS, strict=True)) / len(QUESTIONS)
    assert 0 < accuracy < 1  # the test can tell a right accuracy from a wrong one
    result = run_main(eval_script, "--model", tiny_dir, "--tasks", "tiny_mc,tiny_gen", "--include-path", tasks,
                      "--dtype", "float32", "--output", tmp_path / "results.json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout)
    assert metrics["tiny_mc"]["acc,none"] == pytest.approx(accuracy)
    assert metrics["tiny_gen"]["exact_match,none"] == pytest.approx(0.5)  # the three targets that are ours
    assert json.loads((tmp_path / "results.json").read_text())["results"] == metrics


def test_served_loglikelihoods_are_in_process_ones(tiny_dir, ours, tasks):
    """local-completions against serve.py's /v1/completions (echo, logprobs) and our model in-process: the same
    log-likelihoods to 1e-4 (float32), greedy flags and accuracy."""
    from lm_eval.api.instance import Instance
    from lm_eval.models.openai_completions import LocalCompletionsAPI
    from lm_eval.tasks import TaskManager

    from gemma3_int4 import harness

    model, tok = ours
    requests = [Instance("loglikelihood", {}, (q, " " + c), i) for i, (q, cs, _) in enumerate(QUESTIONS) for c in cs]
    requests.append(Instance("loglikelihood", {}, ("", "The sky is blue"), 99))  # an empty context: <bos> alone
    in_process = harness.HarnessModel(model, tok, batch_size=4)
    expected = in_process.loglikelihood(requests)
    manager = TaskManager(include_path=str(tasks))
    with serving(loader.from_pretrained(tiny_dir, torch.float32), tok, context=256, name="tiny") as url:
        served = LocalCompletionsAPI(base_url=f"{url}/v1/completions", model="tiny", tokenizer=str(tiny_dir),
                                     tokenizer_backend="huggingface", add_bos_token=True, batch_size=3)  # fmt: skip
        got = served.loglikelihood(requests)
        served_acc = lm_eval.simple_evaluate(served, tasks=["tiny_mc"], task_manager=manager, log_samples=False)
        code, echoed = post(url, "/v1/completions", {"prompt": "The sky", "max_tokens": 2, "echo": True,
                                                     "logprobs": 3, "temperature": 0})  # fmt: skip
    assert [g for _, g in got] == [g for _, g in expected]
    for (a, _), (b, _) in zip(got, expected, strict=True):
        assert abs(a - b) <= 1e-4
    assert abs(expected[0][0] - loglikelihood(model, tok, "The sky is", " blue")) <= 1e-4
    local_acc = lm_eval.simple_evaluate(in_process, tasks=["tiny_mc"], task_manager=manager, log_samples=False)
    assert served_acc["results"]["tiny_mc"]["acc,none"] == local_acc["results"]["tiny_mc"]["acc,none"]
    # the response itself: every prompt token echoed (the first without a log-probability), then the 2 generated
    logprobs = echoed["choices"][0]["logprobs"]
    prompt = [BOS_ID, *tok.encode("The sky")]
    assert code == 200 and len(logprobs["tokens"]) == len(prompt) + 2 == len(logprobs["token_logprobs"])
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(len(top) <= 3 for top in logprobs["top_logprobs"][1:])
    assert echoed["choices"][0]["text"].startswith("The sky")
