"""Sample text from a trained run.

    python -m labs_lib.inference.generate --checkpoint build/runs/demo --prompt "def "
    python -m labs_lib.inference.generate --checkpoint build/runs/demo/checkpoints/step_000060 --temperature 0 \
        --max-new-tokens 80

``--checkpoint`` is a run folder (its newest checkpoint is used) or one ``step_N`` folder of it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from labs_lib.core import checkpoint
from labs_lib.core.config import GPTConfig
from labs_lib.data.text import decode, encode, load_tokenizer
from labs_lib.models.gpt import GPT


def resolve(path: str | Path) -> tuple[Path, Path]:
    """(checkpoint folder, run folder) for a run folder or a step folder; a clear error if there is none."""
    path = Path(path)
    if (path / "meta.json").exists() and path.parent.name == "checkpoints":
        return path, path.parent.parent
    latest = checkpoint.latest_checkpoint(path / "checkpoints")
    if latest is None:
        raise FileNotFoundError(f"no checkpoint in {path}: train first (python -m labs_lib.train --out {path}) "
                                "or pass a run folder that has checkpoints/")
    return latest, path


def load_trained(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, tokenizer, checkpoint meta) of a run folder or step folder."""
    ckpt, run = resolve(path)
    meta = checkpoint.load_meta(ckpt)
    model = GPT(GPTConfig(**meta["model"]))
    model.load_state_dict(checkpoint.load_model_state(ckpt))
    return model.to(device).eval(), load_tokenizer(run / "tokenizer.json"), meta


def sample(model: GPT, tokenizer, prompt: str, max_new_tokens: int = 100, temperature: float = 0.8,
           top_k: int | None = 50, seed: int = 0) -> str:
    device = next(model.parameters()).device
    ids = encode(tokenizer, prompt) or [0]
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    out = model.generate(idx, max_new_tokens, temperature=temperature, top_k=top_k, generator=generator)
    return decode(tokenizer, out[0].tolist())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m labs_lib.inference.generate",
                                description="Sample text from a trained run.")
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoints/step_N folder")
    p.add_argument("--prompt", default="def ")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-samples", type=int, default=1)
    args = p.parse_args(argv)
    try:
        model, tokenizer, meta = load_trained(args.checkpoint)
    except FileNotFoundError as e:
        raise SystemExit(str(e)) from None
    print(f"# step {meta['step']} of {args.checkpoint}")
    for i in range(args.num_samples):
        print(sample(model, tokenizer, args.prompt, args.max_new_tokens, args.temperature, args.top_k, args.seed + i))
        print("-" * 40)


if __name__ == "__main__":
    main()
