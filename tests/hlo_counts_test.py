"""The kernel and byte counts of `benchmarks/hlo_counts.py` on HLO text."""

from absl.testing import absltest

from benchmarks import hlo_counts

# A scan's two kinds of stacked-buffer kernel and a copy, as XLA prints an
# optimised module: a fusion slicing one unit out of a stack, a fusion
# writing a product into a stack in place, and a copy of the stack.
_HLO = """HloModule m

%fused_slice (a: f32[17,8,4], i: s32[]) -> f32[1,8,4] {
  %a = f32[17,8,4]{2,1,0} parameter(0)
  %i = s32[] parameter(1)
  %c = s32[] constant(0)
  ROOT %ds = f32[1,8,4]{2,1,0} dynamic-slice(%a, %i, %c, %c)
}

%fused_dus (a: f32[17,8,4], b: f32[8,4], i: s32[]) -> f32[17,8,4] {
  %a = f32[17,8,4]{2,1,0} parameter(0)
  %b = f32[8,4]{1,0} parameter(1)
  %i = s32[] parameter(2)
  %m = f32[8,4]{1,0} multiply(%b, %b)
  %u = f32[1,8,4]{2,1,0} bitcast(%m)
  %c = s32[] constant(0)
  ROOT %dus = f32[17,8,4]{2,1,0} dynamic-update-slice(%a, %u, %i, %c, %c)
}

ENTRY %main (p0: f32[17,8,4], p1: f32[8,4], p2: s32[]) -> f32[17,8,4] {
  %p0 = f32[17,8,4]{2,1,0} parameter(0)
  %p1 = f32[8,4]{1,0} parameter(1)
  %p2 = s32[] parameter(2)
  %f1 = f32[1,8,4]{2,1,0} fusion(%p0, %p2), kind=kLoop, calls=%fused_slice
""" + (  # One instruction, one line.
    '  %f2 = f32[17,8,4]{2,1,0} fusion(%p0, %p1, %p2), kind=kLoop, '
    'calls=%fused_dus, '
    'metadata={op_name="jit(f)/jvp()/while/body/closed_call/mul"}\n') + """\
  ROOT %copy = f32[17,8,4]{2,1,0} copy(%f2)
}
"""


# A loop of 5 trips whose body launches a fusion and whose condition
# launches a compare, inside a call; a copy in the entry.
_LOOP_HLO = """HloModule m

%fused_add (a: f32[8]) -> f32[8] {
  %a = f32[8]{0} parameter(0)
  ROOT %s = f32[8]{0} add(%a, %a)
}

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %y = f32[8]{0} fusion(%x), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %y)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  %p = (s32[], f32[8]{0}) parameter(0)
  %i = s32[] get-tuple-element(%p), index=0
  %n = s32[] constant(5)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%wrapped (w: (s32[], f32[8])) -> (s32[], f32[8]) {
  %w = (s32[], f32[8]{0}) parameter(0)
""" + (  # One instruction, one line.
    '  ROOT %loop = (s32[], f32[8]{0}) while(%w), condition=%cond, '
    'body=%body, backend_config={"known_trip_count":{"n":"5"}}\n') + """\
}

ENTRY %main (p0: (s32[], f32[8])) -> f32[8] {
  %p0 = (s32[], f32[8]{0}) parameter(0)
  %r = (s32[], f32[8]{0}) call(%p0), to_apply=%wrapped
  %v = f32[8]{0} get-tuple-element(%r), index=1
  ROOT %copy = f32[8]{0} copy(%v)
}
"""


class CountKernelsTest(absltest.TestCase):

  def test_slices_and_in_place_updates_count_what_they_touch(self):
    counts = hlo_counts.count_kernels(_HLO)
    self.assertEqual(counts['kernels'], 3)
    self.assertEqual(counts['kinds'], {'fusion:kLoop': 2, 'copy': 1})
    unit, stack, index = 8 * 4 * 4, 17 * 8 * 4 * 4, 4
    # The slice reads one unit and its index; the update reads the product's
    # operand and its index, writes one unit; the copy reads and writes all.
    self.assertEqual(counts['read_mb'] * 1e6,
                     (unit + index) + (unit + index) + stack)
    self.assertEqual(counts['written_mb'] * 1e6, unit + unit + stack)
    # By what they compute for JAX, the most bytes first.
    self.assertEqual(
        [(s['source'], s['launches'], s['mb'] * 1e6)
         for s in counts['sources']],
        [('(unnamed)', 2, (unit + index + unit) + 2 * stack),
         ('forward mul', 1, unit + index + unit)])

  def test_loops_count_their_trips(self):
    kernels = hlo_counts.list_kernels(_LOOP_HLO)
    self.assertEqual(
        [(k['name'], k['kind'], k['times'], k['loops'], k['read'],
          k['written']) for k in kernels],
        [('y', 'fusion:kLoop', 5, (('loop', 5, 'body'),), 32, 32),
         ('lt', 'compare', 5, (('loop', 5, 'body'),), 8, 1),
         ('copy', 'copy', 1, (), 32, 32)])
    counts = hlo_counts.count_kernels(_LOOP_HLO)
    self.assertEqual(counts['kernels'], 11)
    # The body's kernels, not the condition's.
    self.assertEqual(counts['loop_bodies'], [1])
    self.assertEqual(counts['read_mb'] * 1e6, 5 * 32 + 5 * 8 + 32)


if __name__ == '__main__':
  absltest.main()
