"""The token layout of a left-padded batch, and how pruning reshapes it.

A :class:`TokenLayout` says, for every slot of a ``(B, S)`` batch, whether it holds a real token,
whether that token is visual (and which original image patch it came from), and its position id.
Pruning keeps a subset of each sample's visual tokens (plus optional merged tokens), drops the
rest and left-pads the batch again, so samples may keep different sets and even counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunebench.method import MethodError, PositionPolicy


TEXT = -1  # visual_id of text tokens and padding
MERGED = -2  # visual_id of tokens a method built by merging


@dataclass
class TokenLayout:
    valid: torch.Tensor  # (B, S) bool: a real token, not padding
    visual_id: torch.Tensor  # (B, S) long: original patch index, MERGED, or TEXT
    positions: torch.Tensor  # (B, S) long: rotary position ids

    @classmethod
    def from_inputs(cls, attention_mask: torch.Tensor, visual: torch.Tensor) -> TokenLayout:
        valid = attention_mask.bool()
        visual = visual & valid
        visual_id = (visual.long().cumsum(-1) - 1).masked_fill(~visual, TEXT)
        return cls(valid=valid, visual_id=visual_id, positions=contiguous_positions(valid))

    @property
    def visual(self) -> torch.Tensor:
        return self.visual_id != TEXT

    @property
    def n_visual(self) -> list[int]:
        return self.visual.sum(-1).tolist()

    def visual_positions(self) -> list[torch.Tensor]:
        """Per sample, the sequence slots of its visual tokens, in order."""
        return [row.nonzero().flatten() for row in self.visual]

    def prune(
        self,
        hidden: torch.Tensor,
        keep: list[torch.Tensor],
        merged: torch.Tensor | None,
        policy: PositionPolicy,
        leading: torch.Tensor | None = None,
    ) -> tuple[TokenLayout, torch.Tensor]:
        """Keep ``keep[b]`` (indices into sample b's visual tokens), put ``leading`` before them and
        ``merged`` after them.

        Returns the new layout and the gathered hidden states. Text tokens are never dropped.
        Built tokens count as visual (``visual_id == MERGED``); under the "original" position
        policy they take the position id of the image span's first (leading) or last (merged) slot.
        """
        batch, seq_len, width = hidden.shape
        slots = self.visual_positions()
        # Flat source: every (sample, slot) of `hidden`, then each block of built tokens.
        source = [hidden.reshape(batch * seq_len, width)]
        source_id = [self.visual_id.flatten()]
        source_pos = [self.positions.flatten()]
        offsets = {}  # block -> (start in the flat source, tokens per sample)
        start = batch * seq_len
        for name, block, edge in (("leading", leading, 0), ("merged", merged, -1)):
            if block is None or block.shape[1] == 0:
                continue
            n = block.shape[1]
            offsets[name] = (start, n)
            start += batch * n
            source.append(block.reshape(batch * n, width).to(hidden.dtype))
            source_id.append(source_id[0].new_full((batch * n,), MERGED))
            source_pos.append(torch.stack([self.positions[b, slots[b][edge]] for b in range(batch)]).repeat_interleave(n))
        source, source_id, source_pos = torch.cat(source), torch.cat(source_id), torch.cat(source_pos)

        rows = []
        for b in range(batch):
            keep_slot = self.valid[b] & ~self.visual[b]
            keep_slot[slots[b][keep[b]]] = True
            kept = keep_slot.nonzero().flatten()
            before = int((kept < slots[b][0]).sum())  # text ahead of the image span
            after = int((kept <= slots[b][-1]).sum())  # ... and the kept visual tokens
            parts = [kept[:before] + b * seq_len]
            if "leading" in offsets:
                first, n = offsets["leading"]
                parts.append(torch.arange(n, device=kept.device) + first + b * n)
            parts.append(kept[before:after] + b * seq_len)
            if "merged" in offsets:
                first, n = offsets["merged"]
                parts.append(torch.arange(n, device=kept.device) + first + b * n)
            parts.append(kept[after:] + b * seq_len)
            rows.append(torch.cat(parts))

        new_len = max(len(r) for r in rows)
        index = torch.zeros(batch, new_len, dtype=torch.long, device=hidden.device)
        valid = torch.zeros(batch, new_len, dtype=torch.bool, device=hidden.device)
        for b, order in enumerate(rows):
            index[b, new_len - len(order) :] = order
            valid[b, new_len - len(order) :] = True

        positions = source_pos[index]
        if policy == "reindex":
            positions = contiguous_positions(valid)
        layout = TokenLayout(
            valid=valid,
            visual_id=source_id[index].masked_fill(~valid, TEXT),
            positions=positions.masked_fill(~valid, 0),
        )
        return layout, source[index]


def contiguous_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids 0..n-1 over the real tokens of each row (padding gets 0), as HF generate does."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0).masked_fill(~valid, 0)


def normalise_keep(keep: torch.Tensor | list[torch.Tensor], n_visual: list[int], targets: list[int], method: str) -> list[torch.Tensor]:
    """Check a method's kept indices: one row per sample, unique, in range, the scheduled count."""
    rows = list(keep.unbind(0)) if isinstance(keep, torch.Tensor) else list(keep)
    if len(rows) != len(n_visual):
        raise MethodError(f"method {method!r} returned {len(rows)} rows of indices for a batch of {len(n_visual)}")
    out = []
    for b, (row, n, k) in enumerate(zip(rows, n_visual, targets)):
        row = torch.as_tensor(row).long().flatten()
        if row.numel() != k:
            raise MethodError(f"method {method!r} kept {row.numel()} tokens of sample {b}; its schedule says {k}")
        if row.numel() and (int(row.min()) < 0 or int(row.max()) >= n):
            raise MethodError(f"method {method!r} returned an index outside 0..{n - 1} for sample {b}")
        if row.unique().numel() != row.numel():
            raise MethodError(f"method {method!r} returned duplicate indices for sample {b}")
        out.append(row)
    return out
