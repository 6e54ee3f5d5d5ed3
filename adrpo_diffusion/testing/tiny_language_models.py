"""Tiny language models for the offline LLM and audio demos and their tests, built locally with seeded random
weights and saved with ``save_pretrained``:

- ``builtin:tiny-char-lm`` (:func:`build_tiny_lm`): a 2-layer Qwen2 with a character-level tokenizer for the
  first-letter task (:mod:`adrpo_diffusion.tasks.first_letter`);
- ``builtin:tiny-omni-thinker`` (:func:`build_tiny_omni`): a Qwen2.5-Omni thinker with its processor (a
  character-level tokenizer carrying the Omni special tokens, a 16-band Whisper feature extractor) for the pitch
  task (:mod:`adrpo_diffusion.tasks.pitch`);
- :func:`build_tiny_qwen2_audio`: a Qwen2-Audio of the same tokenizer, for the tests.
"""

from __future__ import annotations

from pathlib import Path

from ..tasks.first_letter import LETTERS
from ..tasks.pitch import SAMPLING_RATE

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


def first_letter_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character of the first-letter task (``LETTERS + "="``),
    made locally."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<eos>"] + list(LETTERS + "="))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def build_tiny_lm(target: str | Path, seed: int = 0) -> Path:
    """Save a randomly initialised 2-layer Qwen2 (about 0.1M parameters) and its tokenizer into ``target``."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = first_letter_tokenizer()
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=64, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    return Path(target)


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

    with torch.random.fork_rng(devices=[]):  # the global RNG is left as it was
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
