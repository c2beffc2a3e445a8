"""Perplexity against direct computations; the lm-eval adapter against a direct scoring loop,
through lm-eval itself on a local multiple-choice task (offline)."""

import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

import tune_train.eval as tune_eval
from tune_data import SentencePieceTokenizer, load_tokenizer
from tune_models import (
    Decoder,
    DecoderConfig,
    generate,
    llama2_tiny,
    llama3_tiny,
    qwen2_tiny,
)
from tune_train.eval import Window, perplexity, rolling_windows, score_windows


@pytest.fixture(scope="module")
def tokenizer(llama2_tokenizer_path):
    return SentencePieceTokenizer(llama2_tokenizer_path)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Decoder(llama2_tiny())  # vocab 32000, max_seq_len 512
    m.init_weights(std=0.1)  # away from uniform: scores differ clearly between choices
    return m.eval()


@pytest.fixture(scope="module")
def small_model():
    torch.manual_seed(1)
    m = Decoder(DecoderConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                            multiple_of=16, max_seq_len=64))
    m.init_weights(std=0.3)
    return m.eval()


@pytest.fixture(scope="module")
def shakespeare_lines(tinyshakespeare_path):
    lines = [ln for ln in tinyshakespeare_path.read_text().splitlines() if ln.strip()]
    return lines[:400]


def _token_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(ids[j] | ids[:j]) for j >= 1, from one plain full forward."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, :-1].float()
    return -F.cross_entropy(logits, torch.tensor(ids[1:]), reduction="none").double()


@pytest.mark.parametrize("n, max_len, stride", [(1, 4, 4), (2, 4, 4), (10, 4, 4), (37, 8, 3),
                                                 (37, 8, 1), (9, 8, 8), (64, 16, 16)])
def test_rolling_windows_predict_every_token_once_with_most_context(n, max_len, stride):
    ids = list(range(100, 100 + n))
    windows = rolling_windows(ids, max_len, stride)
    scored = []
    for w in windows:
        assert len(w.tokens) - 1 <= max_len  # fits the model
        start = ids.index(w.tokens[0])
        targets = list(range(start + len(w.tokens) - w.n_scored, start + len(w.tokens)))
        # Every scored target sees min(max_len, its index) tokens of context or more.
        assert all(j - start >= min(max_len - stride + 1, j) for j in targets)
        scored += targets
    assert scored == list(range(1, n))
    with pytest.raises(ValueError, match="stride must be within"):
        rolling_windows(ids, max_len, max_len + 1)


def test_perplexity_equals_a_direct_computation(small_model):
    torch.manual_seed(2)
    ids = torch.randint(0, 97, (150,)).tolist()
    # Fits in one window: the plain full-forward cross-entropy.
    full = perplexity(small_model, None, torch.tensor(ids[:60]), progress=False)
    direct = -_token_logprobs(small_model, ids[:60]).mean().item()
    assert full.num_tokens == 59
    assert full.nll == pytest.approx(direct, abs=1e-5)
    assert full.perplexity == pytest.approx(math.exp(direct), rel=1e-5)
    # Longer than the model: with stride 1 every token is predicted from exactly the
    # max_seq_len tokens before it (fewer at the start) -- the textbook sliding window.
    ref = [_token_logprobs(small_model, ids[max(0, j - 16) : j + 1])[-1].item()
           for j in range(1, 150)]
    got = perplexity(small_model, None, ids, max_seq_len=16, stride=1, batch_size=32,
                     progress=False)
    assert got.num_tokens == 149
    assert got.nll == pytest.approx(-sum(ref) / 149, abs=1e-5)
    # Less context per token (stride = window) must not score better here than more context.
    coarse = perplexity(small_model, None, ids, max_seq_len=16, progress=False)
    assert coarse.num_tokens == 149 and coarse.nll != pytest.approx(got.nll, abs=1e-6)


def test_perplexity_on_shakespeare_with_the_real_tokenizer(model, tokenizer, shakespeare_lines):
    text = "\n".join(shakespeare_lines[:30])
    ids = tokenizer.encode(text, add_bos=True)
    assert 100 < len(ids) < 512
    result = perplexity(model, tokenizer, text, progress=False)
    direct = -_token_logprobs(model, ids).mean().item()
    assert result.num_tokens == len(ids) - 1  # every text token, none of the BOS
    assert result.nll == pytest.approx(direct, abs=1e-5)
    # Documents are scored separately; the result is their token-weighted mean.
    docs = shakespeare_lines[:12]
    per_doc = [_token_logprobs(model, tokenizer.encode(d, add_bos=True)) for d in docs]
    result = perplexity(model, tokenizer, docs, batch_size=5, progress=False)
    total = torch.cat(per_doc)
    assert result.num_tokens == len(total)
    assert result.nll == pytest.approx(-total.mean().item(), abs=1e-5)
    with pytest.raises(ValueError, match="text needs a tokenizer"):
        perplexity(model, None, text, progress=False)


@pytest.fixture(scope="module", params=["llama3", "qwen2"])
def family_model(request):
    """(model, tokenizer) of a family whose tokenizer is not SentencePiece: Llama 3's tiktoken
    file, Qwen2's tokenizer.json (no BOS); tiny models with the families' vocabularies."""
    tokenizer = load_tokenizer(request.getfixturevalue(f"{request.param}_tokenizer_path"))
    torch.manual_seed(0)
    model = Decoder({"llama3": llama3_tiny, "qwen2": qwen2_tiny}[request.param]())
    model.init_weights(std=0.1)
    return model.eval(), tokenizer


def test_perplexity_scores_every_token_in_each_family(family_model, shakespeare_lines):
    model, tokenizer = family_model
    text = "\n".join(shakespeare_lines[:20])
    ids = tokenizer.encode(text, add_bos=False)
    result = perplexity(model, tokenizer, text, progress=False)
    assert result.num_tokens == len(ids)  # the first token too, with or without a BOS
    # A family without BOS (Qwen2) scores the text after its EOS, as lm-eval does.
    first = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id
    direct = -_token_logprobs(model, [first, *ids]).mean().item()
    assert result.nll == pytest.approx(direct, abs=1e-5)


def test_score_windows_batches_like_single_forwards(small_model):
    torch.manual_seed(3)
    windows = [Window(torch.randint(0, 97, (k,)).tolist(), n)
               for k, n in [(20, 5), (7, 6), (33, 1), (2, 1), (12, 0)]]
    got = score_windows(small_model, windows, batch_size=3)
    for w, (logp, greedy) in zip(windows, got):
        direct = _token_logprobs(small_model, w.tokens)[len(w.tokens) - 1 - w.n_scored :]
        assert logp == pytest.approx(direct.sum().item(), abs=1e-5)
        with torch.no_grad():
            argmax = small_model(torch.tensor([w.tokens]))[0, :-1].argmax(-1).tolist()
        scored = range(len(w.tokens) - 1 - w.n_scored, len(w.tokens) - 1)
        assert greedy == all(argmax[p] == w.tokens[p + 1] for p in scored)


# ---- lm-eval -------------------------------------------------------------------------------

lm_eval = pytest.importorskip("lm_eval")


def _direct_loglikelihood(model, tokenizer, context: str, continuation: str) -> float:
    """lm-eval's tokenisation rule (continuation = joined text's tokens beyond the
    context's), scored with one plain full forward."""
    context_ids = tokenizer.encode(context, add_bos=True)
    whole = tokenizer.encode(context + continuation, add_bos=True)
    return _token_logprobs(model, whole)[len(context_ids) - 1 :].sum().item()


def _instance(kind, args):
    from lm_eval.api.instance import Instance

    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_adapter_methods_agree_with_direct_scoring(model, tokenizer, shakespeare_lines):
    lm = tune_eval.lm_eval_model(model, tokenizer, batch_size=3)
    assert isinstance(lm, lm_eval.api.model.LM)
    pairs = [(shakespeare_lines[i], " " + shakespeare_lines[i + 1]) for i in range(0, 14, 2)]
    pairs += [("To be, or not to be ", "that is the question"), ("", "Hello world")]
    got = lm.loglikelihood([_instance("loglikelihood", p) for p in pairs])
    for (context, continuation), (logp, _) in zip(pairs[:-2], got):
        assert logp == pytest.approx(
            _direct_loglikelihood(model, tokenizer, context, continuation), abs=1e-4
        )
    # A trailing space in the context moves to the continuation ("▁that").
    assert got[-2][0] == pytest.approx(_direct_loglikelihood(
        model, tokenizer, "To be, or not to be", " that is the question"), abs=1e-4)
    # Empty context: the continuation is scored after BOS alone.
    hello = tokenizer.encode("Hello world", add_bos=True)
    assert got[-1][0] == pytest.approx(_token_logprobs(model, hello).sum().item(), abs=1e-4)

    # loglikelihood_rolling: every token of the text after BOS, in 100-token windows here.
    text = "\n".join(shakespeare_lines[30:60])
    lm_short = tune_eval.lm_eval_model(model, tokenizer, max_seq_len=100)
    (rolling,) = lm_short.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    ppl = perplexity(model, tokenizer, text, max_seq_len=100, progress=False)
    assert rolling == pytest.approx(-ppl.nll * ppl.num_tokens, abs=1e-3)
    assert ppl.num_tokens == len(tokenizer.encode(text, add_bos=False))

    # generate_until: greedy decoding, cut before the first stop string.
    contexts = [shakespeare_lines[0], shakespeare_lines[5] + "\n" + shakespeare_lines[6]]
    direct = [tokenizer.decode(t) for t in
              generate(model, [tokenizer.encode(c) for c in contexts], 12,
                       stop_tokens=tokenizer.eos_id)]
    stop = direct[0][3:6]  # a stop string that occurs in the first continuation
    outs = lm.generate_until([_instance("generate_until", (c, {"until": [stop],
                                                              "max_gen_toks": 12}))
                              for c in contexts])
    assert outs == [d.split(stop, 1)[0] for d in direct]
    assert len(outs[0]) < len(direct[0])


def test_adapter_scores_an_empty_context_in_each_family(family_model, shakespeare_lines):
    model, tokenizer = family_model
    lm = tune_eval.lm_eval_model(model, tokenizer, batch_size=2)
    (got,) = lm.loglikelihood([_instance("loglikelihood", ("", "Hello world"))])
    hello = [tune_eval.prefix_token(tokenizer), *tokenizer.encode("Hello world", add_bos=False)]
    assert got[0] == pytest.approx(_token_logprobs(model, hello).sum().item(), abs=1e-4)
    text = "\n".join(shakespeare_lines[:20])
    (rolling,) = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))])
    ppl = perplexity(model, tokenizer, text, progress=False)
    assert rolling == pytest.approx(-ppl.nll * ppl.num_tokens, abs=1e-3)


def test_local_multiple_choice_task_through_lm_eval(model, tokenizer, shakespeare_lines,
                                                    tmp_path):
    # 20 questions: which of four lines follows this one?
    docs = []
    for k in range(20):
        i = 20 * k
        choices = [shakespeare_lines[i + 1], shakespeare_lines[i + 7],
                   shakespeare_lines[i + 11], shakespeare_lines[i + 15]]
        answer = k % 4
        choices[0], choices[answer] = choices[answer], choices[0]
        docs.append({"question": shakespeare_lines[i], "choices": choices, "answer": answer})
    data = tmp_path / "next_line.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "next_line.yaml").write_text(f"""\
task: tune_next_line
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
  cache_dir: {tmp_path / "hf_cache"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: answer
metric_list:
  - metric: acc
""")
    results = tune_eval.evaluate(
        model, tokenizer, ["tune_next_line"], include_path=str(tasks), include_defaults=False,
        batch_size=8, bootstrap_iters=0, log_samples=True,
    )
    acc = results["results"]["tune_next_line"]["acc,none"]
    samples = sorted(results["samples"]["tune_next_line"], key=lambda s: s["doc_id"])

    correct = 0
    for d, sample in zip(docs, samples):
        # The direct loop: lm-eval puts " " between the question and each choice.
        scores = [_direct_loglikelihood(model, tokenizer, d["question"], " " + c)
                  for c in d["choices"]]
        correct += max(range(4), key=scores.__getitem__) == d["answer"]
        assert [logp for logp, _ in sample["filtered_resps"]] == pytest.approx(scores, abs=1e-4)
    assert acc == pytest.approx(correct / len(docs))


def test_missing_lm_eval_gets_one_clear_message(model, tokenizer, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # what an uninstalled package looks like
    tune_eval._lm_class.cache_clear()
    try:
        with pytest.raises(ImportError, match=r"pip install 'tune-train\[eval\]'"):
            tune_eval.lm_eval_model(model, tokenizer)
    finally:
        tune_eval._lm_class.cache_clear()


def test_importing_eval_does_not_import_lm_eval():
    import subprocess

    code = "import sys, tune_train.eval; print('lm_eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("kwargs, message", [
    # batch_size -2 scored nothing and reported perplexity 1.000; max_seq_len 0 silently
    # meant the model's length.
    (dict(batch_size=-2), "batch_size must be a whole number >= 1, got -2"),
    (dict(batch_size=0), "batch_size must be a whole number >= 1, got 0"),
    (dict(max_seq_len=0), "max_seq_len must be a whole number >= 1, got 0"),
    (dict(max_seq_len=65), "max_seq_len 65 exceeds the model's max_seq_len 64"),
    (dict(stride=0), "stride must be within"),
])
def test_perplexity_refuses_settings_that_make_no_sense(small_model, kwargs, message):
    with pytest.raises(ValueError, match=message):
        perplexity(small_model, None, list(range(1, 40)), progress=False, **kwargs)
    with pytest.raises(ValueError, match="batch_size must be"):
        score_windows(small_model, [Window([1, 2, 3], 2)], batch_size=0)


@pytest.mark.parametrize("content, message", [
    (b"", "is empty: there is no text to score"),
    (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "is a binary file, not text"),
    ("caf\xe9 ol\xe9\n".encode("latin-1"), r"is not UTF-8 text \(byte 3 is 0xe9\): convert it"),
])
def test_read_text_names_what_is_wrong_with_the_file(tmp_path, content, message):
    path = tmp_path / "notes.txt"
    path.write_bytes(content)
    with pytest.raises(tune_eval.EvalError, match=f"{path} {message}"):
        tune_eval.read_text(path)
    path.write_text("naïve text\n", encoding="utf-8")
    assert tune_eval.read_text(path) == "naïve text\n"


def test_unknown_lm_eval_task_is_an_eval_error_with_a_suggestion(model, tokenizer, tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t.yaml").write_text("task: tune_next_line\ndataset_path: json\n"
                                  "output_type: multiple_choice\n")
    with pytest.raises(tune_eval.EvalError,
                       match=f"no lm-eval task 'tune_next_lin' in {tasks} "
                             r"\(did you mean 'tune_next_line'\?\); the tasks there: "
                             "tune_next_line"):
        tune_eval.evaluate(model, tokenizer, ["tune_next_lin"], include_path=str(tasks),
                           include_defaults=False)


@pytest.mark.parametrize("limit", [0, -1, 2.5, float("nan")])
def test_evaluate_refuses_a_limit_that_is_neither_a_count_nor_a_fraction(model, tokenizer,
                                                                          limit):
    with pytest.raises(ValueError, match="limit must be a number of documents"):
        tune_eval.evaluate(model, tokenizer, ["anything"], limit=limit, include_defaults=False)
