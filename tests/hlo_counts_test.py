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


if __name__ == '__main__':
  absltest.main()
