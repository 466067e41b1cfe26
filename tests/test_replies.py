"""replies.py: micro-batches bound rows and padded tokens."""


import replies


def test_micro_batches_bound_rows_and_padded_tokens():
    lengths = [5, 300, 40, 41, 2000, 39, 7, 300]
    groups = replies.micro_batches(lengths, max_rows=3, max_tokens=400)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))  # every row once
    for g in groups:
        assert len(g) <= 3 and (len(g) == 1 or len(g) * max(lengths[i] for i in g) <= 400)
    assert [4] in groups  # the long row goes alone
    assert replies.micro_batches(lengths, 8, 10**9) == [sorted(range(8), key=lambda i: -lengths[i])]
