"""The method lab: a synthetic coloured-shapes task on which ADRPO and its baselines are compared on a CPU.

- :mod:`.shapes`     the caption grammar, its parser and the procedural image generator
- :mod:`.pretrain`   a tiny SD3 base pre-trained on that data by flow matching (``builtin:tiny-sd3-shapes``)
- :mod:`.experiment` fine-tuning every method with the trainer, held-out tracking, the table and the plots
"""
