"""Audio in TRL's GRPO: ADRPO-GRPO and GRPO for audio-language models (Qwen2.5-Omni thinker, Qwen2-Audio).

TRL's ``GRPOTrainer`` (1.16) has a path for images, none for audio. With an audio model and processor as they are,
generation sees the audio but the policy, old and reference log-probability forwards get none, and nothing stops a
sampled audio placeholder token. :class:`AudioGRPOMixin` adds the audio path with four small overrides:

- ``_generate_and_score_completions``: loads each row's waveform (column ``audio``: a file path, an Arrow list of
  samples or a decoded ``{"array", "sampling_rate"}`` dict; resampled to the feature extractor's rate) and, after TRL
  built the batch, adds the rows' ``input_features`` / ``feature_attention_mask`` to it; TRL shuffles and splits every
  batch-first tensor of that dict together, so the audio stays with its prompt.
- ``_tokenize_prompts``: one processor call on the prompt texts and the waveforms, which expands each audio
  placeholder to the clip's length and returns the features that TRL's generation passes to ``generate``.
- ``_get_per_token_logps_and_entropies``: every log-prob forward (old, reference and the policy's in the loss) gets
  the audio rows of its chunk of the batch, added to the model call's keyword arguments.
- ``_compute_loss``: hands the (shuffled, split) batch's audio rows to that forward.

Placeholder tokens (audio, and the image/video ones of an Omni model) are removed from the model's output
distribution itself: the LM head gets a fixed bias of -1e4 at their ids (a non-persistent buffer, so it is never
saved). Sampling and every trained log-probability then use the same distribution, renormalised over the other
tokens; suppressing them only at generation (TRL's ``suppress_tokens``) would train log-probs of a distribution that
still puts mass on tokens never sampled.
"""

from __future__ import annotations

import contextlib
import inspect

import torch
from trl import GRPOTrainer
from trl.trainer.utils import create_model_from_path

from .audio_data import load_waveform
from .trainer import ADRPOGRPOTrainer

AUDIO_INPUTS = ("input_features", "feature_attention_mask")
PLACEHOLDERS = ("audio_token_id", "image_token_id", "video_token_id")
SUPPRESSION_BIAS = -1.0e4

# What the overrides rely on in TRL's GRPOTrainer: these methods, with these leading parameters.
_TRL_SIGNATURES = {
    "_tokenize_prompts": ["self", "prompts"],
    "_generate_and_score_completions": ["self", "inputs"],
    "_get_per_token_logps_and_entropies": ["self", "model", "input_ids", "attention_mask", "logits_to_keep",
                                           "batch_size", "compute_entropy", "compute_aux_loss"],
    "_compute_loss": ["self", "model", "inputs"],
    "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "num_generations"],
}


def check_trl_signatures() -> None:
    """Fail loudly when a TRL release changes a method the audio overrides rely on: its leading parameters, or a new
    parameter without a default (which the overrides would not pass)."""
    changed = []
    for name, expected in _TRL_SIGNATURES.items():
        method = getattr(GRPOTrainer, name, None)
        params = list(inspect.signature(method).parameters.values()) if method else []
        found = [p.name for p in params]
        required_extra = [p.name for p in params[len(expected):]
                          if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if found[: len(expected)] != expected or required_extra:
            changed.append(f"GRPOTrainer.{name}: expected parameters {expected} (others optional), found {found}")
    if changed:
        raise RuntimeError("This TRL version changed what the audio GRPO trainer overrides:\n  " + "\n  ".join(changed))


def placeholder_token_ids(config) -> list[int]:
    """The model's multimodal placeholder token ids (audio, image, video), from its config."""
    ids = [getattr(config, name, None) for name in PLACEHOLDERS]
    return sorted({i for i in ids if isinstance(i, int)})


def suppress_in_lm_head(model, token_ids: list[int]) -> None:
    """Give ``model``'s LM head a fixed bias of ``SUPPRESSION_BIAS`` at ``token_ids`` (0 elsewhere), so that the
    model's next-token distribution is the one renormalised over the other tokens: p'(y) = p(y) / (1 - p(S)).

    The bias is a non-persistent buffer: it is not trained and never saved. A head that already has a bias keeps it,
    with the suppressed entries lowered."""
    head = model.get_output_embeddings()
    bias = torch.zeros(head.weight.shape[0], dtype=head.weight.dtype, device=head.weight.device)
    if head.bias is not None:
        bias = bias + head.bias.detach()
    bias[token_ids] = SUPPRESSION_BIAS
    if "bias" in head._parameters:
        del head._parameters["bias"]
    head.register_buffer("bias", bias, persistent=False)


def load_audio_model(name_or_path: str, **kwargs):
    """An audio-language model for text output. A full Qwen2.5-Omni checkpoint (thinker, talker, token2wav) gives its
    thinker alone, loaded without the speech output (``enable_audio_output=False``); any other checkpoint loads as
    TRL loads a model (the class its config names). ``kwargs`` go to ``from_pretrained`` (e.g. ``dtype``)."""
    from transformers import AutoConfig

    if AutoConfig.from_pretrained(name_or_path).model_type == "qwen2_5_omni":
        from transformers import Qwen2_5OmniForConditionalGeneration

        thinker = Qwen2_5OmniForConditionalGeneration.from_pretrained(name_or_path, enable_audio_output=False,
                                                                      **kwargs).thinker
        thinker.config._name_or_path = name_or_path  # where TRL and the evaluation find the processor
        return thinker
    return create_model_from_path(name_or_path, **kwargs)


def encode_audio_prompts(processor, prompts: list, waveforms: list, **chat_template_kwargs):
    """The processor's output for ``prompts`` (strings, or chat messages whose audio parts are ``{"type": "audio"}``)
    and their clips (float arrays at the feature extractor's rate), left-padded: each audio placeholder expanded to
    its clip's length, with ``input_features`` and ``feature_attention_mask``."""
    if isinstance(prompts[0], str):
        texts = prompts
    else:
        texts = [processor.apply_chat_template(p, tokenize=False, add_generation_prompt=True, **chat_template_kwargs)
                 for p in prompts]
    encoded = processor(text=texts, audio=waveforms, sampling_rate=processor.feature_extractor.sampling_rate,
                        return_tensors="pt", padding=True, padding_side="left")
    missing = [k for k in AUDIO_INPUTS if k not in encoded]
    if missing:
        raise RuntimeError(f"{type(processor).__name__} returned no {missing}: not an audio processor?")
    return encoded


@contextlib.contextmanager
def extra_forward_kwargs(module: torch.nn.Module, extra: dict):
    """Within the block, every call of ``module`` also receives the keyword arguments ``extra``."""
    handle = module.register_forward_pre_hook(lambda mod, args, kwargs: (args, {**kwargs, **extra}), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


class AudioGRPOMixin:
    """The audio path for a ``GRPOTrainer`` subclass (see the module docstring). ``processing_class`` must be the
    model's processor (``AutoProcessor``: a tokenizer and a feature extractor); the dataset's ``audio_column`` holds
    each prompt's clip. Generation with vLLM or transformers' continuous batching is not supported."""

    def __init__(self, *args, audio_column: str = "audio", **kwargs):
        check_trl_signatures()
        self.audio_column = audio_column
        self._pending_audio = None  # the waveforms of the batch being generated
        self._audio_rows = None  # the audio inputs of the rows the next log-prob forwards score
        if args:
            kwargs["model"], args = args[0], args[1:]
        model = kwargs["model"]
        if isinstance(model, str):  # loaded here, to reach its config before TRL's __init__ does
            config = kwargs.get("args")
            kwargs["model"] = model = load_audio_model(model, **dict(getattr(config, "model_init_kwargs", None) or {}))
        added = None
        if not hasattr(model.config, "image_token_id"):
            # TRL's __init__ reads config.image_token_id for suppress_tokens; an audio-only model (Qwen2-Audio) has
            # none: answer with the audio token for that call (the LM-head bias below does the suppressing)
            added = model.config.image_token_id = model.config.audio_token_id
        try:
            super().__init__(*args, **kwargs)
        finally:
            if added is not None:
                del model.config.image_token_id
        args_ = self.args
        if args_.use_vllm or args_.use_transformers_continuous_batching:
            raise ValueError("The audio GRPO trainer generates with transformers' generate: set use_vllm and "
                             "use_transformers_continuous_batching to false.")
        if not hasattr(self.processing_class, "feature_extractor"):
            raise TypeError(f"The audio GRPO trainer needs the model's processor (a tokenizer and a feature "
                            f"extractor), got {type(self.processing_class).__name__}")
        self.sampling_rate = self.processing_class.feature_extractor.sampling_rate
        unwrapped = self.accelerator.unwrap_model(self.model)
        self.suppressed_tokens = placeholder_token_ids(unwrapped.config)
        for model_ in (unwrapped, self.ref_model):
            if model_ is not None:
                suppress_in_lm_head(model_, self.suppressed_tokens)
        self.generation_config.suppress_tokens = self.suppressed_tokens
        self.generation_kwargs["suppress_tokens"] = self.suppressed_tokens

    def _waveforms(self, rows: list[dict]) -> list:
        """Each row's clip at the feature extractor's rate."""
        return [load_waveform(row[self.audio_column], self.sampling_rate) for row in rows]

    def _generate_and_score_completions(self, inputs):
        self._pending_audio = self._waveforms(inputs)
        try:
            output = super()._generate_and_score_completions(inputs)
            output.update(self._audio_rows)
        finally:
            self._pending_audio = self._audio_rows = None
        return output

    def encode(self, prompts: list, waveforms: list):
        """:func:`encode_audio_prompts` with this trainer's processor and chat-template arguments, on its device."""
        return encode_audio_prompts(self.processing_class, prompts, waveforms,
                                    **self.chat_template_kwargs).to(self.accelerator.device)

    def generation_inputs(self, rows: list[dict]) -> dict:
        """``generate``'s inputs for dataset rows (their prompts and clips), as the training rollouts get them."""
        return dict(self.encode([row["prompt"] for row in rows], self._waveforms(rows)))

    def _tokenize_prompts(self, prompts: list):
        if self._pending_audio is None or len(self._pending_audio) != len(prompts):
            raise RuntimeError("the audio GRPO trainer tokenizes prompts only with their batch's waveforms")
        encoded = self.encode(prompts, self._pending_audio)
        prompt_ids = [ids[mask.bool()].tolist() for ids, mask in zip(encoded["input_ids"], encoded["attention_mask"])]
        self._audio_rows = {k: encoded[k] for k in AUDIO_INPUTS}
        return prompt_ids, None, dict(self._audio_rows)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        audio = self._audio_rows
        if audio is None:
            raise RuntimeError("an audio GRPO log-prob forward without the batch's audio inputs")
        rows = input_ids.size(0)
        if any(v.size(0) != rows for v in audio.values()):
            raise RuntimeError(f"audio inputs for {[v.size(0) for v in audio.values()]} rows, the batch has {rows}")
        batch_size = batch_size or rows
        logps, entropies, aux = [], [], []
        for start in range(0, rows, batch_size):
            end = min(start + batch_size, rows)
            with extra_forward_kwargs(model, {k: v[start:end] for k, v in audio.items()}):
                chunk = super()._get_per_token_logps_and_entropies(
                    model, input_ids[start:end], attention_mask[start:end], logits_to_keep,
                    compute_entropy=compute_entropy, compute_aux_loss=compute_aux_loss, **multimodal)
            logps.append(chunk[0])
            entropies.append(chunk[1])
            aux.append(chunk[2])
        return (torch.cat(logps), torch.cat(entropies) if compute_entropy else None,
                torch.stack(aux).mean() if compute_aux_loss else None)

    def _compute_loss(self, model, inputs):
        self._audio_rows = {k: inputs[k] for k in AUDIO_INPUTS}
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._audio_rows = None


class AudioGRPOTrainer(AudioGRPOMixin, GRPOTrainer):
    """TRL's GRPO for audio-language models."""


class AudioADRPOGRPOTrainer(AudioGRPOMixin, ADRPOGRPOTrainer):
    """ADRPO-GRPO (per-completion KL coefficient ``beta0 - clip(A)``) for audio-language models."""
