"""The decoder's numeric checks: ORT on the KV-cache file against torch on the cache graph, on a
left-padded prefill (past length 0) followed by decode steps that feed ``present`` back as ``past``."""

from __future__ import annotations

import numpy as np
import torch

from ...graph_module import LoraFxModule, copy_module
from ..backends.genai_support import right_padded
from ..format import DecoderLayout
from ..verify.numerics import NumericCheck, output_errors, tolerance, torch_outputs
from ..verify.ort import available_providers
from ..verify.segments import bounded_session

__all__ = ["decode_checks"]


def decode_checks(kv: LoraFxModule, path: str, layout: DecoderLayout, *, dtype=None, providers=None,
                  steps: int = 3, left_padding: bool = True, packed: bool = False) -> list[NumericCheck]:
    """ORT on ``path`` vs torch on ``kv`` (the unfolded LoRA cache graph): a left-padded prefill with
    an empty past, then ``steps`` decode steps of one token feeding each side its own ``present``.

    Positions the mask hides (padding) are excluded: their values are never read later, and fully
    masked attention rows are undefined (torch and ORT fill them differently). A file that also takes
    ``position_ids`` (a builder's decoder) gets the ones the wrapper computes from the mask.
    ``left_padding=False``: no padded row. ``packed=True`` (a builder's file: GroupQueryAttention reads the
    mask as row lengths): ORT gets the same rows with each row's tokens at its front (``right_padded``);
    torch keeps the left-padded batch, and the unmasked positions of both are compared in order.
    """
    session = bounded_session(path, providers=providers or available_providers())
    wants_positions = "position_ids" in {i.name for i in session.get_inputs()}
    ref = copy_module(kv, freeze=False).eval()
    model_dtype = next(p.dtype for p in kv.parameters() if p.is_floating_point())
    float_dtype = dtype or model_dtype
    rtol = tolerance(model_dtype, dtype)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, min(layout.vocab_size, 100), (2, 7), generator=gen)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0 if left_padding else 1  # left padding
    past_t = tuple(torch.zeros(2, s[0], 0, s[1], dtype=float_dtype) for k, v in layout.kv for s in (k, v))
    past_o = [p.numpy() for p in past_t]
    checks = []
    for step in range(steps + 1):
        expected = torch_outputs(ref, (ids, mask, past_t), {})
        ids_o, mask_o = ids.numpy(), mask.numpy()
        if packed:
            ids_o, mask_o = right_padded(ids_o, mask_o) if step == 0 else (ids_o, -np.sort(-mask_o, axis=1))
        feeds = {"input_ids": ids_o, "attention_mask": mask_o, **dict(zip(layout.input_names[2:], past_o, strict=True))}
        if wants_positions:  # prefill: cumsum of the mask - 1; a decode step: the tokens before it
            feeds["position_ids"] = np.where(mask_o == 0, 0, mask_o.cumsum(-1) - 1) if step == 0 else \
                mask_o.sum(1, keepdims=True) - 1
        got = session.run(layout.output_names, feeds)
        valid_q, valid = mask[:, -ids.shape[1]:].bool(), mask.bool()
        # packed rows: a step's tokens are each row's last ones, not the last columns
        ort_q = (mask_o[:, :ids.shape[1]] if packed else mask_o[:, -ids.shape[1]:]).astype(bool)
        ort_kv = mask_o.astype(bool)
        err = output_errors([got[0][ort_q]] + [g.transpose(0, 2, 1, 3)[ort_kv] for g in got[1:]],
                            [expected[0][valid_q]] + [e.transpose(1, 2)[valid] for e in expected[1:]])
        what = f"prefill {tuple(ids.shape)} {'left-padded' if left_padding else 'unpadded'}, past 0" if step == 0 else \
            f"decode step {step}, past {past_t[0].shape[2]}"
        checks.append(NumericCheck(what, err.max_abs, err.max_rel, err.max_rel <= rtol and len(got) == len(expected)))
        nxt = expected[0][:, -1].argmax(-1, keepdim=True)
        ids, mask = nxt, torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        past_t, past_o = tuple(expected[1:]), got[1:]
    return checks
