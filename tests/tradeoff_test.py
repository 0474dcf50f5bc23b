"""The trade-off collector: finding runs, the vanilla curve, table, figure."""

import json
import os
import tempfile

from absl.testing import absltest
from absl.testing import parameterized
from orbax import checkpoint as ocp
from PIL import Image

from sact_jax import checkpoint
from sact_jax import main_job
from sact_jax import tradeoff


def write_run(root: str, name: str, *, model_type: str, units, top1: float,
              flops: float, flops_std: float = 0.0, tau: float | None = 0.01,
              with_config: bool = True, num_train_steps: int = 100,
              dataset: str = 'sact_shapes', base_channels: int = 8,
              num_eval_examples: int | None = None,
              split: str | None = None,
              checkpoint_step: int | None = None) -> str:
  """A workdir as main_job leaves it (only the fields the collector reads).

  `split` is what eval.json says was evaluated (default: what the config's
  `num_eval_examples` makes); `checkpoint_step` adds a run checkpoint.
  """
  workdir = os.path.join(root, name)
  os.makedirs(workdir)
  if split is None:
    split = ('test' if num_eval_examples is None
             else f'test[:{num_eval_examples}]')
  metrics = {'num_examples': num_eval_examples or 200,
             'top1_accuracy': top1, 'flops_mean': flops,
             'flops_std': flops_std, 'flops_percent_of_vanilla': 50.0,
             'ponder_cost_total': 4.5,
             'model': {'family': 'cifar', 'units': list(units),
                       'model_type': model_type,
                       'base_channels': base_channels},
             'dataset': dataset, 'split': split}
  with open(os.path.join(workdir, main_job.EVAL_FILE), 'w') as f:
    json.dump(metrics, f)
  if with_config:
    with open(os.path.join(workdir, main_job.CONFIG_FILE), 'w') as f:
      json.dump({'tau': tau, 'num_train_steps': num_train_steps,
                 'dataset': dataset, 'eval_split': None,
                 'num_eval_examples': num_eval_examples}, f)
  if checkpoint_step is not None:
    # Only what `checkpoint.latest_run_step` looks at: a saved step.
    with checkpoint.run_manager(workdir) as manager:
      manager.save(checkpoint_step, args=ocp.args.Composite(
          meta=ocp.args.JsonSave({})), force=True)
      manager.wait_until_finished()
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

  def test_a_string_or_nothing_for_the_paths(self):
    """A string would be read per character ('No such file ...: t')."""
    for fn in (tradeoff.collect, tradeoff.find_workdirs):
      with self.assertRaisesRegex(TypeError, r'got the single .*; pass \['):
        fn(self.root)
      with self.assertRaisesRegex(tradeoff.TradeoffError, 'No paths given'):
        fn([])

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

  def test_evaluation_of_an_earlier_checkpoint_is_skipped(self):
    # `experiments.evaluate` after the step-400 checkpoint was deleted.
    stale = write_run(self.root, 'sact_tau0.04', model_type='sact',
                      units=(3, 3, 3), top1=0.5, flops=4e6, tau=0.04,
                      num_train_steps=400, checkpoint_step=300)
    write_run(self.root, 'sact_tau0.08', model_type='sact', units=(3, 3, 3),
              top1=0.9, flops=2.5e6, tau=0.08, checkpoint_step=100)
    with self.assertLogs(level='WARNING') as logs:
      rows = tradeoff.collect([self.root])
    self.assertNotIn('sact_tau0.04', [r['name'] for r in rows])
    self.assertIn('sact_tau0.08', [r['name'] for r in rows])
    (warning,) = [m for m in logs.output if 'Not collected' in m]
    self.assertIn(f'{stale}: its latest checkpoint is at step 300 of '
                  'num_train_steps=400', warning)
    with self.assertRaisesRegex(tradeoff.NotFinishedError, 'step 300'):
      tradeoff.load_run(stale)

  @parameterized.named_parameters(
      # num_eval_examples, eval.json's dataset and split, skipped.
      ('whole_split', None, 'sact_shapes', 'test', False),
      ('first_20_of_whole', None, 'sact_shapes', 'test[:20]', True),
      ('configured_20', 20, 'sact_shapes', 'test[:20]', False),
      ('20_of_configured_2000', 2000, 'sact_shapes', 'test[:20]', True),
      ('whole_of_configured_20', 20, 'sact_shapes', 'test', True),
      ('other_dataset', None, 'cifar10', 'test', True),
  )
  def test_evaluation_of_other_examples_is_skipped(
      self, num_eval_examples, dataset, split, skipped):
    other = self.enter_context(tempfile.TemporaryDirectory())
    workdir = write_run(other, 'sact', model_type='sact', units=(3, 3, 3),
                        top1=0.9, flops=1e6,
                        num_eval_examples=num_eval_examples, split=split)
    with open(os.path.join(workdir, main_job.EVAL_FILE)) as f:
      metrics = json.load(f)
    metrics['dataset'] = dataset
    with open(os.path.join(workdir, main_job.EVAL_FILE), 'w') as f:
      json.dump(metrics, f)
    if not skipped:
      self.assertLen(tradeoff.collect([other]), 1)
      return
    with self.assertRaisesRegex(tradeoff.NotFinishedError,
                                f'^{workdir}: eval.json evaluated'):
      tradeoff.load_run(workdir)
    with self.assertLogs(level='WARNING'), self.assertRaisesRegex(
        tradeoff.TradeoffError, r'No finished runs .*: all 1 workdirs with '
        r'eval.json were skipped'):
      tradeoff.collect([other])

  @parameterized.parameters(
      ('validation', None, 'validation', True),
      ('validation', None, 'test', False),
      ('validation', 50, 'validation[:50]', True),
      ('train[90%:]', None, 'train[90%:]', True),
      (None, None, 'train[90%:]', False),
  )
  def test_configured_eval_split(self, eval_split, limit, split, matches):
    config = {'eval_split': eval_split, 'num_eval_examples': limit}
    self.assertEqual(tradeoff._split_matches(split, config), matches)

  def test_curves_of_other_depths_and_lengths_are_apart(self):
    # A ResNet-14 sweep (2000 steps) and a ResNet-20 one (30 steps).
    other = self.enter_context(tempfile.TemporaryDirectory())
    for steps, units, top1s in ((2000, (2, 2, 2), (0.95, 0.99)),
                                (30, (3, 3, 3), (0.60, 0.70))):
      write_run(other, f'vanilla_{steps}_8', model_type='vanilla',
                units=(1, 1, 1), top1=top1s[0], flops=1e6,
                num_train_steps=steps)
      write_run(other, f'vanilla_{steps}_{units[0]}', model_type='vanilla',
                units=units, top1=top1s[1], flops=5e6,
                num_train_steps=steps)
      write_run(other, f'sact_{steps}', model_type='sact', units=units,
                top1=top1s[1], flops=3e6, tau=0.04, num_train_steps=steps)
    rows = tradeoff.collect([other])
    by_name = {r['name']: r for r in rows}
    self.assertEqual([r['name'] for r in rows][:2], ['sact_2000', 'sact_30'])
    self.assertEqual(by_name['sact_2000']['label'],
                     'SACT-14, 2000 steps, tau=0.04')
    self.assertEqual(by_name['sact_30']['curve'], 'SACT-20, 30 steps')
    self.assertEqual(by_name['vanilla_30_8']['label'], 'ResNet-8, 30 steps')
    # Each against the vanilla runs of its own length: halfway up.
    self.assertAlmostEqual(
        by_name['sact_2000']['vanilla_top1_at_same_flops'], 0.97)
    self.assertAlmostEqual(
        by_name['sact_30']['vanilla_top1_at_same_flops'], 0.65)
    self.assertIn('| sact_30 | SACT-20, 30 steps, tau=0.04 |',
                  tradeoff.markdown_table(rows))
    ax = tradeoff.render_figure(rows).axes[0]
    self.assertEqual([t.get_text() for t in ax.get_legend().get_texts()],
                     ['SACT-14, 2000 steps', 'SACT-20, 30 steps',
                      'ResNet (vanilla), 30 steps',
                      'ResNet (vanilla), 2000 steps'])
    # Each baseline in the colour of the runs it is compared with.
    color = {c.get_label(): c.lines[0].get_color() for c in ax.containers}
    self.assertEqual(color['ResNet (vanilla), 30 steps'],
                     color['SACT-20, 30 steps'])
    self.assertEqual(color['ResNet (vanilla), 2000 steps'],
                     color['SACT-14, 2000 steps'])
    self.assertNotEqual(color['SACT-14, 2000 steps'],
                        color['SACT-20, 30 steps'])
    tradeoff.save(rows, os.path.join(other, 'out'))

  def test_curves_of_other_widths_are_apart(self):
    write_run(self.root, 'sact_wide', model_type='sact', units=(3, 3, 3),
              top1=0.99, flops=5e6, tau=0.02, base_channels=16)
    rows = tradeoff.collect([self.root])
    by_name = {r['name']: r for r in rows}
    self.assertEqual(by_name['sact_wide']['label'],
                     'SACT-20, width 16, tau=0.02')
    self.assertEqual(by_name['sact_tau0.02']['curve'], 'SACT-20, width 8')
    self.assertIsNone(by_name['sact_wide']['vanilla_top1_at_same_flops'])
    self.assertAlmostEqual(
        by_name['sact_tau0.02']['vanilla_top1_at_same_flops'], 0.92)

  def test_units_of_one_depth_are_named(self):
    write_run(self.root, 'sact_deep_last', model_type='sact',
              units=(1, 4, 4), top1=0.9, flops=3e6, tau=0.02)
    rows = tradeoff.collect([self.root])
    self.assertEqual(sorted(r['curve'] for r in rows
                            if r['model_type'] == 'sact'),
                     ['SACT-20 (1-4-4)', 'SACT-20 (3-3-3)'])
    self.assertEqual([r['curve'] for r in rows if r['model_type'] == 'act'],
                     ['ACT-20'])

  def test_runs_of_several_datasets_are_refused(self):
    write_run(self.root, 'cifar_sact', model_type='sact', units=(3, 3, 3),
              top1=0.9, flops=3e6, dataset='cifar10')
    with self.assertRaisesRegex(
        tradeoff.TradeoffError, r'several datasets \(cifar10 \(1 runs\), '
        r'sact_shapes \(4 runs\)\)'):
      tradeoff.collect([self.root])

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
