"""Batched continuation of prompts (left padding), shared by attribution targets and toxicity evaluation."""

from __future__ import annotations

import torch


@torch.no_grad()
def continue_prompts(model, tokenizer, prompts: list[list[int]], max_new_tokens: int = 20, do_sample: bool = False,
                     top_p: float = 0.9, seed: int = 0, batch_size: int = 16, progress=None) -> list[list[int]]:
    """Token ids of one continuation per prompt; generation stops at EOS or after ``max_new_tokens``.

    Sampling is seeded per batch (``seed`` + batch index), so results do not depend on what ran before.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    eos = {tokenizer.eos_token_id, getattr(model.generation_config, "eos_token_id", None)} - {None}
    out: list[list[int]] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        chunk = prompts[start:start + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        torch.manual_seed(seed + b)
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                             do_sample=do_sample, top_p=top_p if do_sample else None, top_k=0 if do_sample else None,
                             temperature=1.0 if do_sample else None, pad_token_id=pad)
        for row in gen[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in eos), len(row))
            out.append(row[:cut])
        if progress is not None:
            progress.update(len(chunk))
    return out
