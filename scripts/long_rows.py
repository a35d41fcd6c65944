#!/usr/bin/env python3
"""Writes long rows for scoring (`teacher-dump --score`) from the bundled seed tasks: each row
is one seed task's instruction, answered by that task's output followed by the outputs of the
next tasks until the response holds about `--chars` characters. With SmolLM2's tokenizer the
default (2000 characters) gives rows of about 500 tokens: the training benchmark's long rows.

    python3 scripts/long_rows.py > out/long-rows.jsonl
    teacher-dump --teacher data/models/SmolLM2-135M-Instruct.Q4_1.gguf \
        --input out/long-rows.jsonl --score --top-k 32 --out out/long-scored
"""
import argparse
import json
import os

a = argparse.ArgumentParser()
a.add_argument("--rows", type=int, default=96)
a.add_argument("--chars", type=int, default=2000)
args = a.parse_args()
path = os.path.join(os.path.dirname(__file__), "..", "data", "prompts", "self-instruct-seed-tasks.jsonl")
tasks = [json.loads(l) for l in open(path)]
for i in range(args.rows):
    t = tasks[i % len(tasks)]
    parts, j = [], i
    while sum(len(p) + 2 for p in parts) < args.chars:
        parts.append(tasks[j % len(tasks)]["instances"][0]["output"])
        j += 1
    print(json.dumps({"id": f"long_{i:03d}", "instruction": t["instruction"],
                      "input": t["instances"][0]["input"], "response": "\n\n".join(parts)}))
