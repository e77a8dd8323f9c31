"""The token layout of a left-padded batch, and how pruning reshapes it.

A :class:`TokenLayout` says, for every slot of a ``(B, S)`` batch, whether it holds a real token,
whether that token is visual (and which original image patch it came from), and its position id:
``(B, S)`` for 1-D RoPE, ``(3, B, S)`` (temporal, height, width) for Qwen2-VL's M-RoPE.
Pruning keeps a subset of each sample's visual tokens (plus optional merged tokens), drops the
rest and left-pads the batch again, so samples may keep different sets and even counts.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Literal

import torch

from prunebench.errors import MethodError

PositionPolicy = Literal["original", "reindex"]

TEXT = -1  # visual_id of text tokens and padding
MERGED = -2  # visual_id of tokens a method built by merging


@dataclass
class TokenLayout:
    valid: torch.Tensor  # (B, S) bool: a real token, not padding
    visual_id: torch.Tensor  # (B, S) long: original patch index, MERGED, or TEXT
    positions: torch.Tensor  # (B, S) or (3, B, S) long: rotary position ids

    @classmethod
    def from_inputs(cls, attention_mask: torch.Tensor, visual: torch.Tensor, positions: torch.Tensor | None = None) -> TokenLayout:
        """``positions``: the model's own position ids (M-RoPE); default contiguous 0..n-1."""
        valid = attention_mask.bool()
        visual = visual & valid
        visual_id = (visual.long().cumsum(-1) - 1).masked_fill(~visual, TEXT)
        if positions is None:
            positions = contiguous_positions(valid)
        return cls(valid=valid, visual_id=visual_id, positions=positions)

    @property
    def multimodal(self) -> bool:
        """M-RoPE: one row of position ids per rotary section (temporal, height, width)."""
        return self.positions.dim() == 3

    def next_position(self) -> torch.Tensor:
        """``(B,)`` position id of the next token: one past the largest id of any real token (HF's
        rule; under M-RoPE text after an image continues from max(position) + 1)."""
        sections = self.positions if self.multimodal else self.positions[None]
        return sections.masked_fill(~self.valid[None], -1).amax(dim=(0, 2)) + 1

    def positions_at(self, slots: torch.Tensor) -> torch.Tensor:
        """Position ids of the ``(B, R)`` ``slots``: ``(B, R)``, or ``(3, B, R)`` under M-RoPE."""
        if not self.multimodal:
            return self.positions.gather(1, slots)
        return self.positions.gather(2, slots[None].expand(self.positions.shape[0], -1, -1))

    @property
    def order(self) -> torch.Tensor:
        """``(B, S)`` index of each real token among its sample's real tokens (padding 0)."""
        return contiguous_positions(self.valid)

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
        Under "reindex" every token gets its contiguous index; under M-RoPE see :func:`mrope_reindex`.
        """
        batch, seq_len, width = hidden.shape
        slots = self.visual_positions()
        # Flat source: every (sample, slot) of `hidden`, then each block of built tokens.
        source = [hidden.reshape(batch * seq_len, width)]
        source_id = [self.visual_id.flatten()]
        sections = self.positions if self.multimodal else self.positions[None]  # (P, B, S)
        source_pos = [sections.flatten(1)]
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
            edge_pos = torch.stack([sections[:, b, slots[b][edge]] for b in range(batch)], dim=1)  # (P, B)
            source_pos.append(edge_pos.repeat_interleave(n, dim=1))
        source, source_id, source_pos = torch.cat(source), torch.cat(source_id), torch.cat(source_pos, dim=1)

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

        positions = source_pos[:, index].masked_fill(~valid[None], 0)  # (P, B, new_len)
        visual_id = source_id[index].masked_fill(~valid, TEXT)
        if policy == "reindex":
            positions = mrope_reindex(positions, valid, visual_id != TEXT) if self.multimodal else contiguous_positions(valid)[None]
        layout = TokenLayout(valid=valid, visual_id=visual_id, positions=positions if self.multimodal else positions[0])
        return layout, source[index]


def contiguous_positions(valid: torch.Tensor) -> torch.Tensor:
    """Position ids 0..n-1 over the real tokens of each row (padding gets 0), as HF generate does."""
    return (valid.long().cumsum(-1) - 1).clamp(min=0).masked_fill(~valid, 0)


def mrope_reindex(positions: torch.Tensor, valid: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:
    """M-RoPE ids rebuilt over the kept tokens the way Qwen2-VL's ``get_rope_index`` builds them:
    a text token continues from the previous token + 1; an image's kept tokens keep their (t, h, w)
    offsets from the image's start (the smallest id among them: every token of a single-frame image
    shares it as its temporal id) and the text after them continues from their largest id + 1.
    Nothing dropped gives back the original ids (keep-all stays exact); a pruned image no longer
    stretches the text after it past the rows and columns it lost.
    ``positions``: ``(3, B, S)``; ``valid``, ``visual``: ``(B, S)``."""
    out = torch.zeros_like(positions)
    for b in range(positions.shape[1]):
        slots = valid[b].nonzero().flatten()
        kind = visual[b, slots]
        starts = [0, *((kind[1:] != kind[:-1]).nonzero().flatten() + 1).tolist(), len(slots)]
        cursor = 0
        for start, end in itertools.pairwise(starts):
            run = slots[start:end]
            if kind[start]:
                ids = positions[:, b, run]
                ids = ids - ids.min() + cursor
            else:
                ids = torch.arange(cursor, cursor + end - start, device=positions.device).expand(positions.shape[0], -1)
            out[:, b, run] = ids
            cursor = int(ids.max()) + 1
    return out


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
