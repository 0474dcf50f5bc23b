"""Kernels and bytes of an optimised XLA GPU program, read from its text.

`list_kernels` walks the HLO module that XLA prints after optimising for
a GPU: every fusion, library call and copy is a kernel launch, loop bodies
count times their trip count; `count_kernels` adds them up. Used by
`benchmarks/gpu_kernels.py`; kept free of flags so that tests can import
it beside other benchmarks.
"""

import collections
import re

# Ops in a program's (not a fusion's) computations that launch nothing.
_NO_KERNEL = frozenset((
    'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast',
    'while', 'conditional', 'call', 'after-all', 'opt-barrier',
    'add-dependency', 'partition-id', 'replica-id'))
_COMPUTATION = re.compile(r'^(ENTRY\s+)?%(\S+)\s.*\{\s*$')
_INSTRUCTION = re.compile(
    r'^\s*(ROOT\s+)?%(\S+)\s*=\s*(\(.*?\)|\S+)\s+([a-z][a-z0-9-]*)\((.*)$')
_ARRAY = re.compile(r'\b([a-z]+\d*)\[([\d,]*)\]')
_NAME = re.compile(r'%([\w.\-]+)')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
# Wrappers in a JAX op name that say where, not what.
_PLACE = re.compile(r'(jit\([^/]*\)|while|body|cond|closed_call|checkpoint|'
                    r'rematted_computation|dynamic_(update_)?index_in_dim)/')
_BYTES = {'f32': 4, 's32': 4, 'u32': 4, 'f16': 2, 'bf16': 2, 's8': 1,
          'u8': 1, 'pred': 1}


def _bytes(shape: str) -> int:
  """Bytes of the arrays an HLO result shape (maybe a tuple) names."""
  total = 0
  for dtype, dims in _ARRAY.findall(shape):
    size = _BYTES.get(dtype, 4)
    for d in dims.split(','):
      size *= int(d) if d else 1
    total += size
  return total


def _operands(rest: str) -> str:
  """The operand list of an instruction: its text up to the closing
  parenthesis of the call."""
  depth = 1
  for i, c in enumerate(rest):
    depth += (c in '([{') - (c in ')]}')
    if not depth:
      return rest[:i]
  return rest


def _computations(hlo: str) -> tuple[dict, str]:
  """`{name: [instruction]}` of an HLO module's text (each a dict of
  `name`, `op`, `shape`, `rest` of the line, `root`), and the entry
  computation's name."""
  computations, current, entry = {}, None, None
  for line in hlo.split('\n'):
    m = _COMPUTATION.match(line)
    if m:
      current = m.group(2)
      computations[current] = []
      entry = current if m.group(1) else entry
    elif line.startswith('}'):
      current = None
    elif current is not None:
      mi = _INSTRUCTION.match(line)
      if mi:
        source = _OP_NAME.search(mi.group(5))
        computations[current].append(dict(
            root=bool(mi.group(1)), name=mi.group(2), shape=mi.group(3),
            op=mi.group(4), rest=mi.group(5),
            source=source.group(1) if source else ''))
  return computations, entry


def _fusion_traffic(instructions: list[dict]) -> tuple[int, int]:
  """Bytes a fusion reads and writes, from its fused computation.

  A parameter that the fusion only slices counts as the slices; the buffer
  a dynamic-update-slice writes into in place counts as nothing read and
  the update written (a scan's stacked residuals and gradients).
  """
  by_name = {i['name']: i for i in instructions}
  users = collections.defaultdict(list)
  for i in instructions:
    for operand in _NAME.findall(_operands(i['rest'])):
      users[operand].append(i)
  def only(uses, ops, name):  # Every use takes `name` as what it slices.
    return uses and all(u['op'] in ops and
                        _NAME.findall(_operands(u['rest']))[0] == name
                        for u in uses)

  read = 0
  for i in instructions:
    if i['op'] != 'parameter':
      continue
    uses = users[i['name']]
    if only(uses, ('slice', 'dynamic-slice'), i['name']):
      read += sum(_bytes(u['shape']) for u in uses)
    elif not only(uses, ('dynamic-update-slice',), i['name']):
      read += _bytes(i['shape'])
  root = next(i for i in instructions if i['root'])
  outputs = ([by_name[n] for n in _NAME.findall(_operands(root['rest']))]
             if root['op'] == 'tuple' else [root])
  written = 0
  for out in outputs:
    if out['op'] == 'dynamic-update-slice':
      update = _NAME.findall(_operands(out['rest']))[1]
      written += _bytes(by_name[update]['shape']) if update in by_name else 0
    else:
      written += _bytes(out['shape'])
  return read, written


def _source(op_name: str) -> str:
  """What a kernel computes for JAX: the last op of its JAX name, marked
  as forward or backward (`jvp` / `transpose` in the name)."""
  if not op_name:
    return '(unnamed)'
  direction = ('backward ' if 'transpose(' in op_name else
               'forward ' if 'jvp(' in op_name else '')
  return direction + _PLACE.sub('', op_name).rsplit('/', 1)[-1]


def _callee(rest: str, key: str) -> str:
  return re.search(key + r'=%([\w.\-]+)', rest).group(1)


def list_kernels(hlo: str) -> list[dict]:
  """Every kernel an optimised GPU program launches, in program order.

  Walks the entry computation and what it runs: loop bodies and
  conditions (`times` their known trip count), the first branch of a
  conditional, calls. Each kernel is a dict: `computation` (where it
  is), `loops` (the enclosing loops, outermost first, each as its name,
  trip count and body computation), `times`
  (launches per call), `name`, `kind` (`fusion:` and the fusion kind, a
  library call's target, or the op), `shape` (its result), `read` and
  `written` (bytes per launch: `_fusion_traffic`; a library call, its
  operands and results) and `source` (what it computes for JAX:
  `_source`).
  """
  computations, entry = _computations(hlo)
  kernels = []

  def visit(name, times, loops):
    shapes = {i['name']: i['shape'] for i in computations[name]}
    for i in computations[name]:
      op, rest = i['op'], i['rest']
      if op == 'while':
        trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
        trips = int(trips.group(1)) if trips else 1
        body = _callee(rest, 'body')
        inner = loops + ((i['name'], trips, body),)
        visit(body, times * trips, inner)
        visit(_callee(rest, 'condition'), times * trips, inner)
      elif op == 'conditional':
        branches = re.search(r'branch_computations=\{%([\w.\-]+)', rest)
        visit(branches.group(1), times, loops)
      elif op == 'call':
        visit(_callee(rest, 'to_apply'), times, loops)
      elif op not in _NO_KERNEL:
        if op == 'fusion':
          read, written = _fusion_traffic(computations[_callee(rest,
                                                               'calls')])
          kind = re.search(r'kind=(\w+)', rest)
          kind = 'fusion:' + (kind.group(1) if kind else '?')
        else:
          read = sum(_bytes(shapes.get(n, ''))
                     for n in _NAME.findall(_operands(rest)))
          written = _bytes(i['shape'])
          target = re.search(r'custom_call_target="([^"]+)"', rest)
          kind = (target.group(1) if target else 'custom-call'
                  ) if op == 'custom-call' else op
        kernels.append({
            'computation': name, 'loops': loops, 'times': times,
            'name': i['name'], 'kind': kind, 'shape': i['shape'],
            'read': read, 'written': written,
            'source': _source(i['source'])})

  visit(entry, 1, ())
  return kernels


def loop_body(kernel: dict) -> tuple | None:
  """The loops of the loop body that launches `kernel` itself (not in a
  loop nested in it, nor in the loop's condition), or None."""
  loops = kernel['loops']
  return loops if loops and kernel['computation'] == loops[-1][2] else None


def count_kernels(hlo: str) -> dict:
  """Kernels launched per call of an optimised GPU program, by kind, and
  the bytes they move (`list_kernels`, added up).

  Fusions count by kind, library calls by target. `read_mb` and
  `written_mb` add up what each kernel reads and writes: where a large
  batch is bound by memory traffic, the time follows them. Each kernel
  counts on its own, as if nothing stayed in the L2 cache.
  `loop_bodies` gives the kernels of each loop body (each loop once),
  `sources` launches and bytes by what the kernels compute for JAX, the
  20 that move the most.
  """
  kinds = collections.Counter()
  sources = collections.defaultdict(lambda: [0, 0])
  bodies = collections.Counter()
  traffic = [0, 0]
  for k in list_kernels(hlo):
    times = k['times']
    kinds[k['kind']] += times
    traffic[0] += k['read'] * times
    traffic[1] += k['written'] * times
    row = sources[k['source']]
    row[0] += times
    row[1] += (k['read'] + k['written']) * times
    if loops := loop_body(k):
      bodies[loops] += 1
  top = sorted(sources.items(), key=lambda kv: -kv[1][1])[:20]
  return {'kernels': sum(kinds.values()), 'loop_bodies': list(bodies.values()),
          'read_mb': traffic[0] / 1e6, 'written_mb': traffic[1] / 1e6,
          'kinds': dict(kinds.most_common()),
          'sources': [{'source': k, 'launches': n, 'mb': b / 1e6}
                      for k, (n, b) in top]}
