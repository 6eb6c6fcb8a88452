"""DreamBooth class images: the ones ``data.class_source`` lacks, generated with the base model.

Prior preservation trains on ``dreambooth.num_class_images`` images of the class
(``data.class_prompt``) next to the subject's. When the class folder holds fewer, the missing
ones are rendered by the render engine (:class:`rayimg.render.renderer.Renderer`) with the base
model and written into that folder, where later runs find them: a second run generates nothing.

Image ``i`` has seed ``dreambooth.class_seed + i`` and the name
``class-<settings digest>-<i>.png`` (the digest covers the model, prompt, size and sampling
settings), so a name says how its image was made, the same settings always give the same
images, and an interrupted generation is finished by the next run. Plain code: the Ray wiring
(which machines render which images) lives in :mod:`rayimg.run.train`.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from dataclasses import dataclass

from rayimg.storage import Storage, StorageError, join

__all__ = ["ClassImage", "missing_class_images", "render_class_images", "IMAGE_EXTS"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


@dataclass(frozen=True)
class ClassImage:
    """One class image to generate."""

    index: int
    seed: int
    uri: str


def _settings(job, model_id: str, model_hash: str) -> dict:
    db = job.dreambooth
    return {"model": model_id, "model_hash": model_hash, "prompt": job.data.class_prompt,
            "negative_prompt": db.class_negative_prompt, "size": job.train.resolution,
            "steps": db.class_inference_steps, "guidance_scale": db.class_guidance_scale, "scheduler": "euler"}


def existing_class_images(storage: Storage, class_source: str) -> list[str]:
    """Image files in the class folder (none when it does not exist yet)."""
    try:
        uris = storage.list(class_source)
    except StorageError as e:
        raise ValueError(f"data.class_source {class_source!r} cannot be read: {e}") from None
    return [u for u in uris if posixpath.splitext(u)[1].lower() in IMAGE_EXTS and not posixpath.basename(u).startswith(".")]


def missing_class_images(job, storage: Storage, model_id: str, model_hash: str) -> list[ClassImage]:
    """The class images to generate so ``data.class_source`` holds ``num_class_images``: the
    lowest indices whose files are not there yet. Empty without prior preservation."""
    if not (job.train.method == "dreambooth" and job.dreambooth.prior_preservation):
        return []
    existing = existing_class_images(storage, job.data.class_source)
    wanted = job.dreambooth.num_class_images - len(existing)
    if wanted <= 0:
        return []
    digest = hashlib.sha256(json.dumps(_settings(job, model_id, model_hash), sort_keys=True).encode()).hexdigest()[:12]
    names = {posixpath.basename(u) for u in existing}
    out, index = [], 0
    while len(out) < wanted:
        name = f"class-{digest}-{index:05d}.png"
        if name not in names:
            out.append(ClassImage(index=index, seed=job.dreambooth.class_seed + index, uri=join(job.data.class_source, name)))
        index += 1
    return out


def render_class_images(renderer, job, storage: Storage, images: list[ClassImage]) -> int:
    """Render ``images`` with ``renderer`` in batches of ``dreambooth.class_batch_size`` and write
    each to its URI (atomically; one already there is skipped, so a retried task redoes only
    what is missing). Returns how many were written."""
    from rayimg.render.request import GenerationRequest

    db, size = job.dreambooth, job.train.resolution
    todo = [im for im in images if not storage.exists(im.uri)]
    written = 0
    for start in range(0, len(todo), db.class_batch_size):
        batch = todo[start:start + db.class_batch_size]
        requests = [GenerationRequest(prompt=job.data.class_prompt, negative_prompt=db.class_negative_prompt,
                                      steps=db.class_inference_steps, guidance_scale=db.class_guidance_scale,
                                      width=size, height=size, seed=im.seed) for im in batch]
        for im, rendered in zip(batch, renderer.render(requests)):
            storage.write_bytes(im.uri, rendered.png)
            written += 1
    return written
