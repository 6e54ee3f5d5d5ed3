"""What every model family provides, and the parts they share.

A :class:`ModelFamily` wraps one loaded diffusers pipeline and owns everything that depends on the family: the
prompt encoding (:class:`PromptCache`), rollouts to final latents with the family's guidance, decoding, the
velocity call and the flow-matching pair in the family's time/sign and latent convention, the reference pass
with the adapters off (:func:`adapters_off`), and LoRA export in the family's diffusers format. Nothing outside
``families/`` knows a transformer's call signature.

Latents. Every method takes and returns latents as ``(N, C, h, w)`` tensors in the family's latent space (the VAE
latent scaled, and shifted where the family shifts): what the pipeline returns with ``output_type="latent"``,
unpacked where the family packs (FLUX). Packing, position ids and masks happen inside :meth:`ModelFamily.velocity`.

Time and sign. All three families follow rectified flow in diffusers' convention: with the paper's ``t`` (``t = 1``
data), ``sigma = 1 - t``, the transformer input ``x_sigma = (1 - sigma) x1 + sigma x0`` and the target
``x0 - x1 = -u_t`` (:func:`adrpo_diffusion.losses.flow_sample`). They differ in the timestep the
transformer is given (:meth:`ModelFamily.timestep`), stated in each family's docstring.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ..utils import umask_permissions


@contextlib.contextmanager
def adapters_off(transformer):
    """The base model: ``transformer`` (unwrapped, carrying LoRA) with its adapters switched off for the duration
    (no second copy of the weights), on again afterwards whatever happens."""
    transformer.disable_adapters()
    try:
        yield transformer
    finally:
        transformer.enable_adapters()


def round_stochastic(x: torch.Tensor, dtype: torch.dtype, generator: torch.Generator | None = None) -> torch.Tensor:
    """``x`` rounded to ``dtype`` without bias for bfloat16: ``E[result] = x``. A bfloat16 is the top 16 bits of a
    float32, so adding uniform random low 16 bits to the float32's bits before cutting them off rounds the magnitude
    up with probability equal to the discarded fraction. Other dtypes round to nearest."""
    if dtype != torch.bfloat16:
        return x.to(dtype)
    bits = x.to(torch.float32).contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((bits + noise) & -(1 << 16)).view(torch.float32).to(torch.bfloat16)


class MergedLoRA:
    """Rollouts with the LoRA folded into the base weights: one matmul per adapted layer instead of three (and no
    extra read of the activations) in every forward of a rollout.

    Inside ``with merged(generator):`` each adapted layer's weight is ``W0 + s B A``, computed in float32 and rounded
    to the weight's dtype (:func:`round_stochastic`: without bias for bfloat16, where a delta below half a bfloat16
    step of ``W0`` -- the rule early in training -- would otherwise round away and the rollouts would sample the
    base model), and the LoRA branches are off. On exit ``W0`` is restored bitwise from a copy taken once (the base
    is frozen), so the training step sees exactly the unmerged model. The copy costs the adapted layers' base
    weights once more in memory (SD3-medium, default targets: 0.9 GB in bf16)."""

    def __init__(self, transformer):
        from peft.tuners.lora import LoraLayer

        self.transformer = transformer
        self.layers = [m for m in transformer.modules() if isinstance(m, LoraLayer)]
        if not self.layers:
            raise ValueError("MergedLoRA: the transformer carries no LoRA layers")
        self.originals = [layer.get_base_layer().weight.detach().clone() for layer in self.layers]

    @contextlib.contextmanager
    def __call__(self, generator: torch.Generator | None = None):
        with torch.no_grad():
            for layer, w0 in zip(self.layers, self.originals):
                weight = layer.get_base_layer().weight
                delta = sum(layer.get_delta_weight(name).float() for name in layer.active_adapters)
                weight.copy_(round_stochastic(w0.float() + delta, weight.dtype, generator))
        try:
            with adapters_off(self.transformer):
                yield self.transformer
        finally:
            with torch.no_grad():
                for layer, w0 in zip(self.layers, self.originals):
                    layer.get_base_layer().weight.copy_(w0)


class AdapterCopies:
    """Moving copies of the policy's LoRA as extra adapters on the same transformer (never a second copy of the base
    weights: each costs one LoRA, in float32): DiffusionNFT's old policy, AWM's and ADRPO's EMA anchor.

    Each copy is an adapter of the policy's shape named after it, started equal to the policy and updated by
    :meth:`update` (``copy = d copy + (1 - d) policy``). ``with copies.active(name):`` runs the transformer with that
    adapter instead of the policy's. ``state_dict``/``load_state_dict`` make them part of a checkpoint (the trainer's
    ``trainer_state.pt``)."""

    def __init__(self, transformer, lora_config, names, policy: str = "default"):
        import copy

        self.transformer, self.policy = transformer, policy
        for name in names:
            with warnings.catch_warnings():  # PEFT warns that a second adapter joins the first: intended here
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                transformer.add_adapter(copy.deepcopy(lora_config), adapter_name=name)  # activates it
        transformer.set_adapter(policy)  # the policy's adapter trainable again, the copies frozen
        params = dict(transformer.named_parameters())
        self.pairs = {name: [(params[key.replace(f".{name}.", f".{policy}.")], p.requires_grad_(False))
                             for key, p in params.items() if f".{name}." in key] for name in names}
        for name, pairs in self.pairs.items():
            if not pairs:
                raise ValueError(f"AdapterCopies: no parameters of adapter {name!r}")
            for _, param in pairs:
                param.data = param.data.float()
        self.reset()

    @torch.no_grad()
    def reset(self) -> None:
        """Every copy equal to the policy."""
        for pairs in self.pairs.values():
            for source, target in pairs:
                target.copy_(source)

    @torch.no_grad()
    def update(self, name: str, decay: float) -> None:
        """``copy = decay * copy + (1 - decay) * policy``."""
        for source, target in self.pairs[name]:
            target.mul_(decay).add_(source.detach().float(), alpha=1.0 - decay)

    @contextlib.contextmanager
    def active(self, name: str):
        """The transformer runs with the copy ``name`` (the policy's adapter inactive) for the duration."""
        self.transformer.set_adapter(name)
        try:
            yield self.transformer
        finally:
            self.transformer.set_adapter(self.policy)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {f"{name}/{i}": target.detach().clone() for name, pairs in self.pairs.items()
                for i, (_, target) in enumerate(pairs)}

    @torch.no_grad()
    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        expected = self.state_dict().keys()
        if state.keys() != expected:
            raise ValueError(f"adapter copies in the checkpoint ({sorted(state)[:3]}...) do not match this run's "
                             f"({sorted(expected)[:3]}...)")
        for name, pairs in self.pairs.items():
            for i, (_, target) in enumerate(pairs):
                target.copy_(state[f"{name}/{i}"])


@dataclass
class PromptCache:
    """Every prompt encoded once (kept on the CPU), plus the empty prompt (for classifier-free guidance): named
    tensors with one row per prompt; which names depends on the family (e.g. SD3: ``embeds``, ``pooled``)."""

    tensors: dict[str, torch.Tensor]
    negative: dict[str, torch.Tensor]  # the same names, one row

    def select(self, indices: list[int], device, dtype) -> dict[str, torch.Tensor]:
        """The rows of ``indices``; floating tensors in ``dtype`` (masks keep theirs)."""
        index = torch.as_tensor(indices, dtype=torch.long)
        return {k: _to(v[index], device, dtype) for k, v in self.tensors.items()}

    def negatives(self, n: int, device, dtype) -> dict[str, torch.Tensor]:
        """The empty prompt's tensors repeated ``n`` times (a broadcast view)."""
        return {k: _to(v, device, dtype).expand(n, *v.shape[1:]) for k, v in self.negative.items()}


def _to(tensor: torch.Tensor, device, dtype) -> torch.Tensor:
    return tensor.to(device, dtype) if tensor.is_floating_point() else tensor.to(device)


def absent_components(path: str) -> dict:
    """Components a local pipeline was saved without (``[null, null]`` in its model_index.json, e.g. the tiny
    SD3's T5): ``from_pretrained`` needs them passed as None explicitly."""
    index = Path(path) / "model_index.json"
    if not index.is_file():
        return {}
    return {name: None for name, value in json.loads(index.read_text()).items()
            if isinstance(value, list) and value[0] is None}


def add_lora(transformer, rank: int, alpha: float, target_modules, init_weights=True):
    """Attach a LoRA adapter in place (diffusers' ``add_adapter``, no PeftModel wrapper) and return its config."""
    from peft import LoraConfig

    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=init_weights)
    transformer.add_adapter(config)
    return config


def lora_metadata(config) -> dict:
    """The LoraConfig as the plain dict diffusers stores next to the weights (so alpha loads correctly)."""
    meta = config.to_dict()
    meta["target_modules"] = sorted(meta["target_modules"])  # a set in PEFT; JSON needs a list
    return json.loads(json.dumps(meta, default=str))


class ModelFamily(abc.ABC):
    """One family's conventions around a loaded pipeline (``self.pipe``). Subclasses set the class attributes and
    implement :meth:`_encode`, :meth:`_rollout`, :meth:`timestep` and :meth:`velocity`; the rest is shared.

    ``guidance_scale`` is the family's guidance of the rollouts and of the velocity: SD3 and SANA use it as true
    classifier-free guidance in the rollouts (1 disables it) and train the conditional velocity; guidance-distilled
    FLUX.1-dev feeds it to the transformer's guidance embedding in the rollouts AND in the loss (the policy is the
    velocity at that guidance); FLUX.1-schnell has no guidance.
    """

    name: ClassVar[str]
    pipeline_class: ClassVar[str]  # the diffusers pipeline class; also the one detected from model_index.json
    text_encoders: ClassVar[tuple[str, ...]]  # pipeline components freed once the prompts are cached
    lora_targets: ClassVar[tuple[str, ...]]  # default LoRA target modules of the transformer
    repeated_blocks: ClassVar[tuple[str, ...]]  # class names of the transformer's repeated blocks (compiled one by one)
    options: ClassVar[dict[str, str]] = {}  # family-specific load options and their help

    def __init__(self, pipe, guidance_scale: float = 1.0):
        self.pipe = pipe
        self.guidance_scale = float(guidance_scale)
        self.config = pipe.transformer.config  # read here: the transformer may later be compiled or wrapped

    # ---------------------------------------------------------------------------------------------- loading
    @classmethod
    def pipeline_cls(cls):
        import diffusers

        return getattr(diffusers, cls.pipeline_class)

    @classmethod
    def load(cls, path: str, dtype: torch.dtype = torch.float32, guidance_scale: float = 1.0, load_kwargs=None,
             **options) -> ModelFamily:
        """The family around ``pipeline_class.from_pretrained(path)``; ``options``: the family's own (see
        :attr:`options`), ``load_kwargs``: extra keyword arguments of ``from_pretrained``."""
        unknown = sorted(k for k, v in options.items() if k not in cls.options and v)
        if unknown:
            valid = ", ".join(cls.options) or "none"
            raise ValueError(f"{', '.join(unknown)}: not an option of the {cls.name} family (its options: {valid}).")
        kwargs = {**absent_components(path), **cls.load_options(**options), **(load_kwargs or {})}
        return cls(cls.pipeline_cls().from_pretrained(path, dtype=dtype, **kwargs), guidance_scale)

    @classmethod
    def load_options(cls, **options) -> dict:
        """``from_pretrained`` keyword arguments for the family's options."""
        return {}

    def modules(self) -> list[torch.nn.Module]:
        """Every model of the pipeline (transformer, VAE, text encoders still loaded)."""
        return [m for m in self.pipe.components.values() if isinstance(m, torch.nn.Module)]

    @property
    def transformer(self):
        return self.pipe.transformer

    def add_lora(self, rank: int, alpha: float, target_modules=None, init_weights=True):
        """:func:`add_lora` on this family's transformer; ``target_modules`` defaults to :attr:`lora_targets`."""
        return add_lora(self.transformer, rank, alpha, target_modules or self.lora_targets, init_weights)

    def compile_repeated_blocks(self, **compile_options) -> int:
        """Regional compilation: ``torch.compile`` every block of :attr:`repeated_blocks` in place, for every call
        (rollouts, reference and policy passes). The blocks of one kind share their graphs, so compiling costs one
        block, not the whole transformer, and a recompilation (a new batch size makes the batch dimension symbolic;
        adapters on/off and grad/no-grad are one graph each) costs as little. Diffusers'
        ``compile_repeated_blocks`` does the same, but its SD3 and SANA transformers do not list their blocks
        (diffusers 0.42). Returns the number of blocks compiled."""
        import torch._dynamo

        blocks = [m for m in self.transformer.modules() if type(m).__name__ in self.repeated_blocks]
        if not blocks:
            raise ValueError(f"{type(self.transformer).__name__} has none of the blocks {self.repeated_blocks}")
        # A block kind runs in a few fixed states, one graph each: rollouts (no grad, adapters on), reference passes
        # and base checks (adapters off), the policy pass (grad; its first block's input needs no grad, the others'
        # do). For SD3 (its last block is a second kind) that is about 10 graphs of one function, over dynamo's
        # default limit of 8, past which it silently runs the function eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 32)
        for block in blocks:
            block.compile(**compile_options)
        return len(blocks)

    # ---------------------------------------------------------------------------------------------- prompts
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str], device, dtype, max_sequence_length: int,
                       batch_size: int = 32) -> PromptCache:
        """Every prompt and the empty prompt encoded once, on the CPU in ``dtype``."""

        def encode(batch, negative=False):
            tensors = self._encode(batch, device, max_sequence_length, negative=negative)
            return {k: _to(v, "cpu", dtype) for k, v in tensors.items()}

        parts = [encode(prompts[i : i + batch_size]) for i in range(0, len(prompts), batch_size)]
        return PromptCache({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, encode([""], negative=True))

    @abc.abstractmethod
    def _encode(self, prompts: list[str], device, max_sequence_length: int, negative: bool = False) -> dict:
        """The prompt tensors of ``prompts`` (``negative``: ``[""]``, the empty negative prompt)."""
        raise NotImplementedError

    def free_text_encoders(self) -> None:
        """Drop the text encoders once every prompt is cached: the rollouts only need the transformer and VAE."""
        for name in self.text_encoders:
            if getattr(self.pipe, name, None) is not None:
                setattr(self.pipe, name, None)
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # ---------------------------------------------------------------------------------------------- rollouts
    @torch.no_grad()
    def sample(self, cache: PromptCache, prompt_indices: list[int], *, num_inference_steps: int, resolution: int,
               batch_size: int, generators=None) -> torch.Tensor:
        """ODE rollouts of the transformer as it is now (LoRA on) with the family's guidance: final latents ``x1``
        ``(N, C, h, w)`` in the family's latent space (never re-encoded from pixels).

        ``generators``: one ``torch.Generator`` per sample for reproducible held-out draws; ``None`` draws from the
        global RNG (saved in checkpoints, so training rollouts resume exactly).
        """
        device, dtype = self.transformer.device, self.transformer.dtype
        latents = []
        for start in range(0, len(prompt_indices), batch_size):
            chunk = prompt_indices[start : start + batch_size]
            generator = None if generators is None else generators[start : start + len(chunk)]
            latents.append(self._rollout(cache.select(chunk, device, dtype), cache.negatives(len(chunk), device, dtype),
                                         num_inference_steps, resolution, generator))
        return torch.cat(latents)

    @abc.abstractmethod
    def _rollout(self, cond: dict, negative: dict, num_inference_steps: int, resolution: int, generator) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def sampler_sigmas(self, cache: PromptCache, num_inference_steps: int, resolution: int) -> torch.Tensor:
        """The noise levels ``sigma`` at which a rollout of ``num_inference_steps`` evaluates the transformer, in
        order, shape ``(num_inference_steps,)``: recorded from the timesteps the pipeline passes to the transformer
        in one rollout of one prompt (its own schedule, shift and resolution-dependent shift included), mapped back
        through :meth:`timestep` (linear in ``sigma`` for every family)."""
        seen = []

        def record(module, args, kwargs):
            seen.append(float(kwargs["timestep"].flatten()[0]))

        handle = self.transformer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            self.sample(cache, [0], num_inference_steps=num_inference_steps, resolution=resolution, batch_size=1,
                        generators=[torch.Generator().manual_seed(0)])
        finally:
            handle.remove()
        return torch.tensor(seen) / float(self.timestep(torch.tensor(1.0)))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch_size: int) -> torch.Tensor:
        """Latents ``(N, C, h, w)`` -> images ``(N, 3, H, W)`` in ``[0, 1]`` (undo the scale and shift, decode)."""
        vae, images = self.pipe.vae, []
        for start in range(0, latents.shape[0], batch_size):
            z = latents[start : start + batch_size].to(vae.dtype) / vae.config.scaling_factor
            shift = getattr(vae.config, "shift_factor", None)
            if shift is not None:
                z = z + shift
            images.append(self.pipe.image_processor.postprocess(vae.decode(z, return_dict=False)[0], output_type="pt").float())
        return torch.cat(images)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, num_inference_steps: int, resolution: int, generators, **call_kwargs):
        """PIL images straight from the pipeline's own call, as a user of the family runs it (the evaluator)."""
        out = self.pipe(prompt=prompts, num_inference_steps=num_inference_steps, guidance_scale=self.guidance_scale,
                        height=resolution, width=resolution, generator=generators, output_type="pil", **call_kwargs)
        return out.images

    # ---------------------------------------------------------------------------------------------- the regression
    @abc.abstractmethod
    def timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The transformer's ``timestep`` argument at noise level ``sigma``."""
        raise NotImplementedError

    @abc.abstractmethod
    def velocity(self, transformer, latents: torch.Tensor, timestep: torch.Tensor, cond: dict) -> torch.Tensor:
        """``transformer``'s velocity (``(N, C, h, w)``, like ``latents``) for the prompt tensors ``cond`` (a
        :meth:`PromptCache.select`). ``transformer`` may be wrapped (DDP, compiled)."""
        raise NotImplementedError

    def reference(self, transformer, context=adapters_off):
        """``v_ref(latents, timestep, cond)``: the velocity of ``transformer`` (unwrapped) inside ``context(transformer)``
        (default: its adapters off, the frozen base), without gradient."""

        def v_ref(latents, timestep, cond):
            with torch.no_grad(), context(transformer):
                return self.velocity(transformer, latents, timestep, cond)

        return v_ref

    # ---------------------------------------------------------------------------------------------- LoRA
    @classmethod
    def export_lora(cls, transformer, lora_config, directory) -> Path:
        """Write ``pytorch_lora_weights.safetensors`` with ``pipeline_class.save_lora_weights``: ``transformer.``-
        prefixed keys and the LoRA config as metadata, so ``pipeline_class.load_lora_weights(directory)`` applies it
        at the trained strength (also when ``lora_alpha != r``). Written under a temporary name and renamed: an
        interrupted or failed write leaves the previous file, never a partial one."""
        import shutil
        import tempfile

        from peft.utils import get_peft_model_state_dict

        path = Path(directory) / "pytorch_lora_weights.safetensors"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-lora-", dir=directory))  # written whole, then renamed: never partial
        try:
            cls.pipeline_cls().save_lora_weights(
                tmp, transformer_lora_layers=get_peft_model_state_dict(transformer),
                transformer_lora_adapter_metadata=lora_metadata(lora_config),
            )
            umask_permissions(tmp / path.name)  # safetensors writes owner-only files
            os.replace(tmp / path.name, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path
