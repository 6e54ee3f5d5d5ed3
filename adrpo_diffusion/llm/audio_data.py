"""Audio multiple-choice data: AVQA (training) and MMAU test-mini (evaluation), checked before any model loads.

- :func:`load_avqa`: AVQA's ``train_qa.json`` (a list of records with ``id``, ``video_name``, ``question_text``,
  ``multi_choice``, ``answer`` = index of the correct choice, ``question_relation``), the audio of each video
  extracted to ``<audio_dir>/<video_name>.wav``. Questions whose ``question_relation`` is ``View`` (answerable from
  the picture only) are dropped, as the audio experiments do.
- :func:`load_mmau`: MMAU's ``mmau-test-mini.json`` (records with ``id``, ``audio_id`` = the clip's path relative
  to the release folder, ``question``, ``choices``, ``answer`` = the correct choice's text, ``task``,
  ``difficulty``, ``sub-category``, and ``category`` as a string or a list).

Both return :class:`AudioQuestion` s and raise :class:`AudioDataError` naming every bad record (file, index, id,
what is wrong) and every missing or unreadable audio file at once. :func:`load_waveform` reads a clip (a path, or
a decoded waveform: a numpy array, a list as Arrow stores it, or a ``{"array", "sampling_rate"}`` dict) as mono
float32 at the feature extractor's sampling rate. Needs the ``[audio]`` extra (soundfile, soxr).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

AUDIO_EXTRA = "pip install -c constraints-ci.txt -e '.[audio]'"
SHOWN_PROBLEMS = 20


class AudioDataError(ValueError):
    """Bad audio question data: every problem found, one per line."""


@dataclass(frozen=True)
class AudioQuestion:
    id: str
    audio: Path
    question: str
    choices: list[str]
    answer: str  # the correct choice's text
    info: dict = field(default_factory=dict)  # task, difficulty, sub-category, category (MMAU), relation (AVQA)


def _soundfile():
    try:
        import soundfile
    except ImportError as error:  # pragma: no cover - depends on the install
        raise ImportError(f"reading audio files needs soundfile: {AUDIO_EXTRA}") from error
    return soundfile


def resample(waveform: np.ndarray, rate: int, target_rate: int) -> np.ndarray:
    """``waveform`` (1-D) from ``rate`` to ``target_rate`` Hz (soxr's high-quality resampler); unchanged if equal."""
    if rate == target_rate:
        return waveform
    import soxr

    return soxr.resample(waveform, rate, target_rate).astype(np.float32)


def load_waveform(source, sampling_rate: int, source_rate: int | None = None) -> np.ndarray:
    """Mono float32 samples of ``source`` at ``sampling_rate`` Hz.

    ``source``: a file path (any format soundfile reads; its own rate), a ``{"array", "sampling_rate"}`` dict (as
    ``datasets`` decodes audio), or samples as a numpy array or a (nested) list, as Arrow stores them, at
    ``source_rate`` (default: already at ``sampling_rate``). Channels (the last axis of 2-D samples) are averaged.
    """
    if isinstance(source, (str, Path)):
        samples, rate = _soundfile().read(str(source), dtype="float32", always_2d=True)
    elif isinstance(source, dict):
        samples, rate = source["array"], source["sampling_rate"]
    else:
        samples, rate = source, source_rate or sampling_rate
    samples = np.asarray(samples, dtype=np.float32)
    if samples.ndim == 2:
        samples = samples.mean(axis=1)
    if samples.ndim != 1 or samples.size == 0:
        raise AudioDataError(f"audio samples must be a non-empty 1-D (or 2-D: samples x channels) array, got shape "
                             f"{samples.shape}")
    return resample(samples, int(rate), sampling_rate)


def _read_records(path: Path) -> list:
    if not path.is_file():
        raise AudioDataError(f"{path}: no such file")
    try:
        records = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise AudioDataError(f"{path}: not valid JSON ({error})") from None
    if not isinstance(records, list):
        raise AudioDataError(f"{path}: expected a JSON list of records, got {type(records).__name__}")
    return records


def _raise_if(problems: list[str], path: Path) -> None:
    if problems:
        shown = problems[:SHOWN_PROBLEMS]
        more = f"\n  ... and {len(problems) - len(shown)} more" if len(problems) > len(shown) else ""
        raise AudioDataError(f"{path}: {len(problems)} problem(s):\n  " + "\n  ".join(shown) + more)


def _complete_records(path: Path, required: tuple[str, ...], choices_key: str, problems: list[str]):
    """``(name, record)`` for each record of ``path`` that has every ``required`` field and at least two string
    choices under ``choices_key``; a line in ``problems`` for each other one."""
    for index, record in enumerate(_read_records(path)):
        name = f"record {index}" + (f" (id {record['id']})" if isinstance(record, dict) and "id" in record else "")
        missing = [key for key in required if not isinstance(record, dict) or key not in record]
        if missing:
            problems.append(f"{name}: missing {', '.join(missing)}")
            continue
        choices = record[choices_key]
        if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) for c in choices)):
            problems.append(f"{name}: {choices_key} must be a list of at least two strings, got {choices!r}")
            continue
        yield name, record


def check_audio_files(questions: list[AudioQuestion]) -> list[str]:
    """One line per question whose audio file is missing or unreadable (soundfile's header check, no decoding)."""
    soundfile, problems, checked = _soundfile(), [], {}
    for q in questions:
        if q.audio not in checked:
            if not q.audio.is_file():
                checked[q.audio] = "no such file"
            else:
                try:
                    info = soundfile.info(str(q.audio))
                    checked[q.audio] = None if info.frames > 0 else "no samples"
                except Exception as error:  # soundfile raises its own LibsndfileError (a RuntimeError) and others
                    checked[q.audio] = f"unreadable ({str(error).strip() or type(error).__name__})"
        if checked[q.audio]:
            problems.append(f"id {q.id}: audio {q.audio}: {checked[q.audio]}")
    return problems


AVQA_FIELDS = ("id", "video_name", "question_text", "multi_choice", "answer", "question_relation")


def load_avqa(qa_json: str | Path, audio_dir: str | Path, *, drop_relations: tuple[str, ...] = ("View",)) -> list[AudioQuestion]:
    """AVQA questions with their audio (``<audio_dir>/<video_name>.wav``), without ``drop_relations`` questions."""
    path, audio_dir = Path(qa_json), Path(audio_dir)
    problems, questions = [], []
    for name, record in _complete_records(path, AVQA_FIELDS, "multi_choice", problems):
        if record["question_relation"] in drop_relations:
            continue
        choices, answer = record["multi_choice"], record["answer"]
        if not (isinstance(answer, int) and 0 <= answer < len(choices)):
            problems.append(f"{name}: answer must be an index into multi_choice (0..{len(choices) - 1}), got {answer!r}")
            continue
        questions.append(AudioQuestion(str(record["id"]), audio_dir / f"{record['video_name']}.wav",
                                       record["question_text"], list(choices), choices[answer],
                                       {"relation": record["question_relation"],
                                        "type": record.get("question_type", "")}))
    _raise_if(problems + check_audio_files(questions), path)
    return questions


MMAU_FIELDS = ("id", "audio_id", "question", "choices", "answer", "task", "difficulty", "sub-category")


def load_mmau(mmau_json: str | Path, audio_root: str | Path | None = None) -> list[AudioQuestion]:
    """MMAU-format questions; ``audio_id`` resolved against ``audio_root`` (default: the JSON file's folder)."""
    path = Path(mmau_json)
    root = Path(audio_root) if audio_root is not None else path.parent
    problems, questions = [], []
    for name, record in _complete_records(path, MMAU_FIELDS, "choices", problems):
        choices = record["choices"]
        if record["answer"] not in choices:
            problems.append(f"{name}: answer {record['answer']!r} is not one of the choices {choices!r}")
            continue
        category = record.get("category", [])
        questions.append(AudioQuestion(str(record["id"]), root / record["audio_id"], record["question"], list(choices),
                                       record["answer"],
                                       {"task": record["task"], "difficulty": record["difficulty"],
                                        "sub-category": record["sub-category"],
                                        "category": [category] if isinstance(category, str) else list(category)}))
    _raise_if(problems + check_audio_files(questions), path)
    return questions


def question_prompt(q: AudioQuestion) -> str:
    """The text that goes with the clip: the question, the choices, and the R1 answer format asked for."""
    options = "\n".join(f"- {choice}" for choice in q.choices)
    return (f"{q.question}\nOptions:\n{options}\nReason about the audio inside <think> </think>, then give the "
            "text of the one option you choose inside <answer> </answer>.")


def question_rows(questions: list[AudioQuestion]) -> list[dict]:
    """Dataset rows for TRL: a conversational ``prompt`` (the clip, then :func:`question_prompt`), the clip's path as
    ``audio``, and ``answer`` / ``choices`` for the rewards (:mod:`.answers`)."""
    return [{"id": q.id, "prompt": [{"role": "user", "content": [{"type": "audio"},
                                                                 {"type": "text", "text": question_prompt(q)}]}],
             "audio": str(q.audio), "answer": q.answer, "choices": list(q.choices)} for q in questions]


def accuracy_table(questions: list[AudioQuestion], correct: list[bool],
                   keys: tuple[str, ...] = ("task", "difficulty", "sub-category")) -> list[dict]:
    """Accuracy with its standard error (``sqrt(p (1 - p) / n)``, binomial) overall and per value of each ``keys``
    entry of ``info``: rows ``{"group", "value", "n", "accuracy", "se"}``. Unanswered items are wrong (``correct``
    False), as in MMAU's scoring."""
    if len(questions) != len(correct):
        raise ValueError(f"{len(questions)} questions but {len(correct)} results")

    def row(group, value, hits):
        n, p = len(hits), sum(hits) / len(hits)
        return {"group": group, "value": value, "n": n, "accuracy": p, "se": math.sqrt(p * (1 - p) / n)}

    rows = [row("all", "all", correct)]
    for key in keys:
        values = sorted({str(q.info.get(key, "")) for q in questions})
        for value in values:
            rows.append(row(key, value, [c for q, c in zip(questions, correct) if str(q.info.get(key, "")) == value]))
    return rows


def accuracy_markdown(rows: list[dict]) -> str:
    """:func:`accuracy_table`'s rows as a markdown table (accuracy and SE in %)."""
    lines = ["| group | value | n | accuracy (%) | ± SE |", "|---|---|---|---|---|"]
    lines += [f"| {r['group']} | {r['value']} | {r['n']} | {100 * r['accuracy']:.1f} | {100 * r['se']:.1f} |" for r in rows]
    return "\n".join(lines)
