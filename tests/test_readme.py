"""Every ```python block of README.md runs as written.

Each block is extracted from the README and run in a fresh interpreter
(`sys.executable -c`), from an empty temporary directory, with a timeout;
the test fails with the block's stderr unless it exits with code 0. So a
README example that drifts from the package (a renamed argument, a missing
import, a dataset TFF cannot take) fails here, not in a new user's hands.

A block may be preceded by an HTML comment that the rendered README hides:

- `<!-- readme-test: slow -->`: long-running; run only with `--runslow`.
- `<!-- readme-test: continues -->`: a fragment that continues the block
  before it; that block's code (and what it continued) is prepended.
- `<!-- readme-test: skip -->`: not run (say why in the comment).

Several may be combined: `<!-- readme-test: slow, continues -->`. Blocks
are preferably self-contained and small (digits data, a few rounds), so they
run in the default suite.

Shell blocks (```bash, ```sh) are not run: the README's are `make`
targets, which CI runs itself (`make test`) or which take minutes
(`make demo`), and the command line is tested in test_cli.py and
test_package.py.

No TFF worker outlives a block: each block runs in its own process group,
`communicate` returning means nothing held the pipes open past exit, and the
group must then be empty; anything left in it is killed (by the group id this
test created) and the test fails.
"""

import os
import pathlib
import re
import signal
import subprocess
import sys
import time
from typing import List, NamedTuple, Optional, Tuple

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / 'README.md'
TIMEOUT_S = 300

_FENCE = re.compile(r'^```(\w*)\s*$')
_MARKER = re.compile(r'^<!--\s*readme-test:\s*(.*?)\s*-->\s*$')
_HEADING = re.compile(r'^#+\s+(.*)$')
MARKERS = frozenset({'slow', 'continues', 'skip'})


class Block(NamedTuple):
  line: int  # 1-based line of the opening fence
  language: str
  code: str
  markers: Tuple[str, ...]
  heading: str


def readme_blocks(text: str) -> List[Block]:
  """The fenced code blocks of `text`, with their markers and headings."""
  blocks, lines = [], text.splitlines()
  heading, previous, i = '', '', 0
  while i < len(lines):
    line = lines[i]
    fence = _FENCE.match(line)
    if fence:
      start, body = i, []
      i += 1
      while i < len(lines) and not lines[i].startswith('```'):
        body.append(lines[i])
        i += 1
      if i == len(lines):
        raise ValueError(f'README.md:{start + 1}: unclosed code fence')
      marker = _MARKER.match(previous)
      markers = tuple(m.strip() for m in marker.group(1).split(',')
                      ) if marker else ()
      unknown = set(markers) - MARKERS
      if unknown:
        raise ValueError(f'README.md:{start + 1}: unknown readme-test '
                         f'marker(s) {sorted(unknown)}; known: '
                         f'{sorted(MARKERS)}')
      blocks.append(Block(start + 1, fence.group(1), '\n'.join(body) + '\n',
                          markers, heading))
      previous = ''
    elif line.strip():
      match = _HEADING.match(line)
      if match:
        heading = match.group(1)
      previous = line.strip()
    i += 1
  return blocks


def python_blocks(text: Optional[str] = None) -> List[Block]:
  """The python blocks of `text` (default README.md), each with the code of
  the blocks it continues."""
  if text is None:
    text = README.read_text(encoding='utf-8')
  result = []
  for block in readme_blocks(text):
    if block.language != 'python':
      continue
    if 'continues' in block.markers:
      if not result:
        raise ValueError(f'README.md:{block.line}: marked continues, but no '
                         'python block comes before it')
      block = block._replace(code=result[-1].code + block.code)
    result.append(block)
  return result


def _slug(text: str) -> str:
  return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')[:30]


def _params():
  params = []
  for block in python_blocks():
    marks = []
    if 'slow' in block.markers:
      marks.append(pytest.mark.slow)
    if 'skip' in block.markers:
      marks.append(pytest.mark.skip(reason='marked readme-test: skip'))
    params.append(pytest.param(
        block, marks=marks, id=f'L{block.line}-{_slug(block.heading)}'))
  return params


def _group_alive(pgid: int, grace: float = 2.0) -> bool:
  """Whether a process of group `pgid` is still there after `grace` seconds
  (time for an exiting orphan to be reaped)."""
  deadline = time.monotonic() + grace
  while True:
    try:
      os.killpg(pgid, 0)
    except ProcessLookupError:
      return False
    if time.monotonic() > deadline:
      return True
    time.sleep(0.1)


def _kill_group(pgid: int) -> None:
  try:
    os.killpg(pgid, signal.SIGKILL)
  except ProcessLookupError:
    pass


def run_block(code: str, cwd: pathlib.Path, timeout: float = TIMEOUT_S):
  """`(returncode, stdout, stderr)` of `code` in a fresh interpreter.

  Fails the test if it outlives `timeout`, holds the pipes past exit, or
  leaves a process (a TFF worker) behind in its process group.
  """
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2', MPLBACKEND='Agg')
  proc = subprocess.Popen([sys.executable, '-c', code], cwd=cwd, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, start_new_session=True)
  pgid = proc.pid  # a new session: the group id is the child's pid
  try:
    out, err = proc.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    exited = proc.poll() is not None
    _kill_group(pgid)
    out, err = proc.communicate()
    pytest.fail(('a child process held the pipes open after the block '
                 'exited (orphaned TFF worker?)' if exited else
                 f'the block ran longer than {timeout} s') +
                f'\n--- stderr ---\n{err[-5000:]}')
  if _group_alive(pgid):
    _kill_group(pgid)
    pytest.fail('the block left a process behind (a TFF worker?); killed it')
  return proc.returncode, out, err


def test_readme_has_python_blocks():
  blocks = python_blocks()
  assert len(blocks) >= 5, [b.line for b in blocks]
  assert all(b.code.strip() for b in blocks)


def test_markers_and_continued_blocks():
  text = '\n'.join([
      '# Title', '```bash', 'make demo', '```', '## Part',
      '```python', 'a = 1', '```', 'Some prose.', '',
      '<!-- readme-test: slow, continues -->', '', '```python', 'b = a', '```'])
  first, second = python_blocks(text)
  assert (first.line, first.markers, first.heading) == (6, (), 'Part')
  assert second.markers == ('slow', 'continues')
  assert second.code == 'a = 1\nb = a\n'
  with pytest.raises(ValueError, match='unknown readme-test marker'):
    python_blocks('<!-- readme-test: fast -->\n```python\npass\n```\n')


def test_a_block_that_leaves_a_process_behind_fails(tmp_path):
  code = ('import subprocess\n'
          "subprocess.Popen(['sleep', '60'], stdout=subprocess.DEVNULL,\n"
          '                 stderr=subprocess.DEVNULL)\n')
  with pytest.raises(pytest.fail.Exception, match='left a process behind'):
    run_block(code, tmp_path)


def test_a_block_whose_child_holds_the_pipes_fails(tmp_path):
  code = "import subprocess\nsubprocess.Popen(['sleep', '60'])\n"
  with pytest.raises(pytest.fail.Exception, match='held the pipes open'):
    run_block(code, tmp_path, timeout=5)


@pytest.mark.parametrize('block', _params())
def test_readme_block_runs(block, tmp_path):
  returncode, out, err = run_block(block.code, tmp_path)
  assert returncode == 0, (
      f'README.md:{block.line} ({block.heading}) exited with {returncode}:\n'
      f'--- code ---\n{block.code}--- stdout ---\n{out[-2000:]}\n'
      f'--- stderr ---\n{err[-6000:]}')
