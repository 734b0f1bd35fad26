"""Stage 2 of the released recipe (docs/model.md section 7): DEM + projector + LLM on llava_v1_5_mix665k.

    python train.py --config configs/stage2_8b.py --workdir W2 \
        --config.init_checkpoint=W1/final \
        --config.data.path=llava_v1_5_mix665k.json --config.data.image_folder=IMAGES \
        --config.tokenizer=Meta-Llama-3-8B-Instruct

W1/final is stage 1's export (or `python -m convert mm_projector.bin ...`): vision tower, DEM,
projector and LLM all come from it, with key and shape checks; the vision tower stays frozen.
"""
import ml_collections

from infllava_jax.training.defaults import base_config, parse_arg


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg, stage=2, micro_batch=32, remat="full")
    stage1 = a["stage"] == 1
    c = base_config()
    c.stage = f"stage{a['stage']}"
    c.global_batch = 256 if stage1 else 128
    c.micro_batch = a["micro_batch"]          # per process (e.g. 8 devices x 4)
    c.total_steps = (558_128 if stage1 else 665_298) // c.global_batch   # one epoch
    c.init_checkpoint = ""                    # required for a real run (see the docstring)
    c.model = ml_collections.ConfigDict({"preset": "inf_llava_8b"})
    # attention "auto": cuDNN flash attention on GPU, splash on TPU, chunked elsewhere (attention.py);
    # layer_loop "scan" also on CPU, where `python -m infllava_jax.plan` compiles it for a GPU/TPU mesh
    c.runtime = ml_collections.ConfigDict({"dtype": "bfloat16", "remat_policy": a["remat"], "scan_layers": True,
                                           "layer_loop": "scan", "attention_impl": "auto"})
    c.tokenizer = ""                          # the Llama-3-8B-Instruct tokenizer directory
    c.optimizer.lr = 1e-3 if stage1 else 2e-5
    return c
