"""SIDTrie against a plain Python dict trie built from the same SID table."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from grcm.decoding import SIDTrie, beams_to_items, constrained_beam_search
from grcm.decoding.sid_table import sid_table_dtype, sid_table_nbytes
from grcm.decoding.trie_levels import LAYOUTS, BitmapLevel, CounterLevel, DenseLevel, KeysLevel


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


# ------------------------------------------------------------------ compact layouts
def ace_like_codes(num_items: int, seed: int = 0) -> tuple[np.ndarray, list[int]]:
    """Rows ``(c0, c1, c2, u)``: vocab (9, 256, 19) with skewed c2, plus the unique token u (rank among equal heads)."""
    rng = np.random.default_rng(seed)
    skew = np.arange(1, 20, dtype=np.float64) ** -1.5
    head = np.stack(
        [
            rng.integers(0, 9, num_items),
            rng.integers(0, 256, num_items),
            rng.choice(19, num_items, p=skew / skew.sum()),
        ],
        axis=1,
    )
    unique = np.zeros(num_items, dtype=np.int64)
    seen: dict[tuple[int, ...], int] = {}
    for row, key in enumerate(map(tuple, head.tolist())):
        unique[row] = seen.get(key, 0)
        seen[key] = unique[row] + 1
    return np.concatenate([head, unique[:, None]], axis=1), [9, 256, 19, int(unique.max()) + 1]


def assert_same_as_dict_trie(trie: SIDTrie, codes: np.ndarray) -> None:
    """Every state's mask, every (state, code) transition and every leaf's items, against nested dicts."""
    levels = codes.shape[1]
    reference = dict_trie(codes)
    depths = prefixes_by_depth(reference, levels)
    assert trie.level_sizes == tuple(len(d) for d in depths)
    for depth in range(levels):
        size = trie.vocab_sizes[depth]
        states = torch.arange(-1, len(depths[depth]))  # the dead state, then all states in order
        expected = torch.zeros(len(states), size, dtype=torch.bool)
        for row, (_, node) in enumerate(depths[depth], start=1):
            expected[row, [c for c in node if c != "items"]] = True
        assert torch.equal(trie.valid_mask(states, depth), expected), f"mask at depth {depth}"
        grid_codes = torch.arange(-1, size + 1).repeat(len(states))  # out-of-range codes on both sides
        nxt = trie.advance(states.repeat_interleave(size + 2), grid_codes, depth).reshape(
            len(states), size + 2
        )
        assert torch.equal(nxt[:, 1:-1] >= 0, expected) and bool((nxt[:, [0, -1]] == -1).all())
        # children, taken state by state and code by code, are numbered 0, 1, 2, ... (lexicographic order)
        assert nxt[:, 1:-1][expected].tolist() == list(range(len(depths[depth + 1])))
    leaves = trie.lookup(torch.from_numpy(codes))
    for row, items in enumerate(trie.items_of_leaves(leaves).tolist()):
        node = reference
        for code in codes[row].tolist():
            node = node[code]
        assert [i for i in items if i >= 0] == sorted(node["items"])


LAYOUT_OPTIONS = [
    # level 1 (9 states x 256 codes) fits the dense floor; level 2 (~1100 states, ~1 child each) takes keys
    ({}, ("dense", "dense", "keys", "counter")),
    ({"dense_levels": 1}, ("dense", "bitmap", "keys", "counter")),
    ({"dense_levels": 0}, ("counter", "bitmap", "keys", "counter")),  # the root's 9 children are 0..8
    ({"bitmap_max_vocab": 256}, ("dense", "dense", "bitmap", "counter")),
    ({"dense_levels": 1, "bitmap_max_vocab": 0}, ("dense", "keys", "keys", "counter")),
    ({"counter_levels": False, "dense_levels": 0}, ("bitmap", "bitmap", "keys", "keys")),
    ({"counter_levels": False, "dense_levels": 0, "bitmap_max_vocab": 0}, ("keys",) * 4),
    ({"dense_levels": 4}, ("dense",) * 4),
]


@pytest.mark.parametrize(("options", "layouts"), LAYOUT_OPTIONS)
def test_every_layout_matches_dict_trie(options, layouts):
    codes, vocab_sizes = ace_like_codes(1200)
    trie = SIDTrie.from_codes(codes, vocab_sizes, **options)
    assert trie.layouts == layouts
    # counter levels need no bitmap unless one is asked for; bitmap levels always have one
    for layout, bits, size in zip(trie.layouts, trie.child_bits, vocab_sizes):
        if layout == "bitmap":
            assert bits is not None
        if layout == "counter" and "bitmap_max_vocab" not in options:
            assert bits is None
        if "bitmap_max_vocab" in options:
            assert (bits is not None) == (size <= options["bitmap_max_vocab"])
    assert_same_as_dict_trie(trie, codes)


def test_automatic_layout_picks_the_smaller_of_bitmaps_and_keys():
    codes, vocab_sizes = ace_like_codes(1200)
    trie = SIDTrie.from_codes(codes, vocab_sizes, dense_levels=0, counter_levels=False)
    parts = trie.nbytes_by_component()
    # level 1: 9 bushy states (~130 children each): 9 x 32 bitmap bytes beat ~1100 keys
    assert trie.layouts[1] == "bitmap" and parts["level1.child_bits"] == 9 * 32
    # level 2: ~1100 states with about one child each: the keys are smaller than 3-byte bitmaps + pointers
    assert trie.layouts[2] == "keys"
    assert parts["level2.child_keys"] < trie.level_sizes[2] * 3 + 2 * (trie.level_sizes[2] + 1)
    # forcing bitmaps everywhere costs more bytes for the same answers
    forced = SIDTrie.from_codes(
        codes, vocab_sizes, dense_levels=0, counter_levels=False, bitmap_max_vocab=256
    )
    assert forced.nbytes() > trie.nbytes()


@pytest.mark.parametrize(("num_items", "index_dtype"), [(1_000, torch.int16), (40_000, torch.int32)])
def test_stored_integers_are_narrow(num_items, index_dtype):
    generator = torch.Generator().manual_seed(num_items)
    codes = torch.randint(0, 128, (num_items, 3), generator=generator)
    codes = torch.cat([codes, torch.zeros(num_items, 1, dtype=torch.long)], 1)  # a constant unique token
    trie = SIDTrie.from_codes(codes, [128, 128, 128, 1])
    named = trie.named_tensors()
    assert trie.layouts[-1] == "counter"
    for name, tensor in named.items():
        if name.endswith("child_bits"):
            assert tensor.dtype == torch.uint8
        else:
            assert tensor.dtype in (torch.int16, torch.int32), name
    assert named["leaf_items"].dtype == index_dtype
    assert named[f"level{trie.num_levels - 1}.row_ptr"].dtype == index_dtype
    moved = trie.to("cpu")
    assert {n: t.dtype for n, t in moved.named_tensors().items()} == {n: t.dtype for n, t in named.items()}
    # queries still answer in int64
    leaves = trie.lookup(codes[:50])
    assert leaves.dtype == torch.long and trie.items_of_leaves(leaves).dtype == torch.long
    assert trie.valid_mask(torch.tensor([0, -1]), 0).dtype == torch.bool
    assert bool((trie.items_of_leaves(leaves)[:, 0] == torch.arange(50)).all())


@pytest.mark.parametrize(("num_states", "key_dtype"), [(65_536, torch.int32), (65_537, torch.int64)])
def test_child_keys_widen_when_state_times_vocab_leaves_int32(num_states, key_dtype):
    # level 1 has num_states parents x 32768 codes: the largest query is num_states * 2**15 - 1
    rng = np.random.default_rng(0)
    codes = np.stack([np.arange(num_states), rng.integers(1, 2**15 - 1, num_states)], axis=1)
    codes[-1, 1] = 2**15 - 2
    trie = SIDTrie.from_codes(codes, [num_states, 2**15])
    assert trie.layouts == ("dense", "keys")
    assert trie.levels[1].child_keys.dtype == key_dtype
    leaves = trie.lookup(torch.from_numpy(codes))
    assert torch.equal(trie.items_of_leaves(leaves)[:, 0], torch.arange(num_states))
    last = num_states - 1
    assert trie.lookup(torch.tensor([[last, 2**15 - 1], [last, 0], [last, 2**15 - 2]])).tolist() == [
        -1,
        -1,
        last,
    ]


def test_leaf_item_pointers_are_stored_only_for_shared_sids():
    codes = uneven_codes(4, (5, 4, 6))
    unique = SIDTrie.from_codes(codes, (5, 4, 6))
    assert unique.leaf_item_ptr is None and "leaf_item_ptr" not in unique.nbytes_by_component()
    assert unique.max_items_per_leaf == 1
    shared = SIDTrie.from_codes(np.concatenate([codes, codes[:3]]), (5, 4, 6))
    assert shared.leaf_item_ptr is not None and shared.max_items_per_leaf == 2
    assert shared.nbytes_by_component()["leaf_item_ptr"] == (shared.num_leaves + 1) * 2  # int16
    leaves = unique.lookup(torch.from_numpy(codes))
    assert unique.items_of_leaves(leaves, max_per_leaf=3).tolist() == [[i, -1, -1] for i in range(len(codes))]
    assert unique.items_of_leaves(torch.tensor([-1]), 2).tolist() == [[-1, -1]]


def test_nbytes_by_component_names_every_tensor():
    codes, vocab_sizes = ace_like_codes(300)
    trie = SIDTrie.from_codes(codes, vocab_sizes, bitmap_max_vocab=256)
    parts = trie.nbytes_by_component()
    expected_names = {"leaf_items"}
    for index, level in enumerate(trie.levels):
        field = {"dense": "dense_table", "counter": "row_ptr", "bitmap": "row_ptr", "keys": "child_keys"}
        expected_names.add(f"level{index}.{field[level.layout]}")
        if level.child_bits is not None:
            expected_names.add(f"level{index}.child_bits")
    assert set(parts) == expected_names
    assert (
        parts["level0.dense_table"] == 9 * trie.level_sizes[1] * 0 + 9 * 2
    )  # one root row of 9 int16 entries
    assert parts["level3.row_ptr"] == (trie.level_sizes[3] + 1) * 2
    assert trie.nbytes() == sum(parts.values()) == sum(t.numel() * t.element_size() for t in trie.tensors())


def test_sid_table_nbytes_uses_the_narrowest_dtype_per_level():
    codes = torch.zeros(10, 4, dtype=torch.long)
    vocab_sizes = [256, 257, 32_768, 32_769]
    expected = sum(np.zeros(10, dtype=d).nbytes for d in (np.uint8, np.int16, np.int16, np.int32))
    assert (
        sid_table_nbytes(codes, vocab_sizes) == sid_table_nbytes(codes.numpy(), vocab_sizes) == expected == 90
    )
    assert [sid_table_dtype(v) for v in vocab_sizes] == [torch.uint8, torch.int16, torch.int16, torch.int32]
    with pytest.raises(ValueError, match="len\\(vocab_sizes\\)"):
        sid_table_nbytes(codes, vocab_sizes[:3])


def test_layouts_give_identical_beams_and_items():
    codes, vocab_sizes = ace_like_codes(3000, seed=1)
    generator = torch.Generator().manual_seed(0)
    logits = [torch.randn(6 * 20, v, generator=generator) for v in vocab_sizes]

    def step_fn(prefix):
        return logits[prefix.shape[1]] + prefix.sum(1, keepdim=True).float().sin()

    outputs = []
    for options, _ in LAYOUT_OPTIONS:
        trie = SIDTrie.from_codes(codes, vocab_sizes, **options)
        output = constrained_beam_search(step_fn, 6, 20, trie, vocab_sizes)
        outputs.append((output.sequences, output.scores, beams_to_items(output, trie)))
    members = {tuple(r) for r in codes.tolist()}
    assert all(tuple(s) in members for s in outputs[0][0].reshape(-1, 4).tolist())
    for sequences, scores, items in outputs[1:]:
        assert torch.equal(sequences, outputs[0][0]) and torch.equal(scores, outputs[0][1])
        assert torch.equal(items, outputs[0][2])


def test_trie_level_names_missing_tensors():
    with pytest.raises(ValueError, match="bitmap level needs child_bits"):
        BitmapLevel(
            vocab_size=2, num_states=1, max_branch=1, row_ptr=torch.zeros(2, dtype=torch.int16), child_bits=None
        )
    with pytest.raises(TypeError, match="child_bits"):
        BitmapLevel(vocab_size=2, num_states=1, max_branch=1, row_ptr=torch.zeros(2, dtype=torch.int16))
    with pytest.raises(ValueError, match="keys level needs child_keys"):
        KeysLevel(vocab_size=2, num_states=1, max_branch=1, child_keys=None)


def test_each_layout_is_one_level_class():
    """The trie's layout names are its level classes' (one class per layout), and ``to`` keeps the class."""
    assert LAYOUTS == ("dense", "counter", "bitmap", "keys")
    classes = {"dense": DenseLevel, "counter": CounterLevel, "bitmap": BitmapLevel, "keys": KeysLevel}
    codes, vocab_sizes = ace_like_codes(1200)
    for options, layouts in LAYOUT_OPTIONS:
        trie = SIDTrie.from_codes(codes, vocab_sizes, **options)
        assert [type(level) for level in trie.levels] == [classes[name] for name in layouts]
        assert [type(level) for level in trie.to("cpu").levels] == [classes[name] for name in layouts]
