"""How fast the score head drifts to always-accept or always-reject on a real backbone's features,
per learning rate, when the reward carries no signal.

    python bench/head_drift.py                       # the qwen_coder pair's 0.5B draft, 16 records
    python bench/head_drift.py --records data/gsm8k_qwen/records.jsonl --lrs 3e-3 3e-4 3e-5

The backbone is frozen (experiment=qwen_coder_gsm8k), so the head's inputs are fixed: this reads
them once for --records records, then takes --steps AdamW steps of a GRPO-shaped loss (decisions
sampled from the head, advantages drawn from N(0, 1): pure noise) at each learning rate, and prints
the mean accept probability after each step. A head that leaves 0.5 on noise alone will saturate
in training too: every sample of a group then takes the same decisions, the group's rewards have
no variance, and the gradient is gone for good. Last line: `lr=<lr>:<prob after the last step> ...`.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer

from spd_lightning.data.records import Record, collate_records
from spd_lightning.models.hf import pad_id_of
from spd_lightning.models.pairs import pair_dir, require_built, require_records
from spd_lightning.models.scorer import ScoringActor

ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def head_inputs(scorer: ScoringActor, records: list[Record], pad_id: int) -> torch.Tensor:
    """[B, K, 2H]: what the head reads, as ScoringActor.forward computes it."""
    batch = collate_records(records, pad_id)
    k = batch.target_ids.shape[1]
    at_draft = scorer.hidden_at_draft(batch.input_ids, batch.attention_mask, batch.context_len, k)  # [B, K, H]
    return scorer.head_inputs(at_draft, batch.target_ids)


def drift(scorer: ScoringActor, inputs: torch.Tensor, lr: float, steps: int, seed: int) -> list[float]:
    """Mean accept probability after each of `steps` noise-advantage AdamW steps from the initial head."""
    head = scorer.head
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        logits = head(inputs).squeeze(-1)  # [B, K]
        decisions = torch.bernoulli(torch.sigmoid(logits).detach(), generator=gen)  # [B, K]
        advantage = torch.randn(len(logits), 1, generator=gen)  # [B, 1]
        logp = decisions * F.logsigmoid(logits) + (1 - decisions) * F.logsigmoid(-logits)  # [B, K]
        loss = -(advantage * logp).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            out.append(float(torch.sigmoid(head(inputs)).mean()))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default=str(pair_dir("qwen_coder", ROOT) / "draft"))
    parser.add_argument("--records", default=str(ROOT / "data/gsm8k_qwen/records.jsonl"))
    parser.add_argument("--num-records", type=int, default=16)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 3e-4, 3e-5])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    require_built("--backbone", args.backbone)
    require_records("--records", args.records)
    with open(args.records) as f:
        rows = [json.loads(line) for _, line in zip(range(args.num_records), f)]
    records = [Record(r["context_ids"], r["prompt_len"], r["draft_ids"], r["target_ids"], r["reference"]) for r in rows]
    torch.manual_seed(0)
    scorer = ScoringActor.from_pretrained(args.backbone)
    scorer.backbone.requires_grad_(False)
    pad_id = pad_id_of(AutoTokenizer.from_pretrained(args.backbone))
    inputs = head_inputs(scorer, records, pad_id)
    at_draft = inputs[..., : inputs.shape[-1] // 2]
    print(
        f"{len(records)} records; hidden states at the draft tokens: mean |x| {at_draft.abs().mean():.2f}, "
        f"max |x| {at_draft.abs().max():.1f}"
    )
    initial = {name: p.clone() for name, p in scorer.head.state_dict().items()}
    last = {}
    for lr in args.lrs:
        scorer.head.load_state_dict(initial)
        probs = drift(scorer, inputs, lr, args.steps, args.seed)
        print(f"lr={lr:g}: mean accept probability after steps 1..{args.steps}: " + " ".join(f"{p:.3f}" for p in probs))
        last[lr] = probs[-1]
    print(" ".join(f"lr={lr:g}:{p:.3f}" for lr, p in last.items()))


if __name__ == "__main__":
    main()
