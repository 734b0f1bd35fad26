"""The miniature INF-LLaVA study (`python -m infllava_jax.study`, the README's main job), all in
one place:

    scenes.py         the synthetic high-resolution VQA set (scenes, captions, questions)
    targets.py        stage 0's dense per-patch targets from the scenes' ground truth
    stage0.py         stage 0: the tiny model's "CLIP", pretrained once on the train split
    recipe.py         the five rows and their one recipe (a training config per row and stage)
    caption_probe.py  which facts a stage-1 model names in its captions (`--probe`)
    run.py            data -> stage 0 -> stages 1-2 per row and seed -> eval -> table, plot, verdict

docs/study.md says what it shows and what was measured.
"""
