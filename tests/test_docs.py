"""README.md and docs/: links resolve, named tools and configs exist, the README stays short, and no command in them
writes into docs/ (which holds the recorded evidence).

The checkers are plain functions; the ``test_checker_*`` tests run them on small broken inputs, so a checker that
stopped finding anything would fail here too.
"""
import re
import sys
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'

FENCE = re.compile(r'^\s*(```|~~~)')
LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+"[^"]*")?\s*\)')
HEADING = re.compile(r'^(#{1,6})\s+(.*?)\s*#*\s*$')
REPO_PATH = re.compile(r'(?<![\w./$-])((?:tools|configs)/[\w.\-/]*[\w-])')
TABLE_SEPARATOR = re.compile(r'^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$')
# a command that writes into docs/: an output option, a redirection, tee, or cp/mv/ln whose last argument is there
WRITES_DOCS = re.compile(r'(--out(?:put)?[= ]+|--work-dir[= ]+|--dest[= ]+|\s-o\s+|>>?\s*|\btee\s+(?:-a\s+)?)'
                         r'["\']?(?:\./)?docs/')
COPY_INTO_DOCS = re.compile(r'^\s*(?:cp|mv|ln|rsync|install)\b.*\s["\']?(?:\./)?docs/\S*["\']?\s*$')


def markdown_files():
    return [README] + sorted((ROOT / 'docs').rglob('*.md'))


def split_code(text):
    """(prose lines, code-block lines), each as (line number, text); prose has its inline code removed."""
    prose, code, in_code = [], [], False
    for number, line in enumerate(text.split('\n'), 1):
        if FENCE.match(line):
            in_code = not in_code
            continue
        if in_code:
            code.append((number, line))
        else:
            prose.append((number, re.sub(r'`[^`]*`', '', line)))
    return prose, code


def slug(heading):
    """GitHub's anchor for a heading: its text lowercased, punctuation other than - and _ removed, spaces to -."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # a link in a heading keeps its text
    text = re.sub(r'<[^>]+>', '', text).strip().lower()
    kept = ''.join(c for c in text if c in ' -_' or unicodedata.category(c)[0] in 'LNM')
    return kept.replace(' ', '-')


def anchors(path):
    """Every anchor of a Markdown file, with GitHub's -1, -2 ... for repeated headings."""
    seen, result = {}, set()
    for _, line in split_code_keep_inline(path.read_text(encoding='utf-8')):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = seen.get(base, 0)
            result.add(base if n == 0 else f'{base}-{n}')
            seen[base] = n + 1
    return result


def split_code_keep_inline(text):
    """Prose lines with their inline code kept (headings are slugged from it)."""
    lines, in_code = [], False
    for number, line in enumerate(text.split('\n'), 1):
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append((number, line))
    return lines


def broken_links(path):
    """'file:line: target (why)' for every relative link of ``path`` that does not resolve."""
    problems = []
    prose, _ = split_code(path.read_text(encoding='utf-8'))
    for number, line in prose:
        for target in LINK.findall(line):
            if re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto: ...
                continue
            file_part, _, anchor = target.partition('#')
            dest = (path.parent / file_part).resolve() if file_part else path
            where = f'{path.relative_to(ROOT)}:{number}: {target}'
            if not dest.exists():
                problems.append(f'{where} (no such file)')
            elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
                problems.append(f'{where} (no heading with anchor #{anchor} in {dest.relative_to(ROOT)})')
    return problems


def missing_repo_paths(path):
    """Every ``tools/...`` or ``configs/...`` path the file names (prose, inline code and code blocks) that does not
    exist in the repository."""
    problems = []
    for number, line in enumerate(path.read_text(encoding='utf-8').split('\n'), 1):
        for name in REPO_PATH.findall(line):
            if not (ROOT / name).exists():
                problems.append(f'{path.relative_to(ROOT)}:{number}: {name}')
    return problems


def commands_writing_docs(path):
    """Lines of code blocks that write into docs/."""
    _, code = split_code(path.read_text(encoding='utf-8'))
    return [f'{path.relative_to(ROOT)}:{n}: {line.strip()}' for n, line in code
            if WRITES_DOCS.search(line) or COPY_INTO_DOCS.match(line)]


def has_table(lines):
    return any(line.lstrip().startswith('|') and TABLE_SEPARATOR.match(nxt) for line, nxt in zip(lines, lines[1:]))


# ---------------------------------------------------------------------------------------------- the repository
def test_links_resolve():
    problems = [p for path in markdown_files() for p in broken_links(path)]
    assert not problems, 'broken links:\n' + '\n'.join(problems)


def test_readme_names_existing_tools_and_configs():
    names = REPO_PATH.findall(README.read_text(encoding='utf-8'))
    assert len(names) >= 5, f'the README should name its tools and configs; found {names}'
    problems = missing_repo_paths(README)
    assert not problems, 'the README names paths that do not exist:\n' + '\n'.join(problems)


def test_readme_is_short_and_starts_with_what_a_user_needs():
    lines = README.read_text(encoding='utf-8').split('\n')
    assert len(lines) <= 350, f'README.md has {len(lines)} lines; the bar is 350'
    head = lines[:100]
    text = '\n'.join(head)
    for needed in ('pip install', 'custom_imports', 'CBNBurnInHook'):
        assert needed in text, f'{needed!r} is not in the first 100 lines of README.md'
    assert has_table(head), 'the first 100 lines of README.md hold no table'


def test_no_command_writes_into_docs():
    problems = [p for path in markdown_files() for p in commands_writing_docs(path)]
    assert not problems, 'commands that write into docs/ (use work_dirs/):\n' + '\n'.join(problems)


def test_commands_use_python_not_the_venv():
    bad = [f'{path.relative_to(ROOT)}:{n}: {line.strip()}' for path in markdown_files()
           for n, line in split_code(path.read_text(encoding='utf-8'))[1] if '.venv/bin/' in line]
    assert not bad, 'user-facing commands should use `python`:\n' + '\n'.join(bad)


# ---------------------------------------------------------------------------------------------- the checkers
def test_checker_slug_follows_github():
    assert slug('Precise statistics after training (`tools/precise_bn.py`)') == \
        'precise-statistics-after-training-toolsprecise_bnpy'
    assert slug('Checkpoints on torch ≥ 2.6') == 'checkpoints-on-torch--26'
    assert slug('RetinaNet: CBN in a head shared across FPN levels (`--detector retinanet`)') == \
        'retinanet-cbn-in-a-head-shared-across-fpn-levels---detector-retinanet'


def test_checker_finds_broken_links(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', tmp_path)
    (tmp_path / 'other.md').write_text('# A heading\n\n## Twice\n\n## Twice\n')
    page = tmp_path / 'page.md'
    page.write_text('[ok](other.md) [ok](other.md#a-heading) [ok](other.md#twice-1) [ok](#own)\n\n# Own\n'
                    '[gone](missing.md) [bad anchor](other.md#nowhere) [bad own](#nothing)\n'
                    '```shell\n[not a link](in-code.md)\n```\n`[not a link](inline.md)`\n')
    problems = broken_links(page)
    assert len(problems) == 3, problems
    assert 'missing.md' in problems[0] and '#nowhere' in problems[1] and '#nothing' in problems[2]


def test_checker_finds_missing_repo_paths(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', tmp_path)
    (tmp_path / 'tools').mkdir()
    (tmp_path / 'tools' / 'train.py').write_text('')
    page = tmp_path / 'README.md'
    page.write_text('Run `python tools/train.py`, then tools/nothing.py; configs/toy/gone.py too.\n'
                    'From mmdet/.mim/tools/train.py (not ours).\n')
    assert missing_repo_paths(page) == ['README.md:1: tools/nothing.py', 'README.md:1: configs/toy/gone.py']


def test_checker_finds_commands_writing_docs(tmp_path, monkeypatch):
    monkeypatch.setattr(sys.modules[__name__], 'ROOT', tmp_path)
    page = tmp_path / 'page.md'
    page.write_text('Prose may say --out docs/x.\n```shell\n'
                    'python tools/a.py --out work_dirs/a.json\n'     # fine
                    'python tools/a.py --out docs/a.json\n'
                    'python tools/a.py --out=docs/a.json\n'
                    'python tools/a.py > docs/a.txt\n'
                    'python tools/a.py | tee docs/a.txt\n'
                    'cp work_dirs/a.json docs/benchmarks/\n'
                    'cat docs/benchmarks/a.json\n'                   # reading is fine
                    '```\n')
    assert len(commands_writing_docs(page)) == 5


def test_checker_finds_tables():
    assert has_table(['| a | b |', '| --- | --- |', '| 1 | 2 |'])
    assert not has_table(['a | b', 'text'])
