"""The offline audio demo's pieces: a tiny randomly initialised Qwen2.5-Omni thinker with its processor (a
character-level tokenizer carrying the Omni special tokens, a 16-band Whisper feature extractor), built locally,
and a synthetic audio multiple-choice task whose answer is in the audio alone.

The task ("pitch"): a clip of 0.3 to 0.6 s holds one tone, low (200-400 Hz), middle (800-1200 Hz) or high
(2500-3500 Hz), at a random loudness, with noise; the text asks ``pitch?`` and the model answers with one character,
``a`` (low), ``b`` (middle) or ``c`` (high). The reward (and the held-out accuracy) is 1 for the right character.
Every prompt's text is the same, so any accuracy above 1/3 comes from the audio.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..utils import cached_build

TINY_OMNI = "builtin:tiny-omni-thinker"
AUDIO_PITCH = "builtin:audio-pitch"
SAMPLING_RATE = 16000
PITCH_BANDS = {"a": (200.0, 400.0), "b": (800.0, 1200.0), "c": (2500.0, 3500.0)}  # answer: low, middle, high
QUESTION = "pitch?"
SPECIAL_TOKENS = {"audio_token": "<|AUDIO|>", "audio_bos_token": "<|audio_bos|>", "audio_eos_token": "<|audio_eos|>",
                  "image_token": "<|IMAGE|>", "video_token": "<|VIDEO|>", "vision_bos_token": "<|vision_bos|>",
                  "vision_eos_token": "<|vision_eos|>"}
CHARACTERS = "abc?hiptc"
# One user turn: its audio clips and text in order, then the assistant's turn opens.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}{% if part['type'] == 'audio' %}<|audio_bos|><|AUDIO|>"
    "<|audio_eos|>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>{% endif %}"
)


def tiny_omni_processor():
    """A ``Qwen2_5OmniProcessor`` made locally: one token per character of ``CHARACTERS``, the Omni special tokens,
    and a Whisper feature extractor with 16 mel bands over clips of up to 2 s."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, Qwen2_5OmniProcessor, Qwen2VLImageProcessor, WhisperFeatureExtractor
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    tokens = ["<pad>", "<|im_start|>", "<|im_end|>", *SPECIAL_TOKENS.values(), *dict.fromkeys(CHARACTERS)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<|im_end|>",
                                        extra_special_tokens=SPECIAL_TOKENS)
    extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=SAMPLING_RATE, hop_length=160, chunk_length=2,
                                        n_fft=400)
    return Qwen2_5OmniProcessor(image_processor=Qwen2VLImageProcessor(), video_processor=Qwen2VLVideoProcessor(),
                                feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)


def _save(target, model_class, config, processor, seed: int) -> Path:
    """A model of ``model_class`` randomly initialised from ``seed``, generating with the processor's pad and end
    tokens, saved with ``processor`` into ``target``."""
    import torch

    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    model.save_pretrained(target)
    processor.save_pretrained(target)
    return Path(target)


def build_tiny_omni(target: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised Qwen2.5-Omni thinker (audio encoder, a one-block vision encoder, a 2-layer text
    model with multimodal RoPE; about 54k parameters) and its processor into ``target``."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    processor = tiny_omni_processor()
    tokenizer = processor.tokenizer
    ids = tokenizer.convert_tokens_to_ids
    config = Qwen2_5OmniThinkerConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                          output_dim=32, n_window=50, max_source_positions=1500),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[0]),
        text_config=dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]},
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
        audio_token_id=tokenizer.audio_token_id, image_token_id=tokenizer.image_token_id,
        video_token_id=tokenizer.video_token_id, audio_start_token_id=ids("<|audio_bos|>"),
        audio_end_token_id=ids("<|audio_eos|>"), vision_start_token_id=ids("<|vision_bos|>"),
        vision_end_token_id=ids("<|vision_eos|>"),
    )
    return _save(target, Qwen2_5OmniThinkerForConditionalGeneration, config, processor, seed)


def build_tiny_qwen2_audio(target: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised Qwen2-Audio (Whisper-style encoder over 30 s of 16 mel bands, 2-layer Qwen2) with
    a ``Qwen2AudioProcessor`` of the same tokenizer and chat template into ``target`` (the audio-only model: no
    image token in its config)."""
    from transformers import Qwen2AudioConfig, Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, WhisperFeatureExtractor

    tokenizer = tiny_omni_processor().tokenizer
    extractor = WhisperFeatureExtractor(feature_size=16, sampling_rate=SAMPLING_RATE, hop_length=160, chunk_length=30,
                                        n_fft=400)
    processor = Qwen2AudioProcessor(feature_extractor=extractor, tokenizer=tokenizer, chat_template=CHAT_TEMPLATE)
    config = Qwen2AudioConfig(
        audio_config=dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16,
                          max_source_positions=1500),
        text_config=dict(model_type="qwen2", vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id),
        audio_token_id=tokenizer.audio_token_id)
    return _save(target, Qwen2AudioForConditionalGeneration, config, processor, seed)


def tiny_omni_path() -> str:
    """The built-in tiny Omni thinker's directory in the cache (built once, whole, then renamed into place)."""
    return cached_build("tiny-omni-thinker", "processor_config.json", build_tiny_omni)


def pitch_clip(answer: str, rng: np.random.Generator) -> np.ndarray:
    """One clip of the pitch task for ``answer`` (a key of ``PITCH_BANDS``), float32 at ``SAMPLING_RATE``."""
    low, high = PITCH_BANDS[answer]
    n = int(SAMPLING_RATE * rng.uniform(0.3, 0.6))
    t = np.arange(n) / SAMPLING_RATE
    tone = rng.uniform(0.05, 0.5) * np.sin(2 * np.pi * rng.uniform(low, high) * t + rng.uniform(0, 2 * np.pi))
    return (tone + 0.01 * rng.standard_normal(n)).astype(np.float32)


def pitch_rows(num_rows: int, seed: int = 0) -> list[dict]:
    """``num_rows`` rows of the pitch task (answers cycling a, b, c): a conversational ``prompt`` (the clip, then
    the question), the ``audio`` samples, the ``answer`` character and the ``choices``."""
    rng = np.random.default_rng(seed)
    answers = list(PITCH_BANDS)
    rows = []
    for i in range(num_rows):
        answer = answers[i % len(answers)]
        rows.append({"prompt": [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": QUESTION}]}],
                     "audio": pitch_clip(answer, rng), "answer": answer, "choices": answers})
    return rows


def pitch_reward(completions: list, answer: list[str], **kwargs) -> list[float]:
    """1.0 per completion whose first character is the right answer, else 0.0 (string or chat completions)."""
    from .answers import completion_text

    return [float(completion_text(c)[:1] == a) for c, a in zip(completions, answer, strict=True)]
