"""Sweeps: planning, skipping finished runs, resuming, and the launcher."""

import json
import os
import subprocess
import sys
import tempfile
from unittest import mock

from absl.testing import absltest
from absl.testing import parameterized

from sact_jax import checkpoint
from sact_jax import main_job
from sact_jax import sweep
from sact_jax import tradeoff
from sact_jax.configs import default
from sact_jax.configs import sweep as sweep_config
from sact_jax.configs import validation

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PlanTest(parameterized.TestCase):

  def test_runs_and_their_configs(self):
    base = sweep_config.get_config()
    runs = sweep.plan(base, taus=[0.01, 0.04], model_types=['act', 'sact'],
                      vanilla_units=['1', (2, 2, 2), '1-2-3'])
    self.assertEqual([r.name for r in runs], [
        'act_tau0.01', 'act_tau0.04', 'sact_tau0.01', 'sact_tau0.04',
        'vanilla_units1-1-1', 'vanilla_units2-2-2', 'vanilla_units1-2-3'])
    got = [(r.config.model_type, r.config.tau, tuple(r.config.units))
           for r in runs]
    self.assertEqual(got[:4], [('act', 0.01, (3, 3, 3)),
                               ('act', 0.04, (3, 3, 3)),
                               ('sact', 0.01, (3, 3, 3)),
                               ('sact', 0.04, (3, 3, 3))])
    self.assertEqual([g[0] for g in got[4:]], ['vanilla'] * 3)
    self.assertEqual([g[2] for g in got[4:]],
                     [(1, 1, 1), (2, 2, 2), (1, 2, 3)])
    # Everything else is the base config's, which is left as it was.
    self.assertEqual({r.config.num_train_steps for r in runs},
                     {base.num_train_steps})
    self.assertEqual((base.model_type, base.tau, tuple(base.units)),
                     ('sact', 0.04, (3, 3, 3)))
    for r in runs:
      validation.validate_config(r.config)

  @parameterized.named_parameters(
      ('unknown_type', dict(model_types=['vanilla']), 'Unknown model types'),
      ('negative_tau', dict(taus=[-0.1]), 'taus must be >= 0'),
      ('no_taus', dict(taus=[]), 'No taus for the model types'),
      ('twice', dict(taus=[0.01, 0.010]), 'twice: sact_tau0.01'),
      ('units_twice', dict(vanilla_units=['2', '2-2-2']),
       'twice: vanilla_units2-2-2'),
      ('units_not_numbers', dict(vanilla_units=['a']), "Bad vanilla units 'a'"),
      ('units_wrong_length', dict(vanilla_units=['1-2']),
       'the model has 3 blocks'),
      ('units_zero', dict(vanilla_units=['0']), 'at least one unit'),
      ('nothing', dict(taus=[], model_types=[], vanilla_units=[]),
       'Nothing to run'),
  )
  def test_bad_plans_are_refused(self, changes, message):
    kwargs = dict(taus=[0.01], model_types=['sact'], vanilla_units=['1'])
    kwargs.update(changes)
    with self.assertRaisesRegex(sweep.SweepError, message):
      sweep.plan(sweep_config.get_config(), **kwargs)

  def test_validate_names_the_run(self):
    base = default.get_config('smoke')
    base.unlock()
    base.eps = 2.0
    runs = sweep.plan(base, taus=[0.01], vanilla_units=[])
    with self.assertRaisesRegex(validation.ConfigError,
                                r'^Run sact_tau0.01: eps must lie'):
      sweep.validate(runs, '/nonexistent')


class RunSweepTest(absltest.TestCase):
  """run_sweep with a stand-in for training (the launcher test trains)."""

  def setUp(self):
    super().setUp()
    self.root = self.enter_context(tempfile.TemporaryDirectory())
    self.runs = sweep.plan(default.get_config('smoke'), taus=[0.01, 0.02],
                           vanilla_units=['1'])
    self.calls = []

  def fake_train(self, preempt_at=None):
    def train_fn(config, workdir):
      self.calls.append(os.path.basename(workdir))
      os.makedirs(workdir, exist_ok=True)
      if os.path.basename(workdir) == preempt_at:
        os.makedirs(os.path.join(workdir, 'checkpoints'), exist_ok=True)
        return None
      metrics = {'top1_accuracy': 0.5, 'flops_mean': 1e6,
                 'tau': config.tau}
      with open(os.path.join(workdir, main_job.EVAL_FILE), 'w') as f:
        json.dump(metrics, f)
      return metrics
    return train_fn

  def test_skips_finished_stops_when_preempted_and_resumes(self):
    os.makedirs(os.path.join(self.root, 'sact_tau0.01'))
    with open(os.path.join(self.root, 'sact_tau0.01',
                           main_job.EVAL_FILE), 'w') as f:
      f.write('{}')
    records = sweep.run_sweep(self.runs, self.root,
                              train_fn=self.fake_train('sact_tau0.02'))
    self.assertEqual([(r['name'], r['status']) for r in records],
                     [('sact_tau0.01', 'skipped'),
                      ('sact_tau0.02', 'preempted')])
    self.assertEqual(self.calls, ['sact_tau0.02'])  # Later runs not started.
    # Started again: the interrupted run is trained (resumed) in the same
    # workdir, the rest follow.
    with self.assertLogs(level='INFO') as logs:
      records = sweep.run_sweep(self.runs, self.root,
                                train_fn=self.fake_train())
    self.assertEqual([r['status'] for r in records],
                     ['skipped', 'done', 'done'])
    self.assertEqual(self.calls, ['sact_tau0.02', 'sact_tau0.02',
                                  'vanilla_units1-1-1'])
    self.assertTrue(any('run 2/3 sact_tau0.02: resuming' in line
                        for line in logs.output), logs.output)
    with open(os.path.join(self.root, 'sact_tau0.02',
                           main_job.EVAL_FILE)) as f:
      self.assertEqual(json.load(f)['tau'], 0.02)


  def test_finished_runs_are_extended_or_refused_under_new_settings(self):
    """More steps: trained on. Another learning rate: refused, any run."""
    workdir = os.path.join(self.root, 'sact_tau0.01')
    os.makedirs(workdir)
    for name, record in ((main_job.EVAL_FILE, {}),
                         (main_job.CONFIG_FILE, json.loads(
                             self.runs[0].config.to_json_best_effort()))):
      with open(os.path.join(workdir, name), 'w') as f:
        json.dump(record, f)
    steps = self.runs[0].config.num_train_steps
    with mock.patch.object(checkpoint, 'latest_run_step',
                           return_value=steps):
      sweep.validate(self.runs, self.root)
      self.assertTrue(main_job.is_finished(self.runs[0].config, workdir))
      longer = default.get_config('smoke')
      longer.num_train_steps = steps + 10
      runs = sweep.plan(longer, taus=[0.01], vanilla_units=[])
      sweep.validate(runs, self.root)
      records = sweep.run_sweep(runs, self.root, train_fn=self.fake_train())
      self.assertEqual(records[0]['status'], 'done')
      self.assertEqual(self.calls, ['sact_tau0.01'])
      other = default.get_config('smoke')
      other.learning_rate = 0.3
      with self.assertRaisesRegex(
          validation.ConfigError, r'^Run sact_tau0.01: .* other settings '
          r'\(learning_rate [\d.]+ -> 0.3'):
        sweep.validate(sweep.plan(other, taus=[0.01], vanilla_units=[]),
                       self.root)


class LauncherTest(absltest.TestCase):

  def test_trains_skips_and_draws(self):
    """Two tiny runs end to end, then the same command again skips both."""
    tmp = self.enter_context(tempfile.TemporaryDirectory())
    root = os.path.join(tmp, 'sweep')
    command = [
        sys.executable, '-m', 'experiments.sweep',
        '--config=sact_jax/configs/default.py:smoke',
        f'--config.data_dir={os.path.join(tmp, "data")}',
        '--config.num_train_steps=2', '--config.eval_every_steps=0',
        '--taus=0.01', '--vanilla_units=1', f'--workdir={root}',
        '--compilation_cache_dir=']
    env = dict(os.environ, JAX_PLATFORMS='cpu')
    first = subprocess.run(command, cwd=_REPO, env=env, capture_output=True,
                           text=True, timeout=600, check=False)
    self.assertEqual(first.returncode, 0, first.stderr[-3000:])
    self.assertIn('run 1/2 sact_tau0.01: training', first.stderr)
    self.assertIn('| sact_tau0.01 | SACT-8, tau=0.01 |', first.stdout)
    rows = tradeoff.collect([root])
    self.assertEqual([(r['name'], r['model_type'], r['tau'])
                      for r in rows],
                     [('sact_tau0.01', 'sact', 0.01),
                      ('vanilla_units1-1-1', 'vanilla', None)])
    for name in ('tradeoff.png', 'tradeoff.md', 'tradeoff.json'):
      self.assertTrue(os.path.isfile(os.path.join(root, name)), name)
    with open(os.path.join(root, 'sact_tau0.01', main_job.CONFIG_FILE)) as f:
      self.assertEqual(json.load(f)['num_train_steps'], 2)
    mtime = os.path.getmtime(
        os.path.join(root, 'sact_tau0.01', main_job.EVAL_FILE))
    again = subprocess.run(command, cwd=_REPO, env=env, capture_output=True,
                           text=True, timeout=600, check=False)
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    self.assertIn('run 1/2 sact_tau0.01: finished before, skipped',
                  again.stderr)
    self.assertIn('run 2/2 vanilla_units1-1-1: finished before, skipped',
                  again.stderr)
    self.assertEqual(mtime, os.path.getmtime(
        os.path.join(root, 'sact_tau0.01', main_job.EVAL_FILE)))


if __name__ == '__main__':
  absltest.main()
