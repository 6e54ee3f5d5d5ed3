"""adrpo-audio-eval: an audio-language model on MMAU-format multiple-choice questions (the paper's Table 2).

    adrpo-audio-eval --model Qwen/Qwen2.5-Omni-7B [--adapter RUN/adrpo] --mmau_json mmau-test-mini.json \\
        --audio_root DIR --output_dir OUT

Each question is asked as in training (the clip, the question, the options, and the R1 answer format), answered
greedily, and scored by MMAU's rule on the text inside the last ``<answer>...</answer>``: an item without one is
unanswered and counts as wrong. Writes ``predictions.jsonl`` (every completion, its answer and whether it is
correct), ``accuracy.md`` and ``summary.json``: accuracy with its binomial standard error overall and by task
(sound, music, speech), difficulty and sub-category. Every question, clip and file is checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="adrpo-audio-eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="Hub id or local directory of the audio-language model "
                        "(a full Qwen2.5-Omni checkpoint is loaded as its thinker), or builtin:tiny-omni-thinker.")
    parser.add_argument("--adapter", default="", help="A LoRA adapter directory (adrpo-grpo's OUT/<method>) to apply.")
    parser.add_argument("--mmau_json", required=True, help="MMAU-format questions (mmau-test-mini.json).")
    parser.add_argument("--audio_root", default=None, help="Folder the questions' audio_id paths are relative to "
                        "(default: the JSON file's folder).")
    parser.add_argument("--output_dir", required=True, help="Where predictions.jsonl, accuracy.md, summary.json go.")
    parser.add_argument("--batch_size", type=int, default=8, help="Questions per generate call.")
    parser.add_argument("--max_new_tokens", type=int, default=512, help="Longest completion (reasoning and answer).")
    parser.add_argument("--limit", type=int, default=0, help="Only the first N questions (0: all).")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    args = parser.parse_args(argv)
    problems = [f"--{k} must be >= 1, got {getattr(args, k)}" for k in ("batch_size", "max_new_tokens")
                if getattr(args, k) < 1]
    if args.limit < 0:
        problems.append(f"--limit must be >= 0, got {args.limit}")
    if args.adapter and not (Path(args.adapter) / "adapter_config.json").is_file():
        problems.append(f"--adapter {args.adapter} holds no adapter_config.json")
    if problems:
        parser.error("; ".join(problems))
    return args


def evaluate(model, processor, questions: list, batch_size: int, max_new_tokens: int, progress=None) -> list[dict]:
    """Greedy answers to ``questions`` (:class:`.audio_data.AudioQuestion`): one record per question with the
    completion, the extracted answer (None: unanswered) and whether it matches the correct choice."""
    import torch

    from .answers import extract_answer, string_match
    from .audio_data import load_waveform, question_rows
    from .audio_trainer import encode_audio_prompts

    rate = processor.feature_extractor.sampling_rate
    tokenizer = processor.tokenizer
    records = []
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        rows = question_rows(batch)
        encoded = encode_audio_prompts(processor, [r["prompt"] for r in rows],
                                       [load_waveform(r["audio"], rate) for r in rows]).to(model.device)
        with torch.no_grad():
            output = model.generate(**encoded, do_sample=False, max_new_tokens=max_new_tokens,
                                    pad_token_id=tokenizer.pad_token_id)
        texts = tokenizer.batch_decode(output[:, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        for question, text in zip(batch, texts, strict=True):
            answer = extract_answer(text)
            records.append({"id": question.id, "completion": text, "answer": answer, "correct_choice": question.answer,
                            "correct": answer is not None and string_match(question.answer, answer, question.choices),
                            **question.info})
        if progress:
            progress(len(records), len(questions))
    return records


def main(argv=None) -> int:
    start = time.time()
    args = parse_args(argv)
    from .audio_data import AudioDataError, accuracy_markdown, accuracy_table, load_mmau

    try:
        questions = load_mmau(args.mmau_json, args.audio_root)
    except (AudioDataError, FileNotFoundError, ValueError) as err:
        print(f"adrpo-audio-eval: error: {err}", file=sys.stderr)
        return 2
    if args.limit:
        questions = questions[: args.limit]
    from ..builtin import resolve_language_model
    from .cli import BUILTIN_MODELS, ConfigError, check_model_source

    try:
        check_model_source(args.model, "model", BUILTIN_MODELS)
    except ConfigError as err:
        print(f"adrpo-audio-eval: error: {err}", file=sys.stderr)
        return 2
    import torch
    from transformers import AutoProcessor

    from .audio_trainer import load_audio_model, placeholder_token_ids, suppress_in_lm_head

    path = resolve_language_model(args.model)
    processor = AutoProcessor.from_pretrained(path, padding_side="left")
    model = load_audio_model(path, dtype=getattr(torch, args.dtype))
    if args.adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.adapter).merge_and_unload()
    suppress_in_lm_head(model, placeholder_token_ids(model.config))  # as in training: placeholders never sampled
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()

    def progress(done, total):
        print(f"adrpo-audio-eval: {done}/{total} questions ({time.time() - start:.0f} s)", flush=True)

    records = evaluate(model, processor, questions, args.batch_size, args.max_new_tokens, progress)
    rows = accuracy_table(questions, [r["correct"] for r in records])
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    table = accuracy_markdown(rows)
    (out / "accuracy.md").write_text(table + "\n")
    unanswered = sum(r["answer"] is None for r in records)
    summary = {"model": args.model, "adapter": args.adapter, "questions": len(records), "unanswered": unanswered,
               "accuracy": rows[0]["accuracy"], "accuracy_se": rows[0]["se"], "table": rows,
               "wall_time_s": round(time.time() - start, 1)}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(table)
    print(f"adrpo-audio-eval: accuracy {100 * rows[0]['accuracy']:.1f}% +- {100 * rows[0]['se']:.1f} (SE) on "
          f"{len(records)} questions ({unanswered} unanswered, counted wrong); wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
