"""python -m convert SRC DST [--vision-tower CLIP_DIR] [--llm LLAMA_DIR] [--tokenizer DIR] [--template T] [--dtype ...] [--verify]"""
from __future__ import annotations

import argparse
import importlib.util
import sys

from convert.errors import ConversionError

DESCRIPTION = """\
Convert PyTorch weights into an infllava_jax checkpoint (read with InfLlava.from_pretrained(DST)).
SRC is detected:

  released INF-LLaVA   directory with config.json (model_type "llava_llama") and *.safetensors
                       (+ index) or pytorch_model*.bin (+ index). Vision tower weights come from
                       the checkpoint when present, else from --vision-tower CLIP_DIR (which also
                       gives the CLIP config; otherwise config.json's mm_vision_tower must be
                       openai/clip-vit-large-patch14-336). The same layout without
                       model.spatial_embed.* (original liuhaotian/llava-v1.5 files) is LLaVA-1.5.
  stage-2 start        a stage-1 adapter file mm_projector.bin (projector + spatial_embed), or a
                       *-pretrain directory holding it, with --vision-tower CLIP_DIR and
                       --llm LLAMA_DIR.
  stage-1 start        an HF Llama directory (LlamaForCausalLM) with --vision-tower CLIP_DIR, or
                       an HF CLIP directory with --llm LLAMA_DIR: DEM and projector freshly
                       initialised (PyTorch defaults, --seed).
  LoRA                 a LLaVA-family LoRA directory (adapter_config.json, adapter_model.safetensors
                       or .bin, non_lora_trainables.bin with the projector and DEM), with
                       --vision-tower CLIP_DIR and --llm LLAMA_DIR (its base): the adapters are
                       merged, W + (lora_alpha / r) B A.
  LLaVA-1.5            transformers LlavaForConditionalGeneration directory (llava-hf files of
                       transformers 4.x or what v5 writes); converted as LLaVA-1.5 (no DEM).

A CLIP or a Llama directory alone is not a model and is refused: together they make the
stage-1 start. Both starts grow the vocabulary by one <pad> token (its embed_tokens and
lm_head rows set to the mean row, as the released training did) unless --no-pad-token.

DST also carries what using it needs (usage.json; docs/using.md): the tokenizer files
(tokenizer.json / tokenizer.model, tokenizer_config.json, special_tokens_map.json, chat
template, generation_config.json) of --tokenizer DIR, else of SRC, else of --llm; the
conversation template (--template, else llama3 when the tokenizer has Llama-3's header tokens,
else by family: llama3 for INF-LLaVA, vicuna_v1 for LLaVA-1.5) and its stop ids; the released
inference preprocessing (336-px images upsampled in the model, padded to square; INF-LLaVA's
doubled BOS). Without any tokenizer files one line says so; pass --tokenizer later.
CLIP directories may be a CLIPModel (its text tower is not converted) or a CLIPVisionModel,
in the key layout of transformers 4.x downloads or of v5 save_pretrained.

--verify then runs the PyTorch model (convert/torch_reference.py, or transformers for LLaVA-1.5)
and ours on the repo's astronaut photo and a ~300-token prompt and reports the max logit error
and per-token KL (exit 1 past the limits: fp32 1e-4 / 1e-6; bf16 0.1 / 0.05).

Pickles are only read with torch.load(weights_only=True); files that need more are refused.
Every key must be converted or be a known non-parameter buffer: a missing, unexpected or
wrongly shaped tensor aborts with its name and shapes, and so does a tensor holding NaN / Inf
(unless --allow-nonfinite). DST appears only when complete; an existing DST is kept unless
--overwrite.
"""


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m convert", description=DESCRIPTION,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="checkpoint directory, LoRA directory or mm_projector.bin")
    p.add_argument("dst", help="output checkpoint directory")
    p.add_argument("--vision-tower", metavar="CLIP_DIR", help="HF CLIP directory (CLIPModel or CLIPVisionModel)")
    p.add_argument("--llm", metavar="LLAMA_DIR", help="HF Llama-3 directory (LlamaForCausalLM)")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "bfloat16", "float16"),
                   help="parameter (and compute) dtype; auto keeps each component's source dtype")
    p.add_argument("--no-pad-token", dest="add_pad_token", action="store_false",
                   help="stage starts: do not append the <pad> row")
    p.add_argument("--seed", type=int, default=0, help="seed of the fresh DEM/projector (stage-1 start)")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer files to carry (default: SRC's or --llm's; CLIP's own are never taken)")
    p.add_argument("--template", choices=("llama3", "vicuna_v1"),
                   help="conversation template to record (default: the tokenizer's / the family's: llama3 for "
                        "INF-LLaVA and the stage starts, vicuna_v1 for LLaVA-1.5)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    p.add_argument("--allow-nonfinite", action="store_true",
                   help="convert tensors holding NaN / Inf (a warning names each); default: refuse")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    v = p.add_argument_group("verification")
    v.add_argument("--verify", action="store_true",
                   help="after converting, run PyTorch and ours on the same image + prompt; exit 1 past the limits")
    v.add_argument("--max-rel-err", type=float, help="limit on max|ours - torch| / max|torch| (default by dtype)")
    v.add_argument("--max-kl", type=float, help="limit on the per-token KL(torch || ours) (default by dtype)")
    v.add_argument("--prompt-tokens", type=int, default=300, help="prompt length without a tokenizer.json")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.verify and importlib.util.find_spec("torch") is None:   # decided before anything is written
        print("error: --verify runs the PyTorch reference, and torch is not installed: "
              "pip install -r requirements-dev.txt (or leave out --verify)", file=sys.stderr)
        return 2
    from infllava_jax.checkpoint import CheckpointError
    from infllava_jax.errors import one_line
    try:
        from convert.importer import convert
        source, _ = convert(args.src, args.dst, vision_tower=args.vision_tower, llm=args.llm, dtype=args.dtype,
                            add_pad_token=args.add_pad_token, seed=args.seed, overwrite=args.overwrite,
                            progress=args.progress, allow_nonfinite=args.allow_nonfinite,
                            tokenizer=args.tokenizer, template=args.template)
        if args.verify:
            from convert.verify import verify
            m = verify(source, args.dst, max_rel_err=args.max_rel_err, max_kl=args.max_kl,
                       prompt_tokens=args.prompt_tokens, tokenizer_dirs=(args.dst, args.src, args.llm))
            return 0 if m["ok"] else 1
        return 0
    except (ConversionError, CheckpointError, OSError) as e:
        print(f"error: {one_line(e, 1000)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
