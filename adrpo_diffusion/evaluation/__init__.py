"""Evaluation for Table 1: generate images with each model, score them with the registry's scorers, aggregate over
seeds, render the tables.

    config.py     the eval config (models, prompt sets, seeds, metrics), YAML + --key value, validation
    generate.py   resumable image generation (PNG + JSON record per image), LoRA loading with a fit check
    folder.py     records of a folder of images generated elsewhere
    score.py      one metric at a time over all images, cached per metric, undecodable images counted
    aggregate.py  per-seed means over prompts, then mean and standard error over seeds; breakdowns
    tables.py     Markdown / LaTeX / CSV tables and the reward-versus-diversity plot
    tiny.py       tiny random scorer weights for offline runs
    cli.py        ``adrpo-evaluate``
"""
