"""Exact constrained beam search against two oracles: a plain Python trie beam search and transformers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from benchmark_scripts import load_benchmark

from grcm.decoding import (
    BeamSearchOutput,
    SIDTrie,
    beam_search,
    beams_to_items,
    beams_to_scored_items,
    constrained_beam_search,
    stable_topk,
)
from grcm.metrics import fixed_width


# ----------------------------------------------------------------------------- fixtures
class TinyStepModel:
    """Random query-conditioned autoregressive model over SID levels (float64 weights).

    ``logits(query_ids (R,), prefix (R, t)) -> (R, V_t)``.
    """

    def __init__(self, vocab_sizes: tuple[int, ...], num_queries: int, seed: int, dim: int = 12) -> None:
        g = torch.Generator().manual_seed(seed)
        self.query = torch.randn(num_queries, dim, generator=g, dtype=torch.float64)
        self.code_embedding = [torch.randn(v, dim, generator=g, dtype=torch.float64) for v in vocab_sizes]
        self.mix = torch.randn(dim, dim, generator=g, dtype=torch.float64) / math.sqrt(dim)
        self.heads = [torch.randn(dim, v, generator=g, dtype=torch.float64) * 1.5 for v in vocab_sizes]

    def logits(self, query_ids: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        hidden = self.query[query_ids]
        for level in range(prefix.shape[1]):
            hidden = torch.tanh((hidden + self.code_embedding[level][prefix[:, level]]) @ self.mix)
        return hidden @ self.heads[prefix.shape[1]]

    def step_fn(self, batch_size: int, beam_size: int):
        query_ids = torch.arange(batch_size).repeat_interleave(beam_size)
        return lambda prefix: self.logits(query_ids, prefix)


def uneven_codes(seed: int, vocab_sizes: tuple[int, ...], duplicates: int = 0) -> np.ndarray:
    """Random SID table with uneven branching: most prefixes have 1-2 children, a few have all V."""
    rng = np.random.default_rng(seed)
    prefixes: list[tuple[int, ...]] = [()]
    for size in vocab_sizes:
        grown = []
        for prefix in prefixes:
            branch = min(int(rng.choice([1, 1, 1, 2, 3, size])), size)
            grown += [(*prefix, int(code)) for code in rng.choice(size, branch, replace=False)]
        prefixes = grown
    codes = np.array(prefixes, dtype=np.int64)
    if duplicates:
        codes = np.concatenate([codes, codes[rng.integers(0, len(codes), duplicates)]])
    return codes[rng.permutation(len(codes))]


def reference_beam_search(model, query, beam_size, vocab_sizes, codes, constrained):
    """Plain Python beam search over a set-of-prefixes trie, one beam at a time.

    Returns ``(sequences, scores)``: up to ``beam_size`` code tuples and float32 scores,
    ranked by score, then parent rank, then code.
    """
    prefixes = {tuple(row[:t]) for row in codes.tolist() for t in range(len(vocab_sizes) + 1)}
    beams: list[tuple[tuple[int, ...], torch.Tensor]] = [((), torch.tensor(0.0))]
    for size in vocab_sizes:
        candidates = []
        for rank, (sequence, score) in enumerate(beams):
            logits = model.logits(
                torch.tensor([query]), torch.tensor([sequence], dtype=torch.long).reshape(1, -1)
            )
            log_probs = torch.log_softmax(logits.float(), dim=-1)[0]
            for code in range(size):
                if constrained and (*sequence, code) not in prefixes:
                    continue
                candidates.append((score + log_probs[code], rank, code))
        candidates.sort(key=lambda c: (-float(c[0]), c[1], c[2]))
        beams = [(beams[rank][0] + (code,), total) for total, rank, code in candidates[:beam_size]]
    return [b[0] for b in beams], [float(b[1]) for b in beams]


def assert_matches_reference(output, model, vocab_sizes, codes, constrained):
    batch_size, beam_size, _ = output.sequences.shape
    for query in range(batch_size):
        sequences, scores = reference_beam_search(model, query, beam_size, vocab_sizes, codes, constrained)
        found = len(sequences)
        assert output.sequences[query, :found].tolist() == [list(s) for s in sequences]
        torch.testing.assert_close(output.scores[query, :found], torch.tensor(scores), rtol=0, atol=1e-6)
        # beams beyond the valid continuations: score -inf, sequence -1
        assert bool(torch.isneginf(output.scores[query, found:]).all())
        assert bool((output.sequences[query, found:] == -1).all())


# ----------------------------------------------------------------------- oracle (a)
CASES = [
    # vocab_sizes, beam_size, duplicate rows (items sharing a SID)
    ((5, 4, 6), 1, 0),
    ((5, 4, 6), 3, 0),
    ((7, 3, 5, 9), 5, 10),
    ((2, 11, 3, 4), 8, 0),
    ((3, 3, 3), 25, 5),  # more beams than valid SIDs at every depth
]


@pytest.mark.parametrize(("vocab_sizes", "beam_size", "duplicates"), CASES)
@pytest.mark.parametrize("seed", [0, 1])
def test_constrained_search_equals_python_trie_search(vocab_sizes, beam_size, duplicates, seed):
    codes = uneven_codes(seed * 31 + beam_size, vocab_sizes, duplicates)
    # seed 0: CSR transitions, bitmap masks; seed 1: one dense level, padded CSR masks
    trie = SIDTrie.from_codes(codes, vocab_sizes, dense_levels=seed, bitmap_max_vocab=256 * (1 - seed))
    model = TinyStepModel(vocab_sizes, num_queries=3, seed=seed)
    output = constrained_beam_search(model.step_fn(3, beam_size), 3, beam_size, trie, vocab_sizes)
    assert output.sequences.shape == (3, beam_size, len(vocab_sizes))
    assert output.scores.shape == (3, beam_size)
    assert_matches_reference(output, model, vocab_sizes, codes, constrained=True)


@pytest.mark.parametrize(("vocab_sizes", "beam_size"), [((5, 4, 6), 4), ((3, 2, 3), 25)])
def test_unconstrained_search_equals_python_search(vocab_sizes, beam_size):
    codes = uneven_codes(2, vocab_sizes)
    trie = SIDTrie.from_codes(codes, vocab_sizes)
    model = TinyStepModel(vocab_sizes, num_queries=2, seed=3)
    output = constrained_beam_search(
        model.step_fn(2, beam_size), 2, beam_size, trie, vocab_sizes, constrained=False
    )
    assert_matches_reference(output, model, vocab_sizes, codes, constrained=False)


# --------------------------------------------------------------- validity properties
@pytest.mark.parametrize("seed", range(6))
def test_constrained_search_never_emits_an_invalid_sid(seed):
    vocab_sizes = (6, 5, 7, 4)
    codes = uneven_codes(100 + seed, vocab_sizes, duplicates=seed)
    trie = SIDTrie.from_codes(codes, vocab_sizes, dense_levels=seed % 3, bitmap_max_vocab=5 * (seed % 2))
    members = {tuple(row) for row in codes.tolist()}
    beam_size = [1, 5, 25, 50, 7, 13][seed]
    model = TinyStepModel(vocab_sizes, num_queries=4, seed=seed)
    output = constrained_beam_search(model.step_fn(4, beam_size), 4, beam_size, trie, vocab_sizes)
    live = torch.isfinite(output.scores)
    for query in range(4):
        for beam in range(beam_size):
            if live[query, beam]:
                assert tuple(output.sequences[query, beam].tolist()) in members
    # as many live beams as there are valid SIDs, up to the beam size
    assert live.sum(1).tolist() == [min(beam_size, len(members))] * 4
    assert bool((output.scores[:, :-1] >= output.scores[:, 1:]).all())


def test_unconstrained_search_can_emit_invalid_sids_that_recall_nothing():
    vocab_sizes = (8, 8)
    codes = torch.tensor([[0, 0], [1, 1], [2, 2]])  # a sparse trie: 3 of 64 SIDs
    trie = SIDTrie.from_codes(codes, vocab_sizes)
    model = TinyStepModel(vocab_sizes, num_queries=2, seed=0)
    free = constrained_beam_search(model.step_fn(2, 10), 2, 10, trie, vocab_sizes, constrained=False)
    valid = trie.contains(free.sequences)
    assert bool(torch.isfinite(free.scores).all())
    assert int((~valid).sum()) > 0
    items = beams_to_items(free, trie)
    expected = [
        [codes.tolist().index(s) for s, ok in zip(row, oks) if ok]
        for row, oks in zip(free.sequences.tolist(), valid.tolist())
    ]
    assert [[i for i in row if i >= 0] for row in items.tolist()] == expected
    # constrained decoding of the same model recalls all three items
    kept = constrained_beam_search(model.step_fn(2, 10), 2, 10, trie, vocab_sizes)
    assert sorted(i for i in beams_to_items(kept, trie)[0].tolist() if i >= 0) == [0, 1, 2]


# ------------------------------------------------------------------- oracle (b): HF
def test_matches_transformers_prefix_allowed_tokens_fn():
    transformers = pytest.importorskip("transformers")
    vocab_sizes = (6, 5, 4)
    num_levels = len(vocab_sizes)
    offsets = [2 + sum(vocab_sizes[:level]) for level in range(num_levels)]  # 0 = pad/start, 1 = eos
    flat_size = 2 + sum(vocab_sizes)
    torch.manual_seed(0)
    config = transformers.T5Config(
        vocab_size=flat_size,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=1,
        num_decoder_layers=1,
        num_heads=2,
        decoder_start_token_id=0,
        pad_token_id=0,
        eos_token_id=1,
        dropout_rate=0.0,
    )
    model = transformers.T5ForConditionalGeneration(config).eval()

    # The model only ever predicts level-t codes at decoder position t, so a log-softmax over the
    # flat vocabulary equals one over the level's slice.
    level_bias = torch.full((num_levels + 1, flat_size), float("-inf"))
    for level in range(num_levels):
        level_bias[level, offsets[level] : offsets[level] + vocab_sizes[level]] = 0.0
    level_bias[num_levels, 1] = 0.0
    model.lm_head.register_forward_hook(lambda module, inputs, out: out + level_bias[: out.shape[1]])

    batch_size, source_length = 3, 7
    source = torch.randint(2, flat_size, (batch_size, source_length))
    attention = torch.ones_like(source)
    few_sids = np.array([[0, 0, 0], [0, 0, 3], [0, 1, 2], [2, 4, 1], [2, 4, 3], [5, 0, 0], [5, 3, 2]])
    cases = [
        (uneven_codes(7, vocab_sizes, duplicates=3), 5),
        (uneven_codes(8, vocab_sizes), 12),
        (few_sids, 12),
    ]
    for codes, beam_size in cases:
        trie = SIDTrie.from_codes(codes, vocab_sizes)
        prefixes = {tuple(row[:t]) for row in codes.tolist() for t in range(num_levels + 1)}

        def allowed(batch_id, sentence, prefixes=prefixes):
            sid = tuple(tok - offsets[t] for t, tok in enumerate(sentence.tolist()[1:]))
            level = len(sid)
            return [offsets[level] + c for c in range(vocab_sizes[level]) if (*sid, c) in prefixes]

        with torch.no_grad():
            reference = model.generate(
                input_ids=source,
                attention_mask=attention,
                num_beams=beam_size,
                num_return_sequences=beam_size,
                prefix_allowed_tokens_fn=allowed,
                length_penalty=0.0,
                do_sample=False,
                early_stopping=False,
                max_new_tokens=num_levels,
                use_cache=False,
                output_scores=True,
                return_dict_in_generate=True,
            )
        ref_sids = (reference.sequences[:, 1:] - torch.tensor(offsets)).reshape(batch_size, beam_size, -1)
        ref_scores = reference.sequences_scores.reshape(batch_size, beam_size)

        source_rows = source.repeat_interleave(beam_size, 0)
        attention_rows = attention.repeat_interleave(beam_size, 0)

        def step_fn(prefix, source_rows=source_rows, attention_rows=attention_rows):
            level = prefix.shape[1]
            start = torch.zeros(prefix.shape[0], 1, dtype=torch.long)
            decoder_input = torch.cat([start, prefix + torch.tensor(offsets[:level], dtype=torch.long)], 1)
            with torch.no_grad():
                logits = model(
                    input_ids=source_rows, attention_mask=attention_rows, decoder_input_ids=decoder_input
                )
            return logits.logits[:, -1, offsets[level] : offsets[level] + vocab_sizes[level]]

        ours = constrained_beam_search(step_fn, batch_size, beam_size, trie, vocab_sizes)
        # transformers fills missing beams with score -1e9 (copies of live ones); ours uses -inf and -1 rows
        ref_live = ref_scores > -1e8
        assert torch.equal(ref_live, torch.isfinite(ours.scores))
        assert bool((~ref_live).any()) == (trie.num_leaves < beam_size)
        assert torch.equal(ours.sequences[ref_live], ref_sids[ref_live])
        torch.testing.assert_close(ours.scores[ref_live], ref_scores[ref_live], rtol=0, atol=1e-5)


# --------------------------------------------------------------------- beams -> items
def test_beams_to_items_expands_shared_sids_and_deduplicates():
    # item:      0       1       2       3       4       5
    codes = torch.tensor([[1, 0], [0, 1], [1, 0], [2, 2], [0, 1], [1, 0]])
    row_items = torch.tensor([0, 1, 2, 3, 4, 5])
    # a second view of item 5 under SID (2, 2) and of item 1 under (0, 0)
    codes = torch.cat([codes, torch.tensor([[2, 2], [0, 0]])])
    row_items = torch.cat([row_items, torch.tensor([5, 1])])
    trie = SIDTrie.from_codes(codes, [3, 3], row_items=row_items)
    sequences = torch.tensor(
        [
            [[2, 2], [1, 0], [2, 1], [0, 0], [-1, -1]],  # (2,1) is not a SID; last beam is missing
            [[0, 0], [0, 1], [1, 0], [2, 2], [1, 0]],
        ]
    )
    scores = torch.tensor([[-1.0, -2.0, -3.0, -4.0, float("-inf")], [-0.5, -0.6, -0.7, -0.8, -0.9]])
    ranked = beams_to_scored_items(BeamSearchOutput(sequences, scores), trie)
    assert ranked.items.tolist() == [[3, 5, 0, 2, 1, -1], [1, 4, 0, 2, 5, 3]]
    expected_scores = torch.tensor(
        [
            [-1.0, -1.0, -2.0, -2.0, -4.0, float("-inf")],
            [-0.5, -0.6, -0.7, -0.7, -0.7, -0.8],
        ]
    )
    torch.testing.assert_close(ranked.scores, expected_scores)
    # fixed width: truncated or padded
    assert beams_to_items(BeamSearchOutput(sequences, scores), trie, max_items=3).tolist() == [
        [3, 5, 0],
        [1, 4, 0],
    ]
    padded = beams_to_items(BeamSearchOutput(sequences, scores), trie, max_items=9)
    assert padded.shape == (2, 9) and padded[:, 6:].eq(-1).all()
    # the retrievers cut the whole pool to their metric width instead of expanding the beams twice: the same
    for width in range(1, 10):
        assert torch.equal(fixed_width(ranked.items, width), beams_to_items(BeamSearchOutput(sequences, scores), trie,
                                                                           max_items=width))
    # a -inf beam recalls nothing even if its sequence is a valid SID
    dead = BeamSearchOutput(torch.tensor([[[1, 0]]]), torch.tensor([[float("-inf")]]))
    assert beams_to_items(dead, trie).tolist() == [[-1]]


def test_beams_to_items_matches_python_expansion_on_search_output():
    vocab_sizes = (4, 4, 3)
    codes = uneven_codes(21, vocab_sizes, duplicates=30)
    trie = SIDTrie.from_codes(codes, vocab_sizes)
    model = TinyStepModel(vocab_sizes, num_queries=3, seed=5)
    output = constrained_beam_search(model.step_fn(3, 6), 3, 6, trie, vocab_sizes)
    items = beams_to_items(output, trie)
    for query in range(3):
        expected: list[int] = []
        for sequence, score in zip(output.sequences[query].tolist(), output.scores[query].tolist()):
            if math.isinf(score):
                continue
            sharing = sorted(np.flatnonzero((codes == np.array(sequence)).all(1)).tolist())
            expected += [i for i in sharing if i not in expected]
        assert [i for i in items[query].tolist() if i >= 0] == expected


# ------------------------------------------------------------------------- details
def test_stable_topk_equals_stable_sort():
    generator = torch.Generator().manual_seed(0)
    values = torch.randn(6, 300, generator=generator).round(decimals=1)  # many exact ties
    values[1, ::2] = float("-inf")
    values[2] = float("-inf")
    values[3] = 0.0
    for k in (1, 7, 150, 300):
        got_values, got_index = stable_topk(values, k)
        expected = values.sort(dim=1, descending=True, stable=True)
        assert torch.equal(got_index, expected.indices[:, :k])
        assert torch.equal(got_values, expected.values[:, :k])


def test_ties_break_towards_lower_beam_then_lower_code():
    vocab_sizes = (4, 3)
    codes = torch.tensor([[a, b] for a in range(4) for b in range(3)])
    trie = SIDTrie.from_codes(codes, vocab_sizes)
    uniform = lambda prefix: torch.zeros(prefix.shape[0], vocab_sizes[prefix.shape[1]])  # noqa: E731
    output = constrained_beam_search(uniform, 2, 5, trie, vocab_sizes)
    assert output.sequences[0].tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1]]
    assert torch.equal(output.sequences[0], output.sequences[1])
    torch.testing.assert_close(output.scores, torch.full((2, 5), -math.log(12.0)))


def test_step_fn_sees_batch_major_rows_and_in_range_codes():
    vocab_sizes = (3, 4, 2)
    codes = torch.tensor([[0, 1, 0], [2, 3, 1]])
    trie = SIDTrie.from_codes(codes, vocab_sizes)
    seen = []

    def step_fn(prefix):
        seen.append(prefix.clone())
        return torch.zeros(prefix.shape[0], vocab_sizes[prefix.shape[1]])

    constrained_beam_search(step_fn, 2, 4, trie, vocab_sizes)
    assert [p.shape for p in seen] == [(8, 0), (8, 1), (8, 2)]
    for level, prefix in enumerate(seen):
        assert bool(((prefix >= 0) & (prefix < torch.tensor(vocab_sizes[:level]))).all())
    assert torch.equal(seen[2][:4], seen[2][4:])  # identical queries give identical beams


def test_bad_arguments_raise_clear_errors():
    trie = SIDTrie.from_codes(torch.tensor([[0, 1]]), [2, 2])
    step_fn = TinyStepModel((2, 2), 1, 0).step_fn(1, 2)
    with pytest.raises(ValueError, match="differ from the trie"):
        constrained_beam_search(step_fn, 1, 2, trie, [2, 3])
    with pytest.raises(ValueError, match=r"expected \(batch_size \* beam_size"):
        beam_search(lambda prefix: torch.zeros(1, 2), 1, 2, [2, 2])
    with pytest.raises(ValueError, match="beam_size"):
        beam_search(step_fn, 1, 0, [2, 2])


def test_benchmark_quick_run_writes_json(tmp_path):
    benchmark = load_benchmark("decode_throughput")
    out = tmp_path / "decode.json"
    benchmark.main(["--quick", "--out", str(out)])
    report = json.loads(out.read_text())
    assert report["runs"], "the benchmark reported no runs"
    for run in report["runs"]:
        assert run["trie_queries_per_s"] > 0 and run["callback_queries_per_s"] > 0
        assert 0.0 <= run["mask_share_trie_ops"] <= 1.0
        assert run["same_beams_as_callback"] is True
