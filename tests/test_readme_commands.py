"""Every command in the ```bash blocks of README.md and docs/**/*.md runs as written; every relative link resolves.

The pages run in one fresh folder, README.md first and then the docs pages in path order, each page's commands
in order (the docs build on the README's quick start: its fits are the checkpoints the docs' test and predict
lines read). Commands that take an experiment config get tiny-size overrides appended (:data:`TINY`, chosen by
the config's model/data class), so every page runs in about a minute; a few commands are skipped, each with its
reason (:data:`SKIPPED`), and a line that already ran earlier in the sequence (the docs repeat some of the
README's) runs once. ``grcm`` commands run in-process through :func:`grcm.cli.main` (same parsing as the console
script, without paying the start-up per command).
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import yaml

from grcm.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: Commands not run, by prefix, with the reason.
SKIPPED = {
    "make install": "creates the environment this test already runs in",
    "make demo": "runs the full demo (minutes); its stages are the configs the commands below run",
    "make test": "runs the test suite, which contains this test",
    "make lint": "runs ruff over the sources (CI's lint step), not a grcm command",
    "grcm demo": "runs the full demo (minutes); its stages are the configs the commands below run",
    "wandb sweep": "needs a W&B server; the trial command it runs is the W&B fit command above",
    "python benchmarks/": "benchmark scripts (their own --quick smoke flags; make bench runs them)",
    "torchrun": "starts two processes; multi-process runs are tested in tests/test_ddp*.py",
}
#: Why a command is not run a second time.
ALREADY_RAN = "the same line ran earlier in the sequence (a docs page repeating the README)"

#: Tiny-size overrides appended to a command that names an experiment config, by class.
TINY = {
    "grcm.data.datamodules.SyntheticDataModule": [
        "--data.init_args.num_items=48", "--data.init_args.feature_dim=16", "--data.init_args.eval_batch_size=64",
    ],
    "grcm.data.datamodules.CorpusDataModule": ["--data.init_args.batch_size=16"],
    "grcm.rerank.dual_tower.DualTower": [
        "--model.init_args.embed_dim=128", "--model.init_args.text_width=16", "--model.init_args.text_layers=1",
        "--model.init_args.text_ffn=32",
    ],
    "grcm.tokenizers.module.ACETokenizer": [
        "--model.init_args.coarse_codebook_size=4", "--model.init_args.codebook_size=4",
        "--model.init_args.latent_dim=8", "--model.init_args.hidden_dims=[16]", "--model.init_args.kmeans_iters=5",
    ],
    "grcm.retriever.module.GenerativeRetriever": [
        "--model.init_args.d_model=16", "--model.init_args.num_heads=2", "--model.init_args.num_encoder_layers=1",
        "--model.init_args.num_decoder_layers=1", "--model.init_args.ffn_dim=32",
    ],
    "grcm.retriever.grdr.GRDRRetriever": ["--model.init_args.d_model=16"],
    "trainer": [
        "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.log_every_n_steps=1",
    ],
}


def markdown_pages() -> list[Path]:
    """README.md, then every Markdown page under docs/ in path order."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def readme_commands(text: str) -> list[str]:
    """The command lines of a page's ```bash blocks, trailing ``# comments`` removed, lines continued with a
    backslash joined, in order."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" #", 1)[0].strip()
            if line and not line.startswith("#"):
                commands.append(line)
    return commands


def tiny_overrides(argv: list[str]) -> list[str]:
    """TINY's overrides for the classes of the configs ``argv`` names (nothing for commands without one)."""
    configs = [argv[i + 1] for i, arg in enumerate(argv[:-1]) if arg in ("-c", "--config")]
    classes: list[str] = []
    for config in configs:
        content = yaml.safe_load(Path(config).read_text()) or {}
        for key in ("data", "model"):
            class_path = (content.get(key) or {}).get("class_path")
            if class_path and class_path not in classes:
                classes.append(class_path)
    if not classes:
        return []
    return [arg for name in classes for arg in TINY.get(name, [])] + TINY["trainer"]


def write_msvd_fixture(folder: Path) -> None:
    """What docs/data.md's `grcm prepare msvd` line expects from the user: annotations and features."""
    videos = {"train": [f"vid{n}_0_10" for n in range(12)], "val": ["vid12_0_10", "vid13_0_10"],
              "test": ["vid14_0_10", "vid15_0_10", "vid16_0_10"]}
    annotations = folder / "annotations" / "msvd"
    annotations.mkdir(parents=True)
    captions = {v: [f"a clip number {v[3:-5]} {word}" for word in ("runs", "jumps", "sings")] for s in videos.values() for v in s}
    (annotations / "captions_msvd.json").write_text(json.dumps(captions))
    for split, ids in videos.items():
        (annotations / f"{split}_list.txt").write_text("".join(f"{v}\n" for v in ids))
    every = [v for ids in videos.values() for v in ids]
    np.save(folder / "feats.npy", np.random.default_rng(0).standard_normal((len(every), 16)).astype(np.float32))
    (folder / "feat_ids.txt").write_text("".join(f"YouTubeClips/{v}.avi\n" for v in every))


def run_command(command: str, page: str = "README.md") -> None:
    argv = shlex.split(command)
    if argv[:3] == ["python", "-m", "grcm"]:
        argv = ["grcm", *argv[3:]]
    assert argv[0] == "grcm", f"{page} command {command!r}: only grcm commands (or skipped ones) may appear"
    args = argv[1:]
    args += tiny_overrides(args)
    try:
        main(args)
    except SystemExit as exit_:
        assert exit_.code in (0, None), f"{page} command failed (exit {exit_.code}): {command}"


def test_readme_lists_commands_this_test_knows():
    commands = readme_commands((ROOT / "README.md").read_text())
    assert any(c.startswith("grcm fit") for c in commands) and any(c.startswith("grcm predict") for c in commands)
    assert "make demo" in commands and "make test" in commands


def test_every_readme_and_docs_command_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("GRCM_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "experiments").symlink_to(ROOT / "experiments")
    write_msvd_fixture(tmp_path)
    ran: list[str] = []
    skipped: dict[str, str] = {}
    pages_with_commands = set()
    for page in markdown_pages():
        name = str(page.relative_to(ROOT))
        for command in readme_commands(page.read_text()):
            pages_with_commands.add(name)
            reason = next((why for prefix, why in SKIPPED.items() if command.startswith(prefix)), None)
            if reason is None and command in ran:
                reason = ALREADY_RAN
            if reason:
                skipped[command] = reason
                continue
            run_command(command, name)
            ran.append(command)
    capsys.readouterr()
    # every page the docs map lists has commands (a page whose blocks were renamed to text would test nothing)
    assert {"README.md", "docs/quickstart.md", "docs/configs.md", "docs/data.md", "docs/methods.md",
            "docs/scale-out.md", "docs/studies/grdr.md"} <= pages_with_commands, pages_with_commands
    # what the commands promise was written
    runs = tmp_path / "runs" / "synthetic"
    assert (runs / "ace_retriever" / "checkpoints" / "best.ckpt").is_file()
    for run in ("ace_retriever", "dual_tower"):
        lines = (runs / run / "predictions" / "best.jsonl").read_text().splitlines()
        record = json.loads(lines[0])
        assert len(lines) == 48 and record["items"] and len(record["items"]) == len(record["scores"])
    assert (runs / "ace_tokenizer" / "bundle_last").is_dir() and (runs / "ace_tokenizer" / "sids.png").is_file()
    results = json.loads((runs / "ace_retriever" / "results.json").read_text())
    assert results["fit"]["best_checkpoint"] and 0 <= results["test"]["metrics"]["test/recall@1"] <= 1
    assert (tmp_path / "data" / "msvd" / "corpus" / "corpus.json").is_file()
    assert (tmp_path / "runs" / "msvd" / "dual_tower" / "checkpoints" / "last.ckpt").is_file()
    assert (tmp_path / "runs" / "grdr_study" / "v4" / "checkpoints" / "last.ckpt").is_file()
    assert len(ran) >= 20, ran
    # the docs repeat lines of the README's quick start; they ran once
    assert ALREADY_RAN in skipped.values()
    # every skip reason is used (a stale entry would hide nothing), and nothing else was skipped
    used = {prefix for prefix in SKIPPED if any(command.startswith(prefix) for command in skipped)}
    assert used == set(SKIPPED), set(SKIPPED) - used


def test_documented_query_vocab_default_is_the_codes():
    """The docs' statements of the data modules' default query vocabulary (the W&B offline folder the docs name
    is checked where a run writes one, tests/test_wandb_offline.py)."""
    import inspect

    from grcm.data.datamodules import RetrievalDataModule

    default = inspect.signature(RetrievalDataModule.__init__).parameters["query_vocab"].default
    data = " ".join((ROOT / "docs" / "data.md").read_text().split())
    assert f"`{default}` (the class default" in data
    accuracy = " ".join((ROOT / "docs" / "studies" / "accuracy.md").read_text().split())
    assert f"`data.query_vocab={default}` (the data modules' default" in accuracy


@pytest.mark.parametrize("command", ["make demo", "wandb sweep experiments/sweeps/dual_tower.yaml"])
def test_skipped_commands_have_a_reason(command):
    assert any(command.startswith(prefix) for prefix in SKIPPED)


# ---- links -------------------------------------------------------------------------------------------------

#: Inline links and images ``[text](target "title")`` and reference definitions ``[name]: target``.
LINK = re.compile(r"!?\[[^\]]*\]\(<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\)|^\s*\[[^\]]+\]:\s*<?(\S+?)>?\s*$", re.M)
#: A URL scheme (``https:``, ``mailto:``): not a relative link.
SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def without_code_blocks(text: str) -> str:
    """The page with fenced blocks removed (a ``#`` line inside one is not a heading); inline code kept."""
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.S | re.M)


def without_code(text: str) -> str:
    """The page with fenced blocks and inline code removed (links inside code are not links)."""
    return re.sub(r"`[^`\n]*`", "", without_code_blocks(text))


def relative_links(text: str) -> list[str]:
    targets = [inline or reference for inline, reference in LINK.findall(without_code(text))]
    return [target for target in targets if not SCHEME.match(target)]


def heading_anchors(text: str) -> set[str]:
    """GitHub's anchors of a page's headings: lower case, punctuation dropped, spaces to hyphens, repeats -1, -2."""
    anchors: set[str] = set()
    counts: dict[str, int] = {}
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", without_code_blocks(text), flags=re.M):
        heading = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link in a heading keeps its text
        slug = re.sub(r"[^\w\- ]", "", heading.lower()).replace(" ", "-")
        seen = counts.get(slug, 0)
        counts[slug] = seen + 1
        anchors.add(slug if seen == 0 else f"{slug}-{seen}")
    return anchors


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """The relative links of ``page`` whose file does not exist (or leaves ``root``), or whose anchor is not a
    heading of the page it names."""
    broken = []
    for target in relative_links(page.read_text()):
        path, _, anchor = target.partition("#")
        destination = (page.parent / path).resolve() if path else page
        if not destination.is_relative_to(root):
            broken.append(f"{target} (outside the repository)")
        elif not destination.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and destination.suffix == ".md" and anchor not in heading_anchors(destination.read_text()):
            broken.append(f"{target} (no heading with that anchor)")
    return broken


def test_every_relative_link_resolves():
    pages = markdown_pages()
    assert len(pages) > 5, pages  # the README and its docs
    broken = {str(page.relative_to(ROOT)): broken_links(page) for page in pages}
    assert not {page: links for page, links in broken.items() if links}


def test_link_check_finds_missing_files_and_anchors(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Run your own: `grcm fit`\n")
    page = tmp_path / "README.md"
    page.write_text(
        "[ok](docs/a.md) [ok anchor](docs/a.md#run-your-own-grcm-fit) [self](#top) [web](https://example.org)\n"
        "[missing](docs/b.md) [bad anchor](docs/a.md#nowhere) `[in code](docs/c.md)`\n\n# Top\n"
        "```\n[in a block](docs/d.md)\n# not a heading\n```\n[ref]: docs/e.md\n[up](../outside.md)\n"
    )
    assert broken_links(page, root=tmp_path) == [
        "docs/b.md (no such file)", "docs/a.md#nowhere (no heading with that anchor)",
        "docs/e.md (no such file)", "../outside.md (outside the repository)",
    ]
