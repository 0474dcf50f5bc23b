"""The trade-off collector: finding runs, the vanilla curve, table, figure."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from PIL import Image

from sact_jax import main_job
from sact_jax import tradeoff


def write_run(root: str, name: str, *, model_type: str, units, top1: float,
              flops: float, flops_std: float = 0.0, tau: float | None = 0.01,
              with_config: bool = True) -> str:
  """A workdir as main_job leaves it (only the fields the collector reads)."""
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  metrics = {'top1_accuracy': top1, 'flops_mean': flops,
             'flops_std': flops_std, 'flops_percent_of_vanilla': 50.0,
             'ponder_cost_total': 4.5,
             'model': {'family': 'cifar', 'units': list(units),
                       'model_type': model_type}}
  with open(os.path.join(workdir, main_job.EVAL_FILE), 'w') as f:
    json.dump(metrics, f)
  if with_config:
    with open(os.path.join(workdir, main_job.CONFIG_FILE), 'w') as f:
      json.dump({'tau': tau, 'num_train_steps': 100}, f)
  return workdir


class TradeoffTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.root = self.enter_context(tempfile.TemporaryDirectory())
    for name, units, top1, flops in (('vanilla_units1-1-1', (1, 1, 1), 0.90,
                                      2e6),
                                     ('vanilla_units3-3-3', (3, 3, 3), 0.98,
                                      6e6)):
      write_run(self.root, name, model_type='vanilla', units=units,
                top1=top1, flops=flops)
    write_run(self.root, 'sact_tau0.02', model_type='sact', units=(3, 3, 3),
              top1=0.97, flops=3e6, flops_std=5e5, tau=0.02)
    write_run(self.root, 'act_tau0.02', model_type='act', units=(3, 3, 3),
              top1=0.80, flops=8e6, tau=0.02)
    os.makedirs(os.path.join(self.root, 'unfinished', 'checkpoints'))

  def test_collect_reads_rows_and_compares_with_vanilla(self):
    rows = tradeoff.collect([self.root])
    self.assertEqual([r['name'] for r in rows],
                     ['sact_tau0.02', 'act_tau0.02', 'vanilla_units1-1-1',
                      'vanilla_units3-3-3'])
    sact, act, vanilla1, vanilla3 = rows
    self.assertEqual((sact['depth'], sact['tau'], sact['units']),
                     (20, 0.02, [3, 3, 3]))
    self.assertEqual((vanilla1['depth'], vanilla1['tau']), (8, None))
    self.assertEqual(vanilla3['num_train_steps'], 100)
    # 3M FLOPs is a quarter of the way from 2M to 6M: 0.90 + 0.08 / 4.
    self.assertAlmostEqual(sact['vanilla_top1_at_same_flops'], 0.92)
    self.assertIsNone(act['vanilla_top1_at_same_flops'])  # Beyond 6M.
    self.assertIsNone(vanilla1['vanilla_top1_at_same_flops'])

  @parameterized.parameters((2e6, 0.90), (6e6, 0.98), (4e6, 0.94),
                            (1e6, None), (7e6, None))
  def test_vanilla_curve(self, flops, expected):
    rows = tradeoff.collect([self.root])
    got = tradeoff.vanilla_top1_at(rows, flops)
    if expected is None:
      self.assertIsNone(got)
    else:
      self.assertAlmostEqual(got, expected)

  def test_repeated_vanilla_seeds_are_averaged(self):
    rows = [{'model_type': 'vanilla', 'flops_mean': 1.0,
             'top1_accuracy': a} for a in (0.5, 0.7)]
    self.assertAlmostEqual(tradeoff.vanilla_top1_at(rows, 1.0), 0.6)
    self.assertIsNone(tradeoff.vanilla_top1_at(rows[:0], 1.0))

  def test_globs_single_workdirs_and_duplicates(self):
    found = tradeoff.find_workdirs([
        os.path.join(self.root, 'vanilla_*'),
        os.path.join(self.root, 'sact_tau0.02'), self.root])
    self.assertEqual([os.path.basename(p) for p in found],
                     ['vanilla_units1-1-1', 'vanilla_units3-3-3',
                      'sact_tau0.02', 'act_tau0.02'])

  def test_workdir_without_config_has_no_tau(self):
    other = self.enter_context(tempfile.TemporaryDirectory())
    write_run(other, 'elsewhere', model_type='sact', units=(2, 2, 2),
              top1=0.9, flops=1e6, with_config=False)
    (row,) = tradeoff.collect([other])
    self.assertIsNone(row['tau'])
    self.assertIsNone(row['num_train_steps'])
    self.assertIn('| elsewhere | SACT-14 |', tradeoff.markdown_table([row]))

  @parameterized.named_parameters(
      ('missing_path', 'missing', 'No such file or directory'),
      ('no_finished_runs', 'unfinished', 'No finished runs'),
  )
  def test_paths_without_runs(self, name, message):
    with self.assertRaisesRegex(tradeoff.TradeoffError, message):
      tradeoff.collect([os.path.join(self.root, name)])

  def test_malformed_eval_json(self):
    workdir = os.path.join(self.root, 'broken')
    os.makedirs(workdir)
    with open(os.path.join(workdir, main_job.EVAL_FILE), 'w') as f:
      json.dump({'top1_accuracy': 0.5}, f)
    with self.assertRaisesRegex(tradeoff.TradeoffError,
                                "not an evaluation.*missing 'model'"):
      tradeoff.load_run(workdir)
    with open(os.path.join(workdir, main_job.EVAL_FILE), 'w') as f:
      f.write('{"top1')
    with self.assertRaisesRegex(tradeoff.TradeoffError, 'Cannot read'):
      tradeoff.load_run(workdir)

  def test_table_and_figure(self):
    rows = tradeoff.collect([self.root])
    table = tradeoff.markdown_table(rows)
    self.assertIn('| sact_tau0.02 | SACT-20, tau=0.02 | 3.00M +- 0.50M | '
                  '50.0% | 97.00% | 92.00% | 4.50 |', table)
    self.assertIn('| vanilla_units1-1-1 | ResNet-8 | 2.00M +- 0.00M | 50.0% '
                  '| 90.00% |  | 4.50 |', table)
    self.assertLen(table.strip().splitlines(), 2 + len(rows))
    out = os.path.join(self.root, 'out')
    paths = tradeoff.save(rows, out)
    with Image.open(paths['figure']) as image:
      self.assertEqual(image.size, (720, 480))
    with open(paths['json']) as f:
      self.assertEqual(json.load(f), rows)
    with open(paths['markdown']) as f:
      self.assertEqual(f.read(), table)
    # The legend lies right of the axes: it hides no point.
    fig = tradeoff.render_figure(rows)
    fig.canvas.draw()
    ax = fig.axes[0]
    self.assertGreaterEqual(ax.get_legend().get_window_extent().x0,
                            ax.get_window_extent().x1)
    self.assertLessEqual(ax.get_legend().get_window_extent().x1,
                         fig.bbox.x1)


if __name__ == '__main__':
  absltest.main()
