"""InfLlavaConfig: the whole model in one frozen (hashable, jit-static) dataclass.

pixels -> crops (DCM) -> vision tower -> DEM -> projector -> language model.
`dem=None` is plain LLaVA-1.5 (one 336 px view, no crops).
Serialised as our checkpoint's `config.json`.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from infllava_jax.dem import DEMConfig
from infllava_jax.llama import LlamaConfig
from infllava_jax.splice import IMAGE_TOKEN_INDEX
from infllava_jax.vision import CLIPVisionConfig

FORMAT_VERSION = 1
RUNTIME_FIELDS = {"dtype", "remat_policy", "scan_layers", "layer_loop", "attention_impl"}


@dataclasses.dataclass(frozen=True)
class InfLlavaConfig:
    vision: CLIPVisionConfig
    llm: LlamaConfig
    dem: DEMConfig | None = None        # None: LLaVA-1.5 (no DCM/DEM)
    select_layer: int = -2              # feature = hidden_states[-2] without CLS (docs/model.md §1)
    image_token_index: int = IMAGE_TOKEN_INDEX   # -200, or the HF image token id also accepted (token_ids.py)
    pad_token_id: int | None = None

    @property
    def sub_image_size(self) -> int:    # s = 336
        return self.vision.image_size

    @property
    def grid(self) -> tuple[int, int]:  # nH x nW sub-images of size s
        return (1, 1) if self.dem is None else (self.dem.nH, self.dem.nW)

    @property
    def image_size(self) -> tuple[int, int]:  # the high-resolution input (H, W) = (nH*s, nW*s)
        nh, nw = self.grid
        return nh * self.sub_image_size, nw * self.sub_image_size

    @property
    def tokens_per_image(self) -> int:  # 576 for CLIP-L/14-336
        return (self.vision.image_size // self.vision.patch_size) ** 2

    def replace(self, **kw) -> "InfLlavaConfig":
        return dataclasses.replace(self, **kw)

    def with_runtime(self, **runtime) -> "InfLlavaConfig":
        """The same model with other runtime settings (dtype, remat_policy, scan_layers,
        layer_loop, attention_impl; None = unchanged), applied to every part that has the field."""
        runtime = {k: v for k, v in runtime.items() if v is not None}
        unknown = set(runtime) - RUNTIME_FIELDS
        if unknown:
            raise ValueError(f"runtime settings {sorted(unknown)}; expected some of {sorted(RUNTIME_FIELDS)}")

        def apply(part):
            names = {f.name for f in dataclasses.fields(part)}
            return dataclasses.replace(part, **{k: v for k, v in runtime.items() if k in names})
        return self.replace(vision=apply(self.vision), llm=apply(self.llm),
                            dem=None if self.dem is None else apply(self.dem))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        for field in ("lora", "quant"):     # checkpoints without adapters / quantization keep their config.json
            if d["llm"][field] is None:
                del d["llm"][field]
        d["format_version"] = FORMAT_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "InfLlavaConfig":
        d = dict(d)
        version = d.pop("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(f"config.json format_version={version}; this code reads {FORMAT_VERSION}")
        return cls(vision=_build(CLIPVisionConfig, d.pop("vision"), "vision"),
                   llm=_build(LlamaConfig, d.pop("llm"), "llm"),
                   dem=None if d.get("dem") is None else _build(DEMConfig, d.pop("dem"), "dem"),
                   **{k: v for k, v in d.items() if k != "dem"})

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "InfLlavaConfig":
        return cls.from_dict(json.loads(text))


def _build(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ValueError(f"config.json: unknown field(s) {unknown} in '{where}'")
    # JSON turns tuples into lists (fields must stay hashable); nested dicts are sub-configs
    # that the dataclass converts itself (e.g. LlamaConfig.rope_scaling).
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
