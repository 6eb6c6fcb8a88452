"""Generate the project's small CLIP tokenizer (rayimg/models/tokenizer/).

The vocabulary is the real CLIP BPE vocabulary cut after the first ``--merges`` merges, built
exactly as CLIP builds it: the 256 byte characters, the same with ``</w>``, then each merge
joined, then ``<|startoftext|>`` and ``<|endoftext|>``. So every token of the cut vocabulary
has the id it has in real CLIP (only the two special tokens move, to the end), and prompts made
of common words tokenize exactly as real SD checkpoints tokenize them.

The BPE merges come from ``open_clip/bpe_simple_vocab_16e6.txt.gz`` inside the open-clip-torch
wheel (fetched with ``pip download``, pinned for reproducibility), or from ``--bpe PATH``.
The output is deterministic: running the script twice writes identical bytes.

    python scripts/make_tokenizer.py                    # writes rayimg/models/tokenizer/
    python scripts/make_tokenizer.py --bpe bpe.txt.gz --out /tmp/tok --merges 8000
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

OPEN_CLIP_REQUIREMENT = "open-clip-torch==3.3.0"
BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
DEFAULT_MERGES = 10000
CLIP_NUM_MERGES = 49152 - 256 - 2  # what CLIP reads from the file: 48894 merges
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "rayimg" / "models" / "tokenizer"

BOS = "<|startoftext|>"
EOS = "<|endoftext|>"


def bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) map from the 256 byte values to printable unicode characters."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def build_vocab(bpe_text: str, num_merges: int) -> tuple[dict[str, int], list[str]]:
    """The CLIP vocabulary and merge list from the BPE file's text, cut after ``num_merges``.

    The first line of the file is a header; the next lines are merges ``"a b"`` in rank order.
    """
    lines = bpe_text.split("\n")[1 : CLIP_NUM_MERGES + 1]
    merges = [line for line in lines if line][:num_merges]
    if len(merges) < num_merges:
        raise ValueError(f"the BPE file has {len(merges)} merges, fewer than the {num_merges} asked for")
    byte_chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in byte_chars + [c + "</w>" for c in byte_chars]:
        vocab[token] = len(vocab)
    for rank, merge in enumerate(merges, start=1):
        parts = merge.split(" ")
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"merge {rank} is not two symbols separated by one space: {merge!r}")
        missing = [p for p in parts if p not in vocab]
        if missing:
            raise ValueError(f"merge {rank} ({merge!r}) uses {missing[0]!r}, which no earlier merge made")
        token = "".join(parts)
        if token in vocab:
            raise ValueError(f"merge {rank} ({merge!r}) makes {token!r}, which is already in the vocabulary")
        vocab[token] = len(vocab)
    vocab[BOS] = len(vocab)
    vocab[EOS] = len(vocab)
    return vocab, merges


def tokenizer_config(pad_token: str = EOS) -> dict:
    """tokenizer_config.json as the SD releases ship it (model_max_length 77)."""
    return {
        "add_prefix_space": False,
        "bos_token": BOS,
        "clean_up_tokenization_spaces": True,
        "do_lower_case": True,
        "eos_token": EOS,
        "errors": "replace",
        "model_max_length": 77,
        "pad_token": pad_token,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS,
    }


def write_tokenizer(out_dir: str | Path, vocab: dict[str, int], merges: list[str], source: dict) -> list[Path]:
    """Write vocab.json, merges.txt, tokenizer_config.json, special_tokens_map.json, source.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "vocab.json": json.dumps(vocab, ensure_ascii=False, separators=(",", ":")) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(m + "\n" for m in merges),
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2, sort_keys=True) + "\n",
        "special_tokens_map.json": json.dumps(
            {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}, indent=2, sort_keys=True
        ) + "\n",
        "source.json": json.dumps(source, indent=2, sort_keys=True) + "\n",
    }
    written = []
    for name, text in files.items():
        path = out / name
        path.write_text(text, encoding="utf-8", newline="\n")
        written.append(path)
    return written


def read_bpe(path: str | Path) -> bytes:
    """The (gzipped or plain) BPE file, or the member of a wheel that holds it."""
    path = Path(path)
    if path.suffix == ".whl":
        with zipfile.ZipFile(path) as wheel:
            return wheel.read(BPE_MEMBER)
    return path.read_bytes()


def fetch_bpe_from_wheel(requirement: str = OPEN_CLIP_REQUIREMENT) -> bytes:
    """Download the open-clip-torch wheel (no dependencies) and return its BPE file."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet", "-d", tmp, requirement]
        subprocess.run(cmd, check=True)
        wheels = sorted(Path(tmp).glob("open_clip_torch-*.whl"))
        if not wheels:
            raise FileNotFoundError(f"pip download {requirement} produced no wheel in {tmp}")
        return read_bpe(wheels[0])


def make_tokenizer(out_dir: str | Path, bpe: str | Path | None = None, num_merges: int = DEFAULT_MERGES) -> list[Path]:
    """Build the tokenizer files into ``out_dir`` from ``bpe`` (default: the open-clip-torch wheel)."""
    raw = read_bpe(bpe) if bpe is not None else fetch_bpe_from_wheel()
    text = (gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw).decode("utf-8")
    vocab, merges = build_vocab(text, num_merges)
    source = {
        "bpe_file": BPE_MEMBER if bpe is None else Path(bpe).name,
        "bpe_text_sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
        "from": OPEN_CLIP_REQUIREMENT if bpe is None else "--bpe",
        "num_merges": num_merges,
        "vocab_size": len(vocab),
    }
    return write_tokenizer(out_dir, vocab, merges, source)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output dir (default {DEFAULT_OUT})")
    parser.add_argument("--bpe", type=Path, default=None, help="bpe_simple_vocab_16e6.txt(.gz) or an open-clip-torch wheel; default: pip download " + OPEN_CLIP_REQUIREMENT)
    parser.add_argument("--merges", type=int, default=DEFAULT_MERGES, help=f"keep the first N merges (default {DEFAULT_MERGES}; real CLIP has {CLIP_NUM_MERGES})")
    args = parser.parse_args(argv)
    if not 1 <= args.merges <= CLIP_NUM_MERGES:
        parser.error(f"--merges must be in 1..{CLIP_NUM_MERGES}")
    for path in make_tokenizer(args.out, args.bpe, args.merges):
        print(f"{path} ({path.stat().st_size} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
