"""adrpo-grpo: ADRPO-GRPO (or TRL's GRPO) on a causal LM, with a held-out reward before and after.

    adrpo-grpo --config configs/qwen2_0.5b_rm_gemma.yaml [--key value ...]

Keys: the run keys below (model, reward, prompts, method, held-out check) and every field of
``ADRPOGRPOConfig`` (TRL's ``GRPOConfig`` plus beta0, advantage_min, advantage_max). ``output_dir/<method>``
holds TRL's outputs; ``output_dir/summary.json`` the held-out rewards; with ``compare_with_grpo`` a GRPO run
from the same start and budget follows, and ``output_dir/reward_vs_entropy.png`` shows both (the paper's Fig. 4).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..builtin import LANGUAGE_MODELS, PREFIX, is_builtin, resolve_language_model
from ..settings import ConfigError, load_yaml_mapping, unknown_keys_message
from ..utils import check_source, paired_change

BUILTIN_MODELS = tuple(PREFIX + name for name in LANGUAGE_MODELS)
FIRST_LETTER, AUDIO_PITCH = "builtin:first-letter", "builtin:audio-pitch"  # the demo tasks (adrpo_diffusion.tasks)
LORA_TARGETS = r"^(?!.*(audio_tower|visual|vision)).*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"


@dataclass
class RunArguments:
    model_name_or_path: str = field(default="Qwen/Qwen2-0.5B-Instruct", metadata={
        "help": "Policy: hub id or local directory of a causal LM or of an audio-language model (Qwen2.5-Omni thinker, "
                "Qwen2-Audio), or builtin:tiny-char-lm / builtin:tiny-omni-thinker (the offline demos)."})
    reward_model: str = field(default="weqweasdas/RM-Gemma-2B", metadata={
        "help": "Reward: hub id or local directory of a sequence-classification reward model (one logit), or "
                "one of the built-in verifiable rewards: builtin:first-letter and builtin:audio-pitch (the demos'), "
                "builtin:answer-accuracy-format (audio multiple choice: R1-style <answer> accuracy plus format)."})
    dataset_name: str = field(default="RLHFlow/test_generation_2k", metadata={
        "help": "Prompts: hub id or local path for datasets.load_dataset; with dataset_format avqa, the train_qa.json "
                "file; or builtin:first-letter / builtin:audio-pitch (the demos' tasks)."})
    dataset_format: str = field(default="hf", metadata={
        "help": "hf (datasets.load_dataset; an 'audio' column makes it an audio run) or avqa (AVQA's train_qa.json "
                "with the clips as <audio_dir>/<video_name>.wav; View questions dropped)."})
    audio_dir: str = field(default="", metadata={"help": "With dataset_format avqa: the folder of the extracted .wav clips."})
    dataset_split: str = field(default="train", metadata={"help": "Dataset split."})
    prompt_column: str = field(default="context_messages", metadata={
        "help": "Column holding the prompt: a string, or a list of chat messages (then chat templates apply)."})
    num_prompts: int = field(default=0, metadata={"help": "Use the first N rows of the split (0: all)."})
    method: str = field(default="adrpo", metadata={
        "help": "adrpo (per-sample KL coefficient beta0 - clip(A)) or grpo (TRL's GRPO with beta = beta0)."})
    compare_with_grpo: bool = field(default=False, metadata={
        "help": "With method adrpo: then train TRL's GRPO (beta = beta0) from the same start, budget and seed, and "
                "plot both."})
    lora_rank: int = field(default=0, metadata={
        "help": "LoRA rank of the adapters trained instead of the full model (0: full fine-tuning). With LoRA the "
                "reference model is the policy with its adapters off (no second copy in memory)."})
    lora_alpha: int = field(default=0, metadata={"help": "LoRA alpha (0: twice the rank)."})
    lora_target_modules: str = field(default=LORA_TARGETS, metadata={
        "help": "Regular expression (full match) of the module names that get LoRA adapters; the default: the "
                "attention and MLP projections of the language model, not those of an audio or vision encoder."})
    eval_prompts: int = field(default=16, metadata={
        "help": "Held-out prompts: the last N rows of the (trimmed) split, never trained on (0: no check)."})
    eval_seeds: list[int] = field(default_factory=lambda: [1000, 1001], metadata={
        "help": "Sampling seeds of the held-out completions; before and after are paired per (prompt, seed)."})
    torch_num_threads: int = field(default=0, metadata={
        "help": "torch.set_num_threads on CPU (0: torch's default). 1 is much faster for tiny models on busy cores."})
    overwrite_output_dir: bool = field(default=False, metadata={
        "help": "Train into an output_dir that already holds files (they are overwritten); otherwise it is refused."})


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown, the description's lines kept."""


LLM_EXTRA = "pip install -c constraints-ci.txt -e '.[llm]'"


def _parser(with_trainer_keys: bool = True):
    """TRL's ``TrlParser`` of the run keys and of ADRPOGRPOConfig's keys (without TRL, for ``--help`` only,
    transformers' ``HfArgumentParser`` of the run keys). The description lists the three ADRPO keys first: in the key
    list they come after TRL's ~200."""
    from transformers import HfArgumentParser

    description = __doc__.split("\n\n")[0] + "\n\nADRPO's keys (the paper's Eq. 7; the other trainer keys are TRL's):"
    if with_trainer_keys:
        from trl import TrlParser

        from .config import ADRPO_KEYS, ADRPOGRPOConfig

        fields = {f.name: f for f in dataclasses.fields(ADRPOGRPOConfig)}
        description += "".join(f"\n  --{name} (default {fields[name].default}): {fields[name].metadata['help']}"
                               for name in ADRPO_KEYS)
        parser_class, dataclass_types = TrlParser, [RunArguments, ADRPOGRPOConfig]
    else:
        description += f"\n  they, and TRL's, need the llm extra: {LLM_EXTRA}"
        parser_class, dataclass_types = HfArgumentParser, [RunArguments]
    parser = parser_class(dataclass_types, prog="adrpo-grpo", allow_abbrev=False, description=description,
                          usage="adrpo-grpo [--config FILE] [--key value ...]", formatter_class=_HelpFormatter)
    parser.add_argument("--config", help="YAML file of keys (see configs/); --key value overrides it.")
    return parser


def parse_args(argv=None) -> tuple[RunArguments, dict]:
    """The run keys, and the trainer keys as keyword arguments (defaults filled in) for ADRPOGRPOConfig. TRL's
    ``TrlParser`` reads the YAML file under the command line; unknown keys get the config engine's did-you-mean."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        import trl  # noqa: F401
    except ImportError:
        if "-h" in argv or "--help" in argv:
            _parser(with_trainer_keys=False).print_help()
            raise SystemExit(0) from None
        raise ConfigError(f"adrpo-grpo needs TRL, the llm extra: {LLM_EXTRA}") from None
    parser = _parser()
    run_names = [f.name for f in dataclasses.fields(RunArguments)]
    valid = run_names + [n for n in (a.dest for a in parser._actions) if n not in run_names + ["help", "config"]]
    flags = [a[2:].split("=")[0] for a in argv if a.startswith("--")]
    unknown = [f for f in flags if f"--{f}" not in parser._option_string_actions]
    if unknown:
        raise ConfigError(unknown_keys_message(unknown, valid, "the command line"))
    config = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config.add_argument("--config")
    path = config.parse_known_args(argv)[0].config
    if path:
        values = load_yaml_mapping(path)
        remaining = parser.set_defaults_with_config(**values)  # TRL's: the keys no argument took
        if remaining:
            raise ConfigError(unknown_keys_message([flag[2:] for flag in remaining[::2]], valid, path))
    namespace = vars(parser.parse_args(argv))
    namespace.pop("config")
    run = RunArguments(**{name: namespace.pop(name) for name in run_names})
    if run.method not in ("adrpo", "grpo"):
        raise ConfigError(f"method must be adrpo or grpo, got {run.method!r}")
    if run.compare_with_grpo and run.method != "adrpo":
        raise ConfigError("compare_with_grpo needs method adrpo")
    if run.lora_rank < 0 or run.lora_alpha < 0:
        raise ConfigError(f"lora_rank and lora_alpha must be >= 0, got {run.lora_rank} and {run.lora_alpha}")
    return run, namespace


def trainer_args(method: str, trainer_kwargs: dict, output_dir: Path):
    """The method's trainer class and its validated config; GRPO gets TRL's GRPOConfig with beta = beta0."""
    from trl import GRPOConfig, GRPOTrainer

    from .config import ADRPO_KEYS, ADRPOGRPOConfig
    from .trainer import ADRPOGRPOTrainer

    kwargs = {**trainer_kwargs, "output_dir": str(output_dir / method)}
    adrpo_args = ADRPOGRPOConfig(**kwargs)
    if method == "adrpo":
        return ADRPOGRPOTrainer, adrpo_args
    grpo_kwargs = {k: v for k, v in kwargs.items() if k not in ADRPO_KEYS}
    return GRPOTrainer, GRPOConfig(**{**grpo_kwargs, "beta": adrpo_args.beta0})


def check_model_source(name: str, key: str, builtins: tuple) -> None:
    """Fail before anything heavy loads if ``name`` cannot be loaded (offline and neither local nor cached)."""
    if is_builtin(name):
        if name not in builtins:
            raise ConfigError(f"Unknown built-in {key} {name!r}; built-ins: {', '.join(builtins)}")
        return
    try:
        check_source(name, "config.json", lambda local: f"--{key} {local}", file_ok=False)
    except FileNotFoundError as err:
        raise ConfigError(f"{key}: {err}") from None


def load_prompts(run: RunArguments):
    """(training dataset with a "prompt" column, held-out rows: the split's last ``eval_prompts`` rows)."""
    from datasets import Dataset, load_dataset

    from ..tasks.first_letter import first_letter_prompts
    from ..tasks.pitch import pitch_rows

    if run.dataset_format not in ("hf", "avqa"):
        raise ConfigError(f"dataset_format must be hf or avqa, got {run.dataset_format!r}")
    if run.dataset_name == FIRST_LETTER:
        dataset = Dataset.from_dict({"prompt": first_letter_prompts(run.num_prompts)})
    elif run.dataset_name == AUDIO_PITCH:
        dataset = Dataset.from_list(pitch_rows(run.num_prompts or 1024))
    elif is_builtin(run.dataset_name):
        raise ConfigError(f"Unknown built-in dataset_name {run.dataset_name!r}; built-ins: {FIRST_LETTER}, {AUDIO_PITCH}")
    elif run.dataset_format == "avqa":
        from .audio_data import load_avqa, question_rows

        if not run.audio_dir:
            raise ConfigError("dataset_format avqa needs audio_dir (the folder of the extracted .wav clips)")
        dataset = Dataset.from_list(question_rows(load_avqa(run.dataset_name, run.audio_dir)))
        if run.num_prompts:
            dataset = dataset.select(range(min(run.num_prompts, len(dataset))))
    else:
        try:
            dataset = load_dataset(run.dataset_name, split=run.dataset_split)
        except Exception as err:  # offline and not cached, no such split, ...
            raise ConfigError(f"Cannot load the prompts {run.dataset_name!r} (split {run.dataset_split!r}): "
                              f"{type(err).__name__}: {err}. Offline, pass a local copy as --dataset_name (download "
                              f"it where there is network: hf download {run.dataset_name} --repo-type "
                              "dataset --local-dir DIR).") from err
        if run.prompt_column not in dataset.column_names:
            raise ConfigError(f"{run.dataset_name} has no column {run.prompt_column!r}; columns: {dataset.column_names}")
        dataset = dataset.select_columns([run.prompt_column]).rename_column(run.prompt_column, "prompt")
        if run.num_prompts:
            dataset = dataset.select(range(min(run.num_prompts, len(dataset))))
    if run.eval_prompts >= len(dataset):
        raise ConfigError(f"eval_prompts ({run.eval_prompts}) must be smaller than the {len(dataset)} prompts")
    cut = len(dataset) - run.eval_prompts
    return dataset.select(range(cut)), [dataset[i] for i in range(cut, len(dataset))]


def builtin_rewards() -> dict:
    from ..tasks.first_letter import first_letter_reward
    from .answers import accuracy_reward, first_character_reward, format_reward

    return {FIRST_LETTER: [first_letter_reward], AUDIO_PITCH: [first_character_reward],
            "builtin:answer-accuracy-format": [accuracy_reward, format_reward]}


def reward_funcs(run: RunArguments) -> list:
    return builtin_rewards().get(run.reward_model, [run.reward_model])


def heldout_completion_rewards(trainer, rows: list[dict], seeds: list[int]):
    """Reward of one sampled completion per (seed, row), shape ``(len(seeds) * len(rows),)``: the trainer's reward
    functions (given the rows' columns), weighted and summed as in training, on completions sampled like the training
    rollouts. Audio trainers encode each row's clip with its prompt."""
    import torch
    from transformers import GenerationConfig

    model, args = trainer.accelerator.unwrap_model(trainer.model), trainer.args
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    prompts = [row["prompt"] for row in rows]
    conversational = not isinstance(prompts[0], str)
    if hasattr(trainer, "generation_inputs"):
        encoded = trainer.generation_inputs(rows)
    else:
        if conversational:
            texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        else:
            texts = prompts
        encoded = tokenizer(text=texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        encoded = encoded.to(model.device)
    generation = GenerationConfig(do_sample=True, max_new_tokens=args.max_completion_length, temperature=args.temperature,
                                  top_p=args.top_p, top_k=args.top_k, pad_token_id=tokenizer.pad_token_id,
                                  eos_token_id=model.generation_config.eos_token_id,
                                  suppress_tokens=getattr(getattr(trainer, "generation_config", None), "suppress_tokens", None))
    rewards, was_training = [], model.training
    model.eval()  # no dropout, and no gradient checkpointing (which would turn off the KV cache)
    devices = [model.device] if model.device.type == "cuda" else []
    for seed in seeds:
        with torch.random.fork_rng(devices=devices), torch.no_grad():  # leaves the training RNG untouched
            torch.manual_seed(seed)
            completion_ids = model.generate(**encoded, generation_config=generation)[:, encoded["input_ids"].shape[1]:]
        completions = tokenizer.batch_decode(completion_ids, skip_special_tokens=True)
        if conversational:
            completions = [[{"role": "assistant", "content": c}] for c in completions]
        per_func = trainer._calculate_rewards([dict(row) for row in rows], prompts, completions,
                                              completion_ids.tolist())[: len(prompts)]
        rewards.append((per_func * trainer.reward_weights.to(per_func.device)).nansum(dim=1).cpu())
    model.train(was_training)
    return torch.cat(rewards)


def train_one(method: str, run: RunArguments, trainer_cls, args, model_path: str, train_dataset, heldout: list) -> dict:
    """Train one method; the held-out rewards before and after (paired over prompts and seeds) and its curve. With
    audio, also the held-out reward after training with each clip swapped for the next held-out row's: near or below
    chance when the answers come from the audio."""
    audio = "audio" in train_dataset.column_names
    if audio:
        from .audio_trainer import AudioADRPOGRPOTrainer, AudioGRPOTrainer

        trainer_cls = AudioADRPOGRPOTrainer if method == "adrpo" else AudioGRPOTrainer
    peft_config = None
    if run.lora_rank:
        from peft import LoraConfig

        peft_config = LoraConfig(r=run.lora_rank, lora_alpha=run.lora_alpha or 2 * run.lora_rank,
                                 target_modules=run.lora_target_modules, task_type="CAUSAL_LM")
    trainer = trainer_cls(model=model_path, reward_funcs=reward_funcs(run), args=args, train_dataset=train_dataset,
                          peft_config=peft_config)
    before = heldout_completion_rewards(trainer, heldout, run.eval_seeds) if heldout else None
    start = time.time()
    trainer.train()
    result = {"method": method, "train_time_s": round(time.time() - start, 1), "steps": trainer.state.global_step}
    if heldout:
        change = paired_change(before, heldout_completion_rewards(trainer, heldout, run.eval_seeds))
        result.update(heldout_samples=before.numel(), heldout_reward_before=change["before"],
                      heldout_reward_after=change["after"], heldout_improvement=change["improvement"],
                      heldout_improvement_se=change["improvement_se"])
        print(f"adrpo-grpo [{method}]: held-out reward before {result['heldout_reward_before']:.4f} -> after "
              f"{result['heldout_reward_after']:.4f} (change {result['heldout_improvement']:+.4f} +- "
              f"{result['heldout_improvement_se']:.4f} SE, paired over {before.numel()} prompt x seed samples)", flush=True)
        if audio:
            swapped = [{**row, "audio": heldout[(i + 1) % len(heldout)]["audio"]} for i, row in enumerate(heldout)]
            result["heldout_reward_audio_swapped"] = heldout_completion_rewards(trainer, swapped, run.eval_seeds).mean().item()
            print(f"adrpo-grpo [{method}]: held-out reward with each clip swapped for another row's: "
                  f"{result['heldout_reward_audio_swapped']:.4f}", flush=True)
    result["curve"] = [{"step": h["step"], "reward": h["reward"], "entropy": h["entropy"]}
                       for h in trainer.state.log_history if "reward" in h and "entropy" in h]
    trainer.save_model()
    return result


def plot_reward_vs_entropy(results: list[dict], path: Path) -> None:
    """The paper's Fig. 4: mean reward against mean token entropy along training, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def running_mean(xs: list, window: int) -> list:
        return [sum(xs[max(0, i - window + 1): i + 1]) / len(xs[max(0, i - window + 1): i + 1]) for i in range(len(xs))]

    fig, ax = plt.subplots(figsize=(5, 4))
    for result in results:
        window = max(1, len(result["curve"]) // 10)  # a tenth of training, for readability
        entropy = running_mean([p["entropy"] for p in result["curve"]], window)
        reward = running_mean([p["reward"] for p in result["curve"]], window)
        line, = ax.plot(entropy, reward, label=result["method"].upper())
        ax.scatter(entropy[-1:], reward[-1:], color=line.get_color())
    ax.set_xlabel("mean token entropy (nats)")
    ax.set_ylabel("mean training reward")
    ax.set_title(f"along training: running means over {window} steps, dot: last", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    start = time.time()
    try:
        run, trainer_kwargs = parse_args(argv)
        output_dir = Path(trainer_kwargs.get("output_dir") or "trainer_output")
        if output_dir.is_dir() and any(output_dir.iterdir()) and not run.overwrite_output_dir:
            raise ConfigError(f"output_dir {output_dir} already holds files (another run?): choose another directory, "
                              "or pass --overwrite_output_dir true to train over them.")
        methods = ["adrpo", "grpo"] if run.compare_with_grpo else [run.method]
        check_model_source(run.model_name_or_path, "model_name_or_path", BUILTIN_MODELS)
        check_model_source(run.reward_model, "reward_model", tuple(builtin_rewards()))
        configs = {m: trainer_args(m, trainer_kwargs, output_dir) for m in methods}
        import matplotlib  # noqa: F401  (the plot at the end)

        train_dataset, heldout = load_prompts(run)
    except (ConfigError, ValueError, FileNotFoundError, ImportError) as err:
        print(f"adrpo-grpo: error: {err}", file=sys.stderr)
        return 2
    if run.torch_num_threads:
        import torch

        torch.set_num_threads(run.torch_num_threads)
    model_path = resolve_language_model(run.model_name_or_path)
    results = [train_one(m, run, *configs[m], model_path, train_dataset, heldout) for m in methods]
    from accelerate import PartialState

    if not PartialState().is_main_process:
        return 0
    plot_reward_vs_entropy(results, output_dir / "reward_vs_entropy.png")
    summary = {**{k: v for k, v in results[0].items() if k != "curve"}, "wall_time_s": round(time.time() - start, 1)}
    if run.compare_with_grpo:
        summary["grpo"] = {k: v for k, v in results[1].items() if k != "curve"}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    (output_dir / "curves.json").write_text(json.dumps({r["method"]: r["curve"] for r in results}))
    print(f"adrpo-grpo: wrote {output_dir / 'summary.json'} and {output_dir / 'reward_vs_entropy.png'} "
          f"({summary['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
