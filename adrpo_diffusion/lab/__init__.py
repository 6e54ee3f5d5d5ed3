"""The method lab: a synthetic coloured-shapes task on which ADRPO and its baselines are compared on a CPU.

- :mod:`adrpo_diffusion.tasks.shapes`  the caption grammar, its parser and the procedural image generator
- ``builtin:tiny-sd3-shapes``          a tiny SD3 base pre-trained on that data (:mod:`adrpo_diffusion.testing.shapes_base`)
- :mod:`.experiment` fine-tuning every method with the trainer, held-out tracking, the table and the plots
"""
