"""Write a LoRA training run's adapters in LLaVA's LoRA layout (convert/lora.py describes it
and reads it back): what `train.py` writes to WORKDIR/final_lora with `lora.export=adapters`."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from convert.lora import ADAPTER_CONFIG, ADAPTER_FILES, NON_LORA, PEFT_PREFIX


def save_adapters(config, params: dict, dst: Path, *, base: str = "") -> None:
    """Write a LoRA training run's files in the layout above: the adapters of `params` (PEFT
    names and shapes), the DEM and projector as non_lora_trainables.bin (a torch pickle: needs
    PyTorch), config.json of the merged model (`python -m convert DST --llm --vision-tower`
    re-imports the directory). Every process takes part (the arrays are gathered)."""
    import jax
    import torch
    from flax.traverse_util import flatten_dict
    from jax.experimental import multihost_utils

    from convert import engine, formats
    from convert.export import released_config_json
    from convert.writers import write_safetensors
    from infllava_jax import keymap, llama, lora
    from infllava_jax.checkpoint import atomic_directory

    lc, plain = config.llm.lora, lora.merged_config(config)
    flat = {p: np.asarray(multihost_utils.process_allgather(v, tiled=True))
            for p, v in flatten_dict(params, sep="/").items() if not p.startswith("vision_tower/")}
    llm_rows = keymap.prefixed(llama.key_map(config.llm), "language_model/", "")
    rows = lora.adapter_rows([r for r in llm_rows if r.path.endswith("/kernel")], lc, PEFT_PREFIX)
    adapters = engine.export_plan(rows, {r.path: flat[r.path] for r in rows})
    others = [r for r in formats.released_rows(plain, with_vision=False) if not r.path.startswith("language_model/")]
    trainables = {PEFT_PREFIX + k: torch.from_numpy(np.ascontiguousarray(t.read()))
                  for k, t in engine.export_plan(others, {r.path: flat[r.path] for r in others}).items()}

    def fill(tmp: Path):
        write_safetensors(adapters, tmp, max_shard_bytes=1 << 62)
        (tmp / "model.safetensors").rename(tmp / ADAPTER_FILES[0])
        torch.save(trainables, tmp / NON_LORA)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(lora.peft_config(lc, base), indent=2) + "\n")
        dtype = np.dtype(plain.llm.param_dtype).name
        (tmp / "config.json").write_text(json.dumps(released_config_json(plain, dtype), indent=2) + "\n")

    atomic_directory(dst, fill if jax.process_index() == 0 else (lambda tmp: None), overwrite=True)
