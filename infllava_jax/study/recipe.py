"""The miniature study's recipe (the README's main job): the tiny model (as configs/tiny.py) with
one recipe for every row.

    python -m infllava_jax.study OUT                                  # every row, then the table
    python train.py --config infllava_jax/study/recipe.py:row=dcm_dem_1008,stage=1 --workdir W1 \
        --config.data.path=DATA/train_caption.json --config.data.image_folder=DATA

Rows (same data, same steps, same trainable parts; only the visual path differs):
    plain_336      LLaVA-1.5 path: one 84 px view (the tiny model's "336 px"), no DCM/DEM
    local_only     1008: the 9 local crops only, average-pooled to 6x6 tokens, no DEM
    strided_only   1008: the 9 strided crops only, average-pooled to 6x6 tokens, no DEM
    dcm_dem_672    DCM + DEM on a 2x2 grid (168 px)
    dcm_dem_1008   DCM + DEM on a 3x3 grid (252 px), the released model's point
Every row gives the LLM 36 visual tokens per image. The DEM rows use the paper's pooling (docs/model.md §5:
the mean of each n x n cell of the fused map, low-res features added): the released "pooling"
keeps only each cell's centre (docs/model.md §4), i.e. 1 of 9 local patches, so a detail elsewhere never
reaches the LLM (measured: dcm_dem_1008 released read the digit at 20%, local_only at 97%).

The released recipe (docs/model.md §7), scaled down: the vision tower is the study's stage-0 tower
(study/stage0.py, the tiny model's "CLIP"), frozen in both stages; stage 1 trains
DEM + projector on the captions (plain template) and, unlike the released recipe, the tiny LLM too
(it has no pretrained weights); stage 2 trains DEM + projector + LLM on the VQA records.
"""
import os

import ml_collections

from infllava_jax.training.defaults import base_config, parse_arg

# row -> (grid, views, DEM variant, eval resolution in CLIP-336 units)
ROWS = {
    "plain_336": (0, "both", "released", 336),
    "local_only": (3, "local", "released", 1008),
    "strided_only": (3, "strided", "released", 1008),
    "dcm_dem_672": (2, "both", "paper", 672),
    "dcm_dem_1008": (3, "both", "paper", 1008),
}
STEPS = {1: 500, 2: 400}        # --scale for longer runs (stage 1 at 600 before the DEM learnt 3x faster)
LR = {1: 3e-3, 2: 1e-3}          # stage 2 at 2e-3: plain_336 and strided_only stay at the prior
LR_MULT = {"spatial_embed": 3.0}  # the DEM (new, randomly initialised) learns 3x faster: docs/study.md
BATCH = 32                      # four rows per fake device (at 24, see README: the study's time)
STAGE0 = {"steps": 400, "batch": 16, "lr": 2e-3}   # stage0.run
BUCKET = {1: 80, 2: 136}        # one spliced length per stage (longest record: 73 / 133): one compile
LOSS_POSITIONS = {1: 0, 2: 16}  # stage 2: the LM head at the (at most 9) answer tokens of a record, not all 136
SYSTEM_PROMPT = False           # stage 2 without the system turn: 33 fixed tokens a model trained from scratch
                                # learns nothing from, 20% of the sequence (docs/study.md, "The 15-minute budget")
DEVICES = 8                     # fake CPU devices, all data-parallel: stage 0 and every row


def use_study_devices() -> None:
    """XLA_FLAGS for the study's DEVICES fake CPU devices, unless set (call before jax starts: the
    data-parallel mean rounds with the device count, so stage 0 alone trains the study's tower)."""
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={DEVICES}")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, row="dcm_dem_1008", stage=2, steps=0, seed=0)
    if a["row"] not in ROWS:
        raise ValueError(f"study/recipe.py: row={a['row']!r}; expected one of {sorted(ROWS)}")
    grid, views, variant, _ = ROWS[a["row"]]
    stage = a["stage"]
    c = base_config()
    c.stage = f"stage{stage}"
    c.total_steps = a["steps"] or STEPS[stage]
    c.model = ml_collections.ConfigDict({"preset": "tiny", "grid": grid, "variant": variant, "views": views})
    c.data.num_threads = 2
    c.also_train = ("language_model",) if stage == 1 else ()   # the tiny LLM is random: it learns from stage 1 on
    c.optimizer.lr = LR[stage]
    c.optimizer.lr_mult.update(LR_MULT)         # the same for every row: rows without a DEM have no such part
    c.seed = a["seed"]
    c.global_batch = c.micro_batch = BATCH
    c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}   # all 8 devices data-parallel: faster than fsdp at this size
    c.log_every = 100
    c.checkpoint_every = c.total_steps          # resumable at the end of each stage only
    c.keep_checkpoints = 1
    c.data.synthetic = False                    # the study passes data.path (its generated set)
    c.data.max_len = BUCKET[stage]
    c.data.buckets = (BUCKET[stage],)
    c.data.system_prompt = SYSTEM_PROMPT        # recorded in final/usage.json: the eval prompts the same way
    c.data.image_cache_mb = 2048                # every row reads the same 4000 images: decode them once
    c.data.token_cache_mb = 64                  # and each record 3-4 times: tokenize it once (6 MB)
    c.data.feature_bank = True                  # the tower is frozen: its features of each image, computed once
    c.data.image_mode = "pad"                   # the scenes are square (pad = square): stage 2 reuses stage 1's bank
    c.loss_chunk = max(BUCKET.values())         # the whole (short) sequence in one chunk: no loss loop
    c.loss_positions = LOSS_POSITIONS[stage]
    return c
