import json

import pytest

from adrpo_diffusion.prompts import PromptFileError, PromptSampler, load_prompts


def test_prompt_file_formats(tmp_path):
    (tmp_path / "p.txt").write_text("# comment\na red apple\n\n  a blue car  \n")
    (tmp_path / "p.csv").write_text('prompt,category\n"a red apple, shiny",Colors\na blue car,Colors\n')
    lines = [json.dumps({"prompt": "a red apple"}), "", json.dumps({"prompt": "a blue car"})]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    assert load_prompts(tmp_path / "p.txt") == ["a red apple", "a blue car"]
    assert load_prompts(tmp_path / "p.csv") == ["a red apple, shiny", "a blue car"]
    assert load_prompts(tmp_path / "p.jsonl") == ["a red apple", "a blue car"]


def test_shipped_prompt_files_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "prompts"
    assert len(load_prompts(root / "drawbench.csv")) == 200
    assert len(load_prompts(root / "styles.txt")) >= 20
    assert len(load_prompts(root / "colors.txt")) >= 8


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.txt", "# only a comment\n\n", "contains no prompts"),
        ("bad.jsonl", '{"prompt": "ok"}\n{not json}\n', r"bad.jsonl:2: not valid JSON"),
        ("nofield.jsonl", '{"text": "x"}\n', r"nofield.jsonl:1: .*'prompt'"),
        ("nocol.csv", "text\nx\n", "'prompt' column"),
        ("p.docx", "x", "unknown prompt file type"),
    ],
)
def test_malformed_prompt_files(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(PromptFileError, match=message):
        load_prompts(tmp_path / name)


def test_missing_prompt_file(tmp_path):
    with pytest.raises(PromptFileError, match="does not exist"):
        load_prompts(tmp_path / "nope.txt")


def test_sampler_covers_each_epoch_and_resumes_exactly():
    sampler = PromptSampler(5, seed=3)
    first = sampler.draw(5)
    assert sorted(first) == list(range(5))  # one epoch = a permutation
    sampler.draw(3)
    state = sampler.state_dict()
    continued = sampler.draw(9)
    resumed = PromptSampler(5, seed=3)
    resumed.load_state_dict(state)
    assert resumed.draw(9) == continued
    with pytest.raises(ValueError, match="same prompt file"):
        PromptSampler(6, seed=3).load_state_dict(state)
