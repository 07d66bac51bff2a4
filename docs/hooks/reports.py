"""mkdocs hook: publish ``reports/`` beside the manual, so that ``mkdocs build --strict`` checks the links between
them too.

The manual (``docs/``) and the measured reports (``reports/<study>/README.md``, beside the files they describe)
link to each other with the relative paths that work when the repository is browsed as files
(``docs/compression.md`` -> ``../reports/benchmark_structured/README.md``). mkdocs reads only ``docs/``, so this
hook adds every file under ``reports/`` as ``reports/...`` and rewrites such links to where the target sits in the
site. A link to a file that does not exist stays a link to a missing file, which ``--strict`` refuses.
"""
import posixpath
import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[2]  # the repository: docs/hooks/reports.py
REPORTS = ROOT / "reports"
# Per-text predictions carry the test split's labels: data, which is never published (also in .gitignore).
_UNPUBLISHED = {"predictions.json"}
# A relative Markdown link target: ](path) or ](path#anchor); absolute URLs and pure anchors are left alone.
_LINK = re.compile(r"\]\((?![a-z][a-z0-9+.-]*:|#|/)([^)\s#]+)")


def on_files(files, config):
    for path in sorted(REPORTS.rglob("*")):
        if path.is_file() and path.name not in _UNPUBLISHED:
            files.append(File.generated(config, path.relative_to(ROOT).as_posix(), abs_src_path=str(path)))
    return files


def _repo_path(src_uri: str) -> str:
    """Where a site file lives in the repository: reports/ as it is, everything else under docs/."""
    return src_uri if src_uri.startswith("reports/") else "docs/" + src_uri


def on_page_markdown(markdown, page, config, files):
    here = posixpath.dirname(_repo_path(page.file.src_uri))

    def to_site(match):
        target = posixpath.normpath(posixpath.join(here, match.group(1)))
        if target.startswith("docs/"):
            site_target = target[len("docs/"):]
        elif target.startswith("reports/"):
            site_target = target
        else:
            return match.group(0)  # outside docs/ and reports/: not published, so --strict reports it
        page_dir = posixpath.dirname(page.file.src_uri) or "."
        return "](" + posixpath.relpath(site_target, page_dir)

    return _LINK.sub(to_site, markdown)
