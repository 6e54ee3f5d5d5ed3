"""Audio multiple-choice data and rewards: AVQA and MMAU loaders on small files in their formats with real wav
files, MMAU's matching rule, the R1 format and accuracy rewards, the accuracy table with its standard errors."""

import json
import math

import numpy as np
import pytest

soundfile = pytest.importorskip("soundfile")

from adrpo_diffusion.llm.answers import accuracy_reward, extract_answer, format_reward, string_match  # noqa: E402
from adrpo_diffusion.llm.audio_data import (  # noqa: E402
    AudioDataError,
    accuracy_markdown,
    accuracy_table,
    load_avqa,
    load_mmau,
    load_waveform,
    question_prompt,
)


def tone(seconds: float, rate: int, hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (0.5 * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def write_wav(path, samples, rate):
    path.parent.mkdir(parents=True, exist_ok=True)
    soundfile.write(str(path), samples, rate)
    return path


def avqa_record(i, video, relation="Sound", answer=1, **changes):
    record = {"id": i, "video_name": video, "video_id": 100 + i, "question_text": f"What makes the sound {i}?",
              "multi_choice": ["a dog", "a car engine", "a violin", "rain"], "answer": answer,
              "question_relation": relation, "question_type": "Which"}
    return record | changes


def test_load_avqa_maps_videos_to_wavs_drops_view_questions(tmp_path):
    audio = tmp_path / "audio"
    write_wav(audio / "vid_a.wav", tone(0.5, 16000), 16000)
    write_wav(audio / "vid_b.wav", tone(0.5, 16000), 16000)
    records = [avqa_record(1, "vid_a"), avqa_record(2, "vid_b", relation="View"), avqa_record(3, "vid_b", "Both", 3)]
    (tmp_path / "train_qa.json").write_text(json.dumps(records))
    questions = load_avqa(tmp_path / "train_qa.json", audio)
    assert [q.id for q in questions] == ["1", "3"]
    assert questions[0].audio == audio / "vid_a.wav" and questions[0].answer == "a car engine"
    assert questions[1].answer == "rain" and questions[1].info["relation"] == "Both"
    assert "a violin" in question_prompt(questions[0]) and "<answer>" in question_prompt(questions[0])


def test_load_avqa_names_every_bad_record_and_audio_file(tmp_path):
    audio = tmp_path / "audio"
    write_wav(audio / "ok.wav", tone(0.2, 16000), 16000)
    (audio / "broken.wav").write_bytes(b"not a wav file at all")
    records = [avqa_record(1, "ok"), avqa_record(2, "missing"), avqa_record(3, "broken"),
               {"id": 4, "video_name": "ok"}, avqa_record(5, "ok", answer=7), avqa_record(6, "ok", multi_choice="abc")]
    (tmp_path / "qa.json").write_text(json.dumps(records))
    with pytest.raises(AudioDataError) as error:
        load_avqa(tmp_path / "qa.json", audio)
    message = str(error.value)
    assert "5 problem(s)" in message and str(tmp_path / "qa.json") in message
    assert f"id 2: audio {audio / 'missing.wav'}: no such file" in message
    assert f"id 3: audio {audio / 'broken.wav'}: unreadable" in message
    assert "record 3 (id 4): missing question_text, multi_choice, answer, question_relation" in message
    assert "record 4 (id 5): answer must be an index into multi_choice (0..3), got 7" in message
    assert "record 5 (id 6): multi_choice must be a list" in message


def test_load_files_that_are_not_records(tmp_path):
    with pytest.raises(AudioDataError, match="no such file"):
        load_mmau(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(AudioDataError, match="not valid JSON"):
        load_mmau(tmp_path / "bad.json")
    (tmp_path / "dict.json").write_text("{}")
    with pytest.raises(AudioDataError, match="expected a JSON list of records, got dict"):
        load_avqa(tmp_path / "dict.json", tmp_path)


def mmau_record(i, task, difficulty, sub, category="Sound Events"):
    return {"id": f"q{i}", "audio_id": f"./test-mini-audios/clip{i}.wav", "question": "Which instrument plays?",
            "choices": ["Piano", "Acoustic guitar", "Drums", "Flute"], "answer": "Acoustic guitar", "dataset": "x",
            "task": task, "split": "test-mini", "category": category, "sub-category": sub, "difficulty": difficulty}


def test_load_mmau_resolves_audio_and_normalises_category(tmp_path):
    for i in range(2):
        write_wav(tmp_path / "test-mini-audios" / f"clip{i}.wav", tone(0.3, 22050), 22050)
    records = [mmau_record(0, "music", "easy", "Instrument"), mmau_record(1, "sound", "hard", "Counting", ["A", "B"])]
    (tmp_path / "mmau-test-mini.json").write_text(json.dumps(records))
    questions = load_mmau(tmp_path / "mmau-test-mini.json")
    assert questions[0].audio == tmp_path / "test-mini-audios" / "clip0.wav"
    assert questions[0].info == {"task": "music", "difficulty": "easy", "sub-category": "Instrument",
                                 "category": ["Sound Events"]}
    assert questions[1].info["category"] == ["A", "B"]
    records[1]["answer"] = "Violin"
    del records[0]["difficulty"]
    (tmp_path / "bad.json").write_text(json.dumps(records))
    with pytest.raises(AudioDataError, match=r"(?s)record 0 \(id q0\): missing difficulty.*record 1 \(id q1\): answer "
                                             r"'Violin' is not one of the choices"):
        load_mmau(tmp_path / "bad.json", audio_root=tmp_path)


def test_load_waveform_resamples_mixes_channels_and_takes_arrow_lists(tmp_path):
    seconds, hz = 0.5, 440.0
    stereo = np.stack([tone(seconds, 8000, hz), tone(seconds, 8000, hz)], axis=1)
    path = write_wav(tmp_path / "tone.wav", stereo, 8000)  # 16-bit PCM at 8 kHz, two channels
    samples = load_waveform(path, 16000)
    assert samples.dtype == np.float32 and samples.shape == (int(seconds * 16000),)
    middle = slice(1000, 7000)  # away from the resampler's edges
    np.testing.assert_allclose(samples[middle], tone(seconds, 16000, hz)[middle], atol=2e-3)
    as_list = tone(0.1, 16000).tolist()  # how Arrow hands back a stored waveform
    np.testing.assert_array_equal(load_waveform(as_list, 16000), tone(0.1, 16000))
    decoded = {"array": tone(0.1, 8000), "sampling_rate": 8000}
    assert load_waveform(decoded, 16000).shape == (1600,)
    with pytest.raises(AudioDataError, match="non-empty 1-D"):
        load_waveform([], 16000)


@pytest.mark.parametrize("prediction, expected", [
    ("Acoustic guitar", True), ("the acoustic guitar", True), ("ACOUSTIC GUITAR!", True), ("guitar", False),
    ("acoustic guitar or piano", False), ("", False), ("drums", False)])
def test_string_match_follows_mmau(prediction, expected):
    assert string_match("Acoustic guitar", prediction, ["Piano", "Acoustic guitar", "Drums", "Flute"]) is expected


def test_string_match_ignores_words_shared_with_the_answer():
    choices = ["a dog barking", "a dog howling"]
    assert string_match("a dog barking", "I hear a dog that is barking", choices)
    assert not string_match("a dog barking", "dog barking", choices)  # every answer word is needed, "a" too
    assert not string_match("a dog barking", "a dog barking then howling", choices)


def test_rewards_in_trl_form():
    good = "<think>low hum, then strings</think> <answer>Acoustic guitar</answer>"
    completions = [good, "<answer>Piano</answer>", "Acoustic guitar", [{"role": "assistant", "content": good}],
                   "<think>a</think><answer>x</answer><answer>Drums</answer>", "<think><think>x</think><answer>y</answer>"]
    choices = [["Piano", "Acoustic guitar", "Drums"]] * len(completions)
    answers = ["Acoustic guitar"] * len(completions)
    assert accuracy_reward(completions, answer=answers, choices=choices, prompts=[""] * 6) == [1, 0, 0, 1, 0, 0]
    assert format_reward(completions) == [1, 0, 0, 1, 0, 0]
    assert extract_answer("<answer> a </answer> then <answer> b </answer>") == "b"
    assert extract_answer("no tags") is None


def test_accuracy_table_counts_and_binomial_se(tmp_path):
    for i in range(4):
        write_wav(tmp_path / "test-mini-audios" / f"clip{i}.wav", tone(0.1, 16000), 16000)
    records = [mmau_record(0, "music", "easy", "A"), mmau_record(1, "music", "hard", "A"),
               mmau_record(2, "sound", "easy", "B"), mmau_record(3, "speech", "easy", "B")]
    (tmp_path / "m.json").write_text(json.dumps(records))
    questions = load_mmau(tmp_path / "m.json")
    rows = accuracy_table(questions, [True, False, True, True])
    by = {(r["group"], r["value"]): r for r in rows}
    assert by["all", "all"]["n"] == 4 and by["all", "all"]["accuracy"] == 0.75
    assert math.isclose(by["all", "all"]["se"], math.sqrt(0.75 * 0.25 / 4))
    assert by["task", "music"]["accuracy"] == 0.5 and by["task", "speech"]["se"] == 0.0
    assert by["difficulty", "easy"]["n"] == 3 and by["sub-category", "B"]["accuracy"] == 1.0
    assert "| task | music | 2 | 50.0 | 35.4 |" in accuracy_markdown(rows)
    with pytest.raises(ValueError, match="4 questions but 3 results"):
        accuracy_table(questions, [True] * 3)
