"""Check an sdist: every file the README and docs link to is inside, and no install-time file is.

    python scripts/check_sdist.py dist/fused_dit_ops-0.1.0.tar.gz
"""
from __future__ import annotations

import posixpath
import re
import sys
import tarfile

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
NEVER = ("fused_dit_ops/_build_status.json",)


def local_links(md_path: str, text: str) -> list[str]:
    """Relative link targets of a Markdown file, as paths from the project root."""
    base = posixpath.dirname(md_path)
    out = []
    for target in LINK.findall(text):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto: ...
            continue
        if not re.search(r"[A-Za-z0-9_]", target):  # `kernel[grid](...)` in code, not a link
            continue
        out.append(posixpath.normpath(posixpath.join(base, target)))
    return out


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    with tarfile.open(argv[0]) as tar:
        names = [m.name for m in tar.getmembers()]
        top = names[0].split("/")[0]
        rel = {n[len(top) + 1:] for n in names if n.startswith(top + "/")}
        docs = sorted(n for n in rel if n == "README.md" or (n.startswith("docs/") and n.endswith(".md")))
        missing = []
        for md in docs:
            text = tar.extractfile(f"{top}/{md}").read().decode()
            for target in local_links(md, text):
                if target not in rel and not any(n.startswith(target.rstrip("/") + "/") for n in rel):
                    missing.append(f"{md} -> {target}")
    problems = [f"missing: {m}" for m in missing]
    problems += [f"shipped but must not be: {n}" for n in NEVER if n in rel]
    if "README.md" not in rel:
        problems.append("missing: README.md")
    for p in problems:
        print(f"check_sdist: {p}", file=sys.stderr)
    if not problems:
        print(f"check_sdist: {argv[0]}: {len(rel)} files; every link of {len(docs)} Markdown "
              "files resolves inside the sdist")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
