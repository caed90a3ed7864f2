"""Every relative link in the README and docs/ points at a file that exists and, with a #fragment, at a
heading that file has (GitHub's anchors: lower case, punctuation dropped, spaces as hyphens, -1, -2 …
for repeats). The README's figures lead to their runs through these links."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "research" / "README.md"]


def anchors(text: str) -> set[str]:
    out, seen, fenced = set(), {}, False
    for line in text.split("\n"):
        if line.startswith("```"):
            fenced = not fenced
        m = None if fenced else re.match(r"#{1,6}\s+(.*)$", line)
        if m:
            title = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", m.group(1).strip()).replace("`", "")
            slug = re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def test_anchors_follow_githubs_rules():
    text = "# 3. Evaluate: metrics\n## The scheduler's `targets`\n```\n# not a heading\n```\n## Repeat\n## Repeat\n"
    assert anchors(text) == {"3-evaluate-metrics", "the-schedulers-targets", "repeat", "repeat-1"}


def test_every_relative_link_resolves():
    bad, cache = [], {}
    for doc in (d for d in DOCS if d.exists()):
        for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text(encoding="utf-8")):
            if re.match(r"[a-z]+:", link):  # http(s):, mailto:
                continue
            path, _, frag = link.partition("#")
            target = (doc.parent / path).resolve() if path else doc
            if not target.exists():
                bad.append(f"{doc.relative_to(ROOT)}: {link} (no such file)")
            elif frag and target.suffix == ".md":
                if target not in cache:
                    cache[target] = anchors(target.read_text(encoding="utf-8"))
                if frag not in cache[target]:
                    bad.append(f"{doc.relative_to(ROOT)}: {link} (no such heading)")
    assert not bad, "\n".join(bad)
