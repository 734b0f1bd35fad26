"""Stage 1 of the released recipe (docs/model.md section 7): DEM + projector on LLaVA-558K captions, LLM frozen.

    python -m convert CLIP_DIR W0 --llm LLAMA3_DIR    # HF CLIP + HF Llama-3: the stage-1 start
    python train.py --config configs/stage1_8b.py --workdir W1 --config.init_checkpoint=W0 \
        --config.data.path=blip_laion_cc_sbu_558k.json --config.data.image_folder=IMAGES \
        --config.tokenizer=Meta-Llama-3-8B-Instruct
"""
from configs import stage2_8b


def get_config(arg: str | None = None):
    return stage2_8b.get_config("stage=1" + (f",{arg}" if arg else ""))
