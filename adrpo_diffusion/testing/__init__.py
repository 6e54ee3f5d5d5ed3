"""Test models: tiny pipelines of every family, tiny scorers and tiny language models, for tests and offline demos.

Product code never imports this package; it reaches these builders only by their ``builtin:`` names
(:mod:`adrpo_diffusion.builtin`).

- :mod:`.tiny_pipelines`  ``builtin:tiny-sd3``, ``builtin:tiny-flux``, ``builtin:tiny-sana``
- :mod:`.shapes_base`     ``builtin:tiny-sd3-shapes``: the tiny SD3 pre-trained on coloured shapes (the method lab's base)
- :mod:`.tiny_scorers`    ``builtin:tiny-scorers/<path>``: tiny random weights for every evaluation scorer
- :mod:`.tiny_language_models`  ``builtin:tiny-char-lm``, ``builtin:tiny-omni-thinker``: tiny Qwen2 and Qwen2.5-Omni
  thinker for the offline LLM and audio demos
"""
