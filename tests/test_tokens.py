"""The plugin packs text datasets itself (so that a cached re-run need not import sae_lens);
its packing must be sae_lens's, context for context."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from sae_lens.tokenization_and_batching import concat_and_batch_sequences

from pytest_sae_transfer.loading.tokens import _packed_contexts

BOS = 1

documents = st.lists(
    st.lists(st.integers(0, 6), min_size=1, max_size=40),  # token 1 is BOS: documents may start with it
    min_size=0, max_size=12,
)


def sae_lens_packing(docs: list[list[int]], prepend_bos: bool, context_size: int, n: int, bos: int | None) -> list[list[int]]:
    out = []
    for ctx in concat_and_batch_sequences(
        (torch.tensor(d, dtype=torch.long) for d in docs),
        context_size=context_size,
        begin_batch_token_id=bos if prepend_bos else None,
        begin_sequence_token_id=None,
        sequence_separator_token_id=bos,
    ):
        out.append(ctx.tolist())
        if len(out) == n:
            break
    return out


@settings(max_examples=300, deadline=None)
@given(docs=documents, prepend_bos=st.booleans(), context_size=st.integers(2, 9), n=st.integers(1, 30),
       has_bos=st.booleans())
def test_packing_equals_sae_lens(docs: list[list[int]], prepend_bos: bool, context_size: int, n: int, has_bos: bool) -> None:
    bos = BOS if has_bos else None
    ours = _packed_contexts((torch.tensor(d, dtype=torch.long) for d in docs), bos, prepend_bos, context_size, n)
    assert [c.tolist() for c in ours] == sae_lens_packing(docs, prepend_bos, context_size, n, bos)
    assert all(c.dtype == torch.long and c.shape == (context_size,) for c in ours)


def test_packing_separates_documents_and_opens_contexts_with_bos() -> None:
    ours = _packed_contexts(iter([torch.tensor([5, 6, 7]), torch.tensor([1, 8]), torch.tensor([9, 9, 9, 9])]), BOS, True, 4, 10)
    # BOS opens every context; a document starting with BOS is not given a second one;
    # the incomplete last context is not emitted
    assert [c.tolist() for c in ours] == [[1, 5, 6, 7], [1, 8, 1, 9], [1, 9, 9, 9]]
