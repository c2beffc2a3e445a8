"""Data-pipeline throughput (template + tokenise + mask): tune-data vs torchtune 0.6.1.

    uv run python benchmarks/data.py [--rounds 3] [--max-seq-len 512] [--no-collect]
                                     [--families llama2,llama3,chat]

For each tokenizer family (Llama 2's SentencePiece model, Llama 3's tiktoken file) both sides
build an Alpaca dataset from the same local file (alpaca_5000.json) with that family's
tokenizer, prompt masking on (train_on_input=False), then fetch every sample's tokens and
labels: torchtune loads the file with ``datasets`` and tokenises in ``__getitem__``;
tune-data reads the json itself and tokenises everything up front (other sources go through
``datasets.map``). Each measurement runs in a fresh process with an empty ``datasets``
cache, so it is the *cold* figure: loading the json, templating, tokenising, masking, and
for tune-data writing its cache. The same process then builds again from the now-warm cache
(the *warm* figure: tune-data reads its cached tokens, torchtune tokenises again).

Untimed on both sides: imports, ``datasets``' first-call set-up, and one ``gc.collect()``
after them. The imports leave enough young objects behind that the next few hundred
thousand allocations trigger a full collection (~0.13 s here) wherever they happen, so
without it each side's first timed build pays for the imports' garbage; ``--no-collect``
measures that way.
Rounds alternate ours and torchtune's; medians, spread and the ratio are printed per
family, the cold ratio last.

The chat row builds the 500 ShareGPT conversations of sharegpt/dummy_conversation.json (2, 4
and 6 turns) with Llama 2's tokenizer and chat format on both sides: torchtune's
``chat_dataset(conversation_style="sharegpt")`` with ``Llama2ChatTemplate``, tune-data's
``chat_dataset(chat_template="llama2")``, every assistant turn trained. 500 conversations
take tune-data 20-30 ms cold on the busy 2-core machine (torchtune 100-150 ms), ~3 ms of
it the tokenizer's one-off vocabulary checks (read from the model file's bytes; building
every piece as a string took ~13 ms). Medians of 5 rounds, load average 3.7-4.5: cold
4.91x (4.45-5.28x over three runs; the code before, run in between, 3.17-3.24x), warm
21.3x. ``--chat-copies 10`` repeats them ten times (5,000 conversations) to show the rate
at scale: 6.20x cold (before: 4.66x in the same minutes).

With Llama 2 both sides make the same samples (checked token for token). With Llama 3,
torchtune wraps the prompt and the response in Llama 3's chat headers (``<|start_header_id|>
user<|end_header_id|>\n\n`` ... ``<|eot_id|>``) and strips them, where tune-data keeps the
plain Alpaca text; the check then compares what both train on: the response's ids, and the
prompt's text. Torchtune runs in its own virtual environment: $TORCHTUNE_VENV (default
benchmarks/.venv-torchtune, made by benchmarks/setup_peers.sh).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("TUNE_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


def _worker(side: str, family: str, data: str, tokenizer: str, max_seq_len: int,
            dump: str | None, collect: bool) -> None:
    """Runs in a subprocess: build + fetch every sample, cold then warm; prints JSON."""
    os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
    cache = tempfile.mkdtemp(prefix=f"bench-data-{side}-")
    os.environ["HF_DATASETS_CACHE"] = cache
    import datasets

    # Untimed on both sides: imports, and the set-up datasets does on its first load_dataset
    # call in a process (it imports more modules lazily), on a throwaway file.
    warmup = Path(cache) / "warmup.json"
    warmup.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}]))
    datasets.load_dataset("json", data_files=str(warmup), split="train",
                          cache_dir=f"{cache}/warmup")

    if family == "chat" and side == "tune":
        from tune_data import SentencePieceTokenizer, chat_dataset

        tok = SentencePieceTokenizer(tokenizer)

        def build():
            ds = chat_dataset(tok, data_files=data, chat_template="llama2",
                              max_seq_len=max_seq_len, cache_dir=cache)
            return [ds[i] for i in range(len(ds))], ds.rows.tolist()
    elif family == "chat":
        from torchtune.datasets import chat_dataset
        from torchtune.models.llama2 import llama2_tokenizer

        tok = llama2_tokenizer(tokenizer, max_seq_len=max_seq_len,
                               prompt_template="torchtune.models.llama2.Llama2ChatTemplate")

        def build():
            ds = chat_dataset(tok, source="json", data_files=data, split="train",
                              conversation_column="conversations", conversation_style="sharegpt",
                              train_on_input=False, cache_dir=cache)
            return [ds[i] for i in range(len(ds))], list(range(len(ds)))
    elif side == "tune":
        from tune_data import Llama3Tokenizer, SentencePieceTokenizer, alpaca_dataset

        tok = (Llama3Tokenizer if family == "llama3" else SentencePieceTokenizer)(tokenizer)

        def build():
            ds = alpaca_dataset(tok, data_files=data, train_on_input=False,
                                max_seq_len=max_seq_len, cache_dir=cache)
            return [ds[i] for i in range(len(ds))], ds.rows.tolist()
    else:
        from torchtune.datasets import alpaca_dataset
        from torchtune.models.llama2 import llama2_tokenizer
        from torchtune.models.llama3 import llama3_tokenizer

        # No chat template: the Alpaca template alone, as on our side (Llama 3's tokenizer
        # still adds its chat headers).
        make = llama3_tokenizer if family == "llama3" else llama2_tokenizer
        tok = make(tokenizer, max_seq_len=max_seq_len, prompt_template=None)

        def build():
            ds = alpaca_dataset(tok, source="json", data_files=data, split="train",
                                train_on_input=False, cache_dir=cache)
            return [ds[i] for i in range(len(ds))], list(range(len(ds)))

    if collect:
        gc.collect()
    start = time.perf_counter()
    samples, rows = build()
    cold = time.perf_counter() - start
    start = time.perf_counter()
    build()
    warm = time.perf_counter() - start
    if dump:
        Path(dump).write_text(json.dumps({
            "rows": rows,
            "tokens": [[int(t) for t in s["tokens"]] for s in samples],
            "labels": [[int(t) for t in s["labels"]] for s in samples],
        }))
    print(json.dumps({"cold_s": cold, "warm_s": warm, "samples": len(samples)}))


def _run(python: str, side: str, family: str, args: argparse.Namespace,
         dump: str | None = None) -> dict:
    tokenizer = args.llama3_tokenizer if family == "llama3" else args.tokenizer
    data = args.chat_data if family == "chat" else args.data
    cmd = [python, __file__, "--worker", side, "--family", family, "--data", str(data),
           "--tokenizer", str(tokenizer), "--max-seq-len", str(args.max_seq_len)]
    if args.no_collect:
        cmd.append("--no-collect")
    if dump:
        cmd += ["--dump", dump]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode:
        sys.exit(f"{side} worker failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _comparable(records: list[dict], ours: dict, theirs: dict, max_seq_len: int):
    """(row, our tokens, our labels, their tokens, their labels) of the samples both sides
    should make alike: not dropped, not truncated (we cut without EOS), and without a
    placeholder input (we use the template without input for "<noinput>", torchtune not)."""
    from tune_data.templates import is_empty_input

    by_row = dict(zip(ours["rows"], zip(ours["tokens"], ours["labels"])))
    for row, (t_tok, t_lab) in enumerate(zip(theirs["tokens"], theirs["labels"])):
        r = records[row]
        if row not in by_row or is_empty_input(r["input"]) != (r["input"] == ""):
            continue
        o_tok, o_lab = by_row[row]
        if len(o_tok) >= max_seq_len or len(t_tok) >= max_seq_len:
            continue
        yield row, o_tok, o_lab, t_tok, t_lab


def _compare(ours_path: str, theirs_path: str, records: list[dict], max_seq_len: int) -> str:
    """How many samples have identical tokens and loss positions on both sides."""
    ours = json.loads(Path(ours_path).read_text())
    theirs = json.loads(Path(theirs_path).read_text())
    same = comparable = 0
    for _, o_tok, o_lab, t_tok, t_lab in _comparable(records, ours, theirs, max_seq_len):
        comparable += 1
        # Our labels are shifted (labels[i] is the target of tokens[i]); torchtune's are not.
        same += o_tok == t_tok and o_lab[:-1] == t_lab[1:]
    return f"identical tokens and loss masks on {same:,} of {comparable:,} comparable samples"


def _compare_llama3(ours_path: str, theirs_path: str, records: list[dict], tokenizer: Path,
                    max_seq_len: int) -> str:
    """What both sides train on agrees: the response ids (each side's loss covers exactly the
    response and its end: our EOS; torchtune's assistant header and <|eot_id|>), and the
    prompt's text (torchtune strips the message, so its prompt lacks the final newline)."""
    from tune_data import Llama3Tokenizer

    tok = Llama3Tokenizer(tokenizer)
    header, end_header, eot = (tok.token_id(n) for n in
                               ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"))
    ours = json.loads(Path(ours_path).read_text())
    theirs = json.loads(Path(theirs_path).read_text())
    same = comparable = 0
    for row, o_tok, o_lab, t_tok, t_lab in _comparable(records, ours, theirs, max_seq_len):
        r = records[row]
        if r["output"] != r["output"].strip():
            continue  # torchtune strips each message; the texts then differ by design
        comparable += 1
        trained = [t for t, lab in zip(o_tok[1:], o_lab) if lab != -100]  # ours: response + EOS
        response, prompt = trained[:-1], o_tok[1 : len(o_tok) - len(trained)]
        # torchtune: BOS, header user end \n\n, prompt, eot, header assistant end \n\n,
        # response, eot, EOS
        starts = [i for i, t in enumerate(t_tok) if t == header]
        ends = [i for i, t in enumerate(t_tok) if t == end_header]
        if len(starts) != 2 or len(ends) != 2:
            continue
        their_prompt = t_tok[ends[0] + 2 : starts[1] - 1]
        their_response = t_tok[ends[1] + 2 : -2]
        their_trained = [t for t, lab in zip(t_tok, t_lab) if lab != -100]
        same += (
            response == their_response
            and trained[-1] == tok.eos_id
            and their_trained == t_tok[starts[1] : -1]  # assistant header + response + eot
            and t_tok[-2] == eot
            and tok.decode(prompt) == tok.decode(their_prompt) + "\n"
        )
    return (f"identical response ids and loss on exactly the response, prompt text the same, "
            f"on {same:,} of {comparable:,} comparable samples")


# torchtune's Llama2ChatTemplate encodes "[INST] ", the user text and " [/INST] " apart,
# which puts an extra "▁" (29871) before "▁[/INST]", and it strips the space Meta's format has
# before </s> (tune-data's ids are Meta's: packages/tune-data/tests/test_chat.py).
_SPACE, _END_INST, _EOS = 29871, [518, 29914, 25580], 2


def _as_metas_format(tokens: list[int], labels: list[int]) -> tuple[list[int], list[int]]:
    """torchtune's Llama 2 chat sample with those two differences undone."""
    out_tokens, out_labels = [], []
    for j, (token, label) in enumerate(zip(tokens, labels)):
        if token == _SPACE and tokens[j + 1 : j + 4] == _END_INST:
            continue
        if token == _EOS:  # the space before </s> is trained exactly when </s> is
            out_tokens.append(_SPACE)
            out_labels.append(_SPACE if label != -100 else -100)
        out_tokens.append(token)
        out_labels.append(label)
    return out_tokens, out_labels


def _compare_chat(ours_path: str, theirs_path: str, max_seq_len: int) -> str:
    """Same tokens and the same loss positions once torchtune's sample is put in Meta's
    format (see _as_metas_format); samples either side truncated are left out."""
    ours = json.loads(Path(ours_path).read_text())
    theirs = json.loads(Path(theirs_path).read_text())
    by_row = dict(zip(ours["rows"], zip(ours["tokens"], ours["labels"])))
    same = comparable = trained = 0
    for row, (t_tok, t_lab) in enumerate(zip(theirs["tokens"], theirs["labels"])):
        if row not in by_row or len(by_row[row][0]) >= max_seq_len or len(t_tok) >= max_seq_len:
            continue
        comparable += 1
        o_tok, o_lab = by_row[row]
        t_tok, t_lab = _as_metas_format(t_tok, t_lab)
        # Our labels are shifted (labels[i] is the target of tokens[i]); torchtune's are not.
        same += o_tok == t_tok and o_lab[:-1] == t_lab[1:]
        trained += sum(lab != -100 for lab in o_lab)
    return (f"identical tokens and loss masks on {same:,} of {comparable:,} conversations "
            f"({trained:,} trained tokens) once torchtune's two differences from Meta's "
            "Llama 2 format are undone (an extra '▁' before [/INST], none before </s>)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--data", type=Path, default=SHARED / "alpaca" / "alpaca_5000.json")
    parser.add_argument("--tokenizer", type=Path,
                        default=SHARED / "llama2-tokenizer" / "tokenizer.model",
                        help="the Llama 2 tokenizer.model")
    parser.add_argument("--llama3-tokenizer", type=Path,
                        default=SHARED / "llama3-tokenizer" / "tokenizer.model")
    parser.add_argument("--chat-data", type=Path,
                        default=SHARED / "sharegpt" / "dummy_conversation.json")
    parser.add_argument("--chat-copies", type=int, default=1,
                        help="repeat the chat data this many times (rate at scale)")
    parser.add_argument("--families", default="llama2,llama3,chat",
                        help="comma-separated: llama2, llama3 (Alpaca), chat (ShareGPT)")
    parser.add_argument("--no-collect", action="store_true",
                        help="skip the untimed gc.collect() after imports")
    parser.add_argument("--worker", choices=["tune", "torchtune"], help=argparse.SUPPRESS)
    parser.add_argument("--family", default="llama2", help=argparse.SUPPRESS)
    parser.add_argument("--dump", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args.worker, args.family, str(args.data), str(args.tokenizer),
                args.max_seq_len, args.dump, collect=not args.no_collect)
        return
    families = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = set(families) - {"llama2", "llama3", "chat"}
    if unknown:
        sys.exit(f"unknown families {sorted(unknown)}; choose from llama2, llama3, chat")
    paths = [args.chat_data if f == "chat" else args.data for f in families]
    paths += [args.llama3_tokenizer if f == "llama3" else args.tokenizer for f in families]
    for path in paths:
        if not path.is_file():
            sys.exit(f"{path} not found: set TUNE_SHARED_DATA to the shared/data folder")
    if args.chat_copies > 1 and "chat" in families:
        copies = tempfile.NamedTemporaryFile("w", suffix=".json", delete=False)
        copies.write(json.dumps(json.loads(args.chat_data.read_text()) * args.chat_copies))
        copies.close()
        args.chat_data = Path(copies.name)
    venv = Path(os.environ.get("TORCHTUNE_VENV", HERE / ".venv-torchtune"))
    peer_python = venv / "bin" / "python"
    if not peer_python.is_file():
        sys.exit(f"torchtune venv not found at {venv}: run benchmarks/setup_peers.sh or set "
                 "TORCHTUNE_VENV")

    from _timing import median, summary

    records = json.loads(args.data.read_text())
    print(f"Alpaca {len(records):,} records ({args.data.name}), ShareGPT "
          f"{len(json.loads(args.chat_data.read_text())):,} conversations "
          f"({args.chat_data.name}), max_seq_len {args.max_seq_len}, "
          f"{args.rounds} alternating rounds, CPU ({os.cpu_count()} cores), "
          f"gc.collect() after imports: {'no' if args.no_collect else 'yes'}")
    ratios = []
    for family in families:
        n = len(json.loads((args.chat_data if family == "chat" else args.data).read_text()))
        results: dict[str, dict[str, list[float]]] = {
            side: {"cold": [], "warm": []} for side in ("tune", "torchtune")
        }
        with tempfile.TemporaryDirectory() as tmp:
            dumps = {"tune": f"{tmp}/tune.json", "torchtune": f"{tmp}/torchtune.json"}
            for round_ in range(args.rounds):  # A B A B ...
                for side, python in (("tune", sys.executable), ("torchtune", str(peer_python))):
                    out = _run(python, side, family, args, dumps[side] if round_ == 0 else None)
                    results[side]["cold"].append(n / out["cold_s"])
                    results[side]["warm"].append(n / out["warm_s"])
            if family == "chat":
                agreement = _compare_chat(dumps["tune"], dumps["torchtune"], args.max_seq_len)
            elif family == "llama3":
                agreement = _compare_llama3(dumps["tune"], dumps["torchtune"], records,
                                            args.llama3_tokenizer, args.max_seq_len)
            else:
                agreement = _compare(dumps["tune"], dumps["torchtune"], records,
                                     args.max_seq_len)
        name = {"llama2": "Llama 2 (SentencePiece)", "llama3": "Llama 3 (tiktoken)",
                "chat": "Chat, ShareGPT with Llama 2's format"}[family]
        print(f"{name}")
        print(f"  check: {agreement}")
        for kind in ("warm", "cold"):
            for side in ("tune", "torchtune"):
                print(f"  {kind:4s} {side:10s} examples/s {summary(results[side][kind])}")
        for kind in ("warm", "cold"):
            ratio = median(results["tune"][kind]) / median(results["torchtune"][kind])
            ratios.append(f"  {name}: ratio tune / torchtune ({kind} datasets cache): "
                          f"{ratio:.2f}x")
    print("\n".join(ratios))


if __name__ == "__main__":
    main()
