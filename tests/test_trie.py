"""SIDTrie against a plain Python dict trie built from the same SID table."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from grcm.decoding import SIDTrie


def uneven_codes(seed: int, vocab_sizes: tuple[int, ...], duplicates: int = 0) -> np.ndarray:
    """Random SID table with uneven branching: most prefixes have 1-2 children, a few have all V."""
    rng = np.random.default_rng(seed)
    prefixes: list[tuple[int, ...]] = [()]
    for size in vocab_sizes:
        grown = []
        for prefix in prefixes:
            branch = int(rng.choice([1, 1, 1, 2, 3, size]))
            branch = min(branch, size)
            for code in rng.choice(size, branch, replace=False):
                grown.append((*prefix, int(code)))
        prefixes = grown
    codes = np.array(prefixes, dtype=np.int64)
    if duplicates:
        codes = np.concatenate([codes, codes[rng.integers(0, len(codes), duplicates)]])
    return codes[rng.permutation(len(codes))]


def dict_trie(codes: np.ndarray, row_items: np.ndarray | None = None) -> dict:
    """Nested dicts; a leaf holds the sorted list of its items under the key "items"."""
    items = np.arange(len(codes)) if row_items is None else row_items
    root: dict = {}
    for row, item in zip(codes.tolist(), items.tolist()):
        node = root
        for code in row:
            node = node.setdefault(code, {})
        node.setdefault("items", set()).add(item)
    return root


def prefixes_by_depth(root: dict, num_levels: int) -> list[list[tuple[tuple[int, ...], dict]]]:
    depths: list[list[tuple[tuple[int, ...], dict]]] = [[((), root)]]
    for _ in range(num_levels):
        depths.append(
            [((*p, c), child) for p, node in depths[-1] for c, child in sorted(node.items()) if c != "items"]
        )
    return depths


def walk(trie: SIDTrie, prefixes: list[tuple[int, ...]], depth: int) -> torch.Tensor:
    states = torch.zeros(len(prefixes), dtype=torch.long)
    if depth:
        table = torch.tensor(prefixes, dtype=torch.long)
        for level in range(depth):
            states = trie.advance(states, table[:, level], level)
    return states


VOCABS = [(5, 4, 6), (7, 3, 5, 9), (2, 11, 3, 4)]


@pytest.mark.parametrize("vocab_sizes", VOCABS)
@pytest.mark.parametrize("dense_levels", [0, 1, None, "all"])
@pytest.mark.parametrize("duplicates", [0, 15])
@pytest.mark.parametrize("bitmap_max_vocab", [0, 6, 256])  # none, some, all levels with bitmaps
def test_transitions_and_masks_match_dict_trie(vocab_sizes, dense_levels, duplicates, bitmap_max_vocab):
    codes = uneven_codes(sum(vocab_sizes) + duplicates, vocab_sizes, duplicates)
    levels = len(vocab_sizes)
    dense = levels if dense_levels == "all" else dense_levels
    trie = SIDTrie.from_codes(
        torch.from_numpy(codes),
        vocab_sizes,
        dense_levels=dense,
        dense_max_entries=40,
        bitmap_max_vocab=bitmap_max_vocab,
    )
    assert [b is not None for b in trie.child_bits] == [v <= bitmap_max_vocab for v in vocab_sizes]
    reference = dict_trie(codes)
    depths = prefixes_by_depth(reference, levels)

    assert trie.level_sizes == tuple(len(d) for d in depths)
    if dense is None:  # the longest leading run of levels whose table has at most 40 entries
        dense = next((lv for lv in range(levels) if len(depths[lv]) * vocab_sizes[lv] > 40), levels)
    assert trie.dense_levels == dense
    for depth in range(levels):
        prefixes = [p for p, _ in depths[depth]]
        states = walk(trie, prefixes, depth)
        # lexicographic numbering: the k-th prefix in sorted order is state k
        assert states.tolist() == list(range(len(prefixes)))
        expected = torch.zeros(len(prefixes), vocab_sizes[depth], dtype=torch.bool)
        for row, (_, node) in enumerate(depths[depth]):
            for code in node:
                if code != "items":
                    expected[row, code] = True
        assert torch.equal(trie.valid_mask(states, depth), expected)
        assert trie.max_branch[depth] == int(expected.sum(1).max())
        # every (state, code) pair: advance is a child state iff the code is allowed
        grid_states = states.repeat_interleave(vocab_sizes[depth])
        grid_codes = torch.arange(vocab_sizes[depth]).repeat(len(prefixes))
        nxt = trie.advance(grid_states, grid_codes, depth)
        assert torch.equal(nxt >= 0, expected.reshape(-1))
        children = [(*p, c) for p, node in depths[depth] for c in sorted(k for k in node if k != "items")]
        assert nxt[nxt >= 0].tolist() == walk(trie, children, depth + 1).tolist()


@pytest.mark.parametrize("duplicates", [0, 25])
def test_leaves_map_to_sorted_items(duplicates):
    vocab_sizes = (4, 5, 3)
    codes = uneven_codes(3, vocab_sizes, duplicates)
    trie = SIDTrie.from_codes(codes, vocab_sizes)
    reference = dict_trie(codes)
    leaves = trie.lookup(torch.from_numpy(codes))
    assert bool((leaves >= 0).all())
    block = trie.items_of_leaves(leaves)
    for row, code_row in enumerate(codes.tolist()):
        node = reference
        for code in code_row:
            node = node[code]
        expected = sorted(node["items"])
        got = [i for i in block[row].tolist() if i >= 0]
        assert got == expected
        assert row in got
    assert trie.max_items_per_leaf == int(np.unique(codes, axis=0, return_counts=True)[1].max())
    assert trie.num_items == len(codes)
    # a narrower block keeps the smallest items of each leaf
    narrow = trie.items_of_leaves(leaves, max_per_leaf=1)
    assert narrow[:, 0].tolist() == block[:, 0].tolist()


def test_lookup_rejects_sids_outside_the_trie():
    vocab_sizes = (6, 6, 6)
    codes = uneven_codes(11, vocab_sizes)
    trie = SIDTrie.from_codes(codes, vocab_sizes)
    members = {tuple(r) for r in codes.tolist()}
    everything = torch.tensor(list(itertools.product(*[range(v) for v in vocab_sizes])))
    inside = trie.contains(everything)
    assert inside.tolist() == [tuple(r) in members for r in everything.tolist()]
    # out-of-range and -1 codes are misses, not errors
    odd = torch.tensor([[-1, 0, 0], [6, 0, 0], [0, 99, 0]])
    assert trie.lookup(odd).tolist() == [-1, -1, -1]
    assert trie.items_of_leaves(torch.tensor([-1]), 3).tolist() == [[-1, -1, -1]]


@pytest.mark.parametrize("bitmap_max_vocab", [0, 256])
def test_dead_states_allow_nothing(bitmap_max_vocab):
    trie = SIDTrie.from_codes(
        torch.tensor([[0, 1], [2, 0]]), [3, 2], dense_levels=1, bitmap_max_vocab=bitmap_max_vocab
    )
    for level in range(2):
        assert not bool(trie.valid_mask(torch.tensor([-1, -1]), level).any())
        assert trie.advance(torch.tensor([-1]), torch.tensor([0]), level).tolist() == [-1]


def test_multi_view_rows_share_items():
    codes = torch.tensor([[0, 1], [1, 0], [0, 1], [1, 1], [1, 0]])
    row_items = torch.tensor([7, 7, 3, 7, 3])  # item 7 owns three SIDs, (1, 0) is shared
    trie = SIDTrie.from_codes(codes, [2, 2], row_items=row_items)
    leaves = trie.lookup(torch.tensor([[0, 1], [1, 0], [1, 1]]))
    assert trie.items_of_leaves(leaves).tolist() == [[3, 7], [3, 7], [7, -1]]
    assert trie.num_items == 2


def test_dense_and_csr_layouts_agree_and_report_bytes():
    vocab_sizes = (8, 8, 8, 8)
    codes = uneven_codes(5, vocab_sizes, duplicates=10)
    dense = SIDTrie.from_codes(codes, vocab_sizes, dense_levels=4, bitmap_max_vocab=0)
    csr = SIDTrie.from_codes(codes, vocab_sizes, dense_levels=0, bitmap_max_vocab=0)
    auto = SIDTrie.from_codes(codes, vocab_sizes)
    assert dense.dense_levels == 4 and csr.dense_levels == 0
    assert auto.dense_levels == 4  # every table is tiny
    sequences = torch.from_numpy(codes)
    assert torch.equal(dense.lookup(sequences), csr.lookup(sequences))
    for level in range(4):
        states = torch.arange(-1, auto.level_sizes[level])
        masks = [trie.valid_mask(states, level) for trie in (dense, csr, auto)]
        assert torch.equal(masks[0], masks[1]) and torch.equal(masks[0], masks[2])
    for trie in (dense, csr, auto):
        assert trie.nbytes() == sum(t.numel() * t.element_size() for t in trie.tensors())
        moved = trie.to("cpu")
        assert moved.nbytes() == trie.nbytes() and moved.device.type == "cpu"
        assert torch.equal(moved.lookup(sequences), trie.lookup(sequences))
    assert csr.nbytes() < dense.nbytes()


def test_auto_dense_levels_follow_the_table_budget():
    codes = torch.stack([torch.arange(64) % 4, torch.arange(64) // 4 % 16, torch.arange(64) // 2 % 32], 1)
    trie = SIDTrie.from_codes(codes, [4, 16, 32], dense_max_entries=64)
    # level 0: 1 x 4 entries, level 1: 4 x 16 = 64 entries, level 2: 64 x 32 > 64
    assert trie.level_sizes[:3] == (1, 4, 64)
    assert trie.dense_levels == 2


def test_vectorised_build_handles_many_items():
    generator = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 64, (200_000, 3), generator=generator)
    trie = SIDTrie.from_codes(codes, [64, 64, 64])
    assert trie.level_sizes[:3] == (1, 64, 64 * 64)
    assert trie.level_sizes[3] == len(torch.unique(codes, dim=0))
    sample = codes[:1000]
    items = trie.items_of_leaves(trie.lookup(sample))
    assert bool((items == torch.arange(1000)[:, None]).any(1).all())


@pytest.mark.parametrize(
    ("codes", "vocab_sizes", "kwargs", "error", "message"),
    [
        (torch.tensor([0, 1, 2]), [3], {}, ValueError, "2-D"),
        (torch.tensor([[0, 1]]), [3], {}, ValueError, "vocab_sizes has 1"),
        (torch.tensor([[0, 3]]), [3, 3], {}, ValueError, "level 1 codes span"),
        (torch.tensor([[0, -1]]), [3, 3], {}, ValueError, "level 1"),
        (torch.tensor([[0.0, 1.0]]), [3, 3], {}, TypeError, "integers"),
        (torch.zeros(0, 2, dtype=torch.long), [3, 3], {}, ValueError, "empty"),
        (torch.tensor([[0, 1]]), [3, 3], {"row_items": torch.tensor([0, 1])}, ValueError, "row_items"),
        (torch.tensor([[0, 1]]), [3, 3], {"dense_levels": 3}, ValueError, "dense_levels"),
    ],
)
def test_bad_input_raises_clear_errors(codes, vocab_sizes, kwargs, error, message):
    with pytest.raises(error, match=message):
        SIDTrie.from_codes(codes, vocab_sizes, **kwargs)


def test_level_out_of_range_is_an_index_error():
    trie = SIDTrie.from_codes(torch.tensor([[0, 1]]), [2, 2])
    with pytest.raises(IndexError, match="level 2"):
        trie.valid_mask(torch.tensor([0]), 2)
