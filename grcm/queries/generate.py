"""``grcm generate-queries``: caption media with a local model under several perspective prompts.

ACE trains its generative retriever on extra queries generated per item (§3.3): one
caption per *perspective* (objects, action, scene, ...) describes an item more completely
than a single caption. This module runs a ``transformers`` image-to-text model (BLIP-style
prompt-prefix captioners, or a multimodal chat model whose processor has a chat template)
over images or sampled video frames and writes::

    extra_queries.csv   header item_id,text,source   (source = "<model>|<prompt>")

de-duplicated per item (case, spacing and punctuation ignored), at most ``max_per_item``
per item. Work is done in chunks of items, each written atomically under
``<out>.parts/``; a rerun with the same arguments resumes at the first missing chunk.
Put the file beside ``captions.csv`` of a corpus and ``data.use_extra_queries`` trains on it.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from pathlib import Path

import torch

from grcm.errors import GrcmError
from grcm.extract import media
from grcm.extract.encoders import load_pretrained
from grcm.io import atomic_path, write_json_atomic

#: Perspective prompts (prefixes for BLIP-style captioners, instructions for chat models).
DEFAULT_PROMPTS = (
    "a picture of",
    "the main objects are",
    "the action taking place is",
    "the scene and background show",
)


def normalise(text: str) -> str:
    """Key used to de-duplicate queries: lower case, punctuation dropped, spaces collapsed."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


class Captioner:
    """Images -> one caption per (image, prompt) with a local ``transformers`` image-to-text model.

    Args:
        model: local directory or hub name (model + processor).
        max_new_tokens: caption length limit.
        num_beams: beam search width of ``generate``.
        device: torch device string.
    """

    def __init__(self, model: str, max_new_tokens: int = 30, num_beams: int = 3, device: str = "cpu"):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.processor = load_pretrained(model, AutoProcessor.from_pretrained, "processor")
        self.model = load_pretrained(model, AutoModelForImageTextToText.from_pretrained, "image-to-text model").eval().to(device)
        self.chat = getattr(self.processor, "chat_template", None) is not None
        self.max_new_tokens, self.num_beams, self.device = max_new_tokens, num_beams, device

    @torch.no_grad()
    def __call__(self, images: list, prompt: str) -> list[str]:
        if self.chat:
            message = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": f"Describe {prompt}"}]}]
            text = self.processor.apply_chat_template(message, add_generation_prompt=True)
            inputs = self.processor(images=images, text=[text] * len(images), return_tensors="pt")
        else:
            inputs = self.processor(images=images, text=[prompt] * len(images), return_tensors="pt")
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
        if self.chat and "input_ids" in inputs:  # chat models echo the prompt: keep the new tokens
            output = output[:, inputs["input_ids"].shape[1] :]
        return [" ".join(t.split()) for t in self.processor.batch_decode(output, skip_special_tokens=True)]


def _item_id(path: Path, root: Path, ids: str) -> str:
    relative = path.relative_to(root) if root.is_dir() else Path(path.name)
    return relative.with_suffix("").as_posix() if ids == "stem" else relative.as_posix()


def generate_queries(
    inputs: str | Path,
    out: str | Path,
    model: str,
    *,
    modality: str = "image",
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    max_per_item: int = 4,
    frames_per_video: int = 2,
    batch_size: int = 8,
    chunk_size: int = 256,
    ids: str = "stem",
    progress: bool = True,
    captioner=None,
    model_name: str | None = None,
) -> dict:
    """Write ``out`` (``item_id,text,source``) for every image/video under ``inputs``; returns the report.

    Video items are captioned on ``frames_per_video`` uniformly sampled frames, each with every prompt.
    Unreadable files are skipped and listed in ``<out>.report.json``.
    """
    from tqdm.auto import tqdm

    if modality not in ("image", "video"):
        raise GrcmError(f"--modality {modality!r}: generate-queries captions images and video frames.")
    if max_per_item < 1 or not prompts:
        raise GrcmError("--max-per-item must be >= 1 and at least one --prompt is needed.")
    root, out = Path(inputs), Path(out)
    files = media.list_media(root, modality) if root.exists() else []
    if not files:
        raise GrcmError(f"{root}: no {modality} files found (extensions {', '.join(media.EXTENSIONS[modality])}).")
    parts = out.with_name(out.name + ".parts")
    settings = {"model": str(model), "modality": modality, "prompts": list(prompts), "max_per_item": max_per_item,
                "frames_per_video": frames_per_video, "ids": ids, "files": [str(f) for f in files]}
    manifest = parts / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()) != settings:
        raise GrcmError(f"{parts}: holds a run with other files, model or prompts; delete it or choose another --out.")
    write_json_atomic(manifest, settings)
    captioner = captioner or Captioner(model)
    source_name = model_name or Path(str(model)).name
    bar = tqdm(total=len(files), desc="grcm generate-queries", unit="item", disable=not progress)
    for chunk_start in range(0, len(files), chunk_size):
        part = parts / f"{chunk_start // chunk_size:05d}.json"
        chunk = files[chunk_start : chunk_start + chunk_size]
        if not part.is_file():
            rows, failed = _caption_chunk(chunk, root, ids, modality, prompts, max_per_item, frames_per_video,
                                          batch_size, captioner, source_name)
            write_json_atomic(part, {"rows": rows, "failed": failed})
        bar.update(len(chunk))
    bar.close()
    rows, failed = [], []
    for part in sorted(parts.glob("[0-9]*.json")):
        payload = json.loads(part.read_text())
        rows += payload["rows"]
        failed += payload["failed"]
    with atomic_path(out) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("item_id", "text", "source"))
        writer.writerows(rows)
    report = {"items": len(files) - len(failed), "queries": len(rows), "failed": len(failed), "failed_files": failed,
              "model": str(model), "prompts": list(prompts), "max_per_item": max_per_item}
    write_json_atomic(out.with_name(out.name + ".report.json"), report)
    return report


def _caption_chunk(files, root, ids, modality, prompts, max_per_item, frames_per_video, batch_size, captioner,
                   source_name):
    """Caption one chunk of files -> (rows ``[item_id, text, source]``, failed files)."""
    images, owners, failed = [], [], []
    for path in files:
        try:
            loaded = [media.load_image(path)] if modality == "image" else media.load_video_frames(path,
                                                                                                  frames_per_video)
        except Exception as error:  # unreadable media: list it and go on
            failed.append({"file": str(path), "error": f"{type(error).__name__}: {error}"[:300]})
            continue
        images += loaded
        owners += [_item_id(path, root, ids)] * len(loaded)
    kept: dict[str, list[tuple[str, str]]] = {}
    seen: dict[str, set[str]] = {}
    for prompt in prompts:
        for start in range(0, len(images), batch_size):
            captions = captioner(images[start : start + batch_size], prompt)
            for owner, caption in zip(owners[start : start + batch_size], captions):
                key = normalise(caption)
                if not key or key == normalise(prompt) or key in seen.setdefault(owner, set()):
                    continue
                if len(kept.setdefault(owner, [])) < max_per_item:
                    seen[owner].add(key)
                    kept[owner].append((caption, f"{source_name}|{prompt}"))
    rows = [[owner, text, source] for owner in dict.fromkeys(owners) for text, source in kept.get(owner, [])]
    return rows, failed


def main(argv: list[str] | None = None) -> None:
    """``grcm generate-queries``: command-line front end of :func:`generate_queries`."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="grcm generate-queries",
        description="Caption images/videos with a local image-to-text model into extra_queries.csv (resumable).",
    )
    parser.add_argument("inputs", help="folder of images or videos (searched recursively) or one file")
    parser.add_argument("--model", required=True, help="image-to-text model directory (or hub name when online)")
    parser.add_argument("--out", required=True, help="CSV to write, e.g. data/msvd/corpus/extra_queries.csv")
    parser.add_argument("--modality", choices=["image", "video"], default="image")
    parser.add_argument("--prompt", action="append", dest="prompts", help="perspective prompt (repeatable)")
    parser.add_argument("--max-per-item", type=int, default=4)
    parser.add_argument("--frames-per-video", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk-size", type=int, default=256, help="items per resumable chunk")
    parser.add_argument("--ids", choices=["stem", "relpath"], default="stem",
                        help="item id = file path without extension (stem) or with it (relpath), relative to inputs")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    report = generate_queries(
        args.inputs, args.out, args.model, modality=args.modality, prompts=args.prompts or DEFAULT_PROMPTS,
        max_per_item=args.max_per_item, frames_per_video=args.frames_per_video, batch_size=args.batch_size,
        chunk_size=args.chunk_size, ids=args.ids, progress=not args.no_progress,
    )
    print(f"grcm generate-queries: {report['queries']} queries for {report['items']} item(s) -> {args.out}; "
          f"{report['failed']} unreadable file(s) skipped")
